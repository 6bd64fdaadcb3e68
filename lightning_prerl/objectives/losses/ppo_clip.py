"""PPO-clip with dual clip, the paper's loss (verl's `vanilla`; arXiv 1707.06347, dual clip arXiv 1912.09729).

loss_it = max(-A_i rho_it, -A_i clip(rho_it, 1 - eps_low, 1 + eps_high)),  capped at -A_i c when A_i < 0
"""

from __future__ import annotations

import math

import torch

from lightning_prerl.objectives.ops import ppo_clip_loss
from lightning_prerl.objectives.registry import LossInputs, LossOutput, register_loss


@register_loss("ppo_clip")
def ppo_clip(x: LossInputs, eps_low: float, eps_high: float, clip_c: float | None) -> LossOutput:
    """Per-token PPO-clip (`ops.ppo_clip_loss`); clipped: the ratio left the range on the side that binds."""
    loss = ppo_clip_loss(x.logp, x.old_logp, x.adv, eps_low, eps_high, clip_c)  # (N, T)
    log_ratio = x.logp.detach() - x.old_logp  # (N, T)
    a = x.adv[:, None]  # (N, 1)
    clipped = torch.where(a > 0, log_ratio > math.log1p(eps_high), log_ratio < math.log1p(-eps_low))  # (N, T)
    return LossOutput(loss, clipped & (a != 0))
