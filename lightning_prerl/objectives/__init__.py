"""Objectives: pure-torch losses; nothing here imports Lightning or touches models."""

from lightning_prerl.objectives.policy_gradient import PolicyGradientObjective

__all__ = ["PolicyGradientObjective"]
