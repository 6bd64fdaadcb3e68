"""Sequence-level advantage estimators, one small registered function each (`objective.advantage`).

Every estimator maps rewards (B, G) -- B prompts, G samples per prompt -- to advantages (B, G); its
keyword parameters come from the objective (`registry.bind`). A group-relative one is registered with
`group_relative=True`: a flat group then gets A = 0 exactly, not rounding noise.
"""

from __future__ import annotations

import torch

from lightning_prerl.objectives.registry import register_advantage

REWARD_TOLERANCE = 1e-6  # rewards closer than this are equal: a group of them carries no signal


def flat_groups(rewards: torch.Tensor, tol: float = REWARD_TOLERANCE) -> torch.Tensor:
    """(B,) bool: groups whose rewards all lie within `tol` of each other (no learning signal).

    Args:
        rewards: (B, G) rewards of B groups.
    """
    return (rewards.max(dim=1).values - rewards.min(dim=1).values) <= tol


@register_advantage("grpo", group_relative=True)
def grpo(rewards: torch.Tensor, adv_eps: float = 1e-6) -> torch.Tensor:
    """(r - group mean) / (group std + eps), std unbiased as torch's default (and verl's)."""
    if rewards.shape[1] == 1:  # verl: a singleton group has mean 0, std 1
        return rewards.clone()
    mean = rewards.mean(dim=1, keepdim=True)  # (B, 1)
    std = rewards.std(dim=1, keepdim=True)  # (B, 1)
    return (rewards - mean) / (std + adv_eps)


@register_advantage("group_mean", group_relative=True)
def group_mean(rewards: torch.Tensor) -> torch.Tensor:
    """r - group mean, no std division (PreRL's `pretrain_norm_adv_by_std=False`, Dr.GRPO)."""
    return rewards - rewards.mean(dim=1, keepdim=True)


@register_advantage("signed")
def signed(rewards: torch.Tensor, positive_weight: float = 1.0) -> torch.Tensor:
    """Zhu et al. 2025: +positive_weight on correct samples, -1 on wrong ones (r in {0, 1}).

    With `samples: negative` this is NSR, with `positive` PSR, and with all samples and
    positive_weight = lambda it is W-REINFORCE.
    """
    return positive_weight * rewards - (1.0 - rewards)
