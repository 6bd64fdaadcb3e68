"""Objectives (layer 1): the losses as pure tensor math; nothing here imports Lightning or touches a model.

Owns the KL estimators, the registered parts of a loss (`registry.py`: advantage estimators in
`advantages.py`, policy losses in `losses/`, one file each, aggregations in `aggregation.py`),
`PolicyGradientObjective` (which samples, which space, which parts: CondRL, PreRL, NSR/PSR, GSPO, ...)
and the rollout-vs-trainer mismatch correction (TIS, masking). May import: torch only.
"""

from lightning_prerl.objectives.policy_gradient import PolicyGradientObjective
from lightning_prerl.objectives.registry import (
    LossInputs,
    LossOutput,
    register_advantage,
    register_aggregation,
    register_loss,
)

__all__ = [
    "LossInputs",
    "LossOutput",
    "PolicyGradientObjective",
    "register_advantage",
    "register_aggregation",
    "register_loss",
]
