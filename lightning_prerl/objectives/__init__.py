"""Objectives (layer 1): the losses as pure tensor math; nothing here imports Lightning or touches a model.

Owns the PPO clip with dual clip, the KL estimators, the advantage estimators (GRPO, group mean,
signed), `PolicyGradientObjective` (which samples, which space, which weights: CondRL, PreRL, NSR/PSR)
and the rollout-vs-trainer mismatch correction (TIS, masking). May import: torch only.
"""

from lightning_prerl.objectives.policy_gradient import PolicyGradientObjective

__all__ = ["PolicyGradientObjective"]
