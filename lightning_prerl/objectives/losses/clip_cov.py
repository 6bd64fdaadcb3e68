"""Clip-Cov (Cui et al., "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617, sec. 5).

    cov_it = (A_i - mean A) (log pi_it - mean log pi)           # means over the kept tokens
    loss_it = PPO-clip(A_i, rho_it), detached on a random select_ratio share of the tokens whose
              cov_it lies in (cov_low, cov_high) and whose PPO clip does not already bind

Tokens with a large positive covariance drive the entropy collapse; cutting their gradient keeps the
entropy up. Defaults (select_ratio 2e-4, cov bounds 1 and 5) and the per-micro-batch statistics follow
verl's `compute_policy_loss_clip_cov` (verl/trainer/ppo/core_algos.py, adapted from PRIME-RL's code):
the covariance and the selection run over one micro-batch, so this loss, unlike the others, depends on
`module.micro_batch_size`. verl zeroes the selected tokens' loss; here it is detached (same gradient,
the logged loss keeps their value). The selection draws from torch's generator (saved in checkpoints).
"""

from __future__ import annotations

import torch

from lightning_prerl.objectives.registry import LossInputs, LossOutput, register_loss


def token_covariance(x: LossInputs) -> torch.Tensor:
    """(N, T) detached (A_i - mean A)(log pi_it - mean log pi), means over the kept tokens (`x.mask`)."""
    count = x.mask.sum().clamp(min=1.0)
    adv = x.adv[:, None].expand_as(x.logp)  # (N, T)
    logp = x.logp.detach()  # (N, T)
    return (adv - (adv * x.mask).sum() / count) * (logp - (logp * x.mask).sum() / count)  # (N, T)


@register_loss("clip_cov")
def clip_cov(
    x: LossInputs,
    eps_low: float,
    eps_high: float,
    select_ratio: float = 2e-4,
    cov_low: float = 1.0,
    cov_high: float = 5.0,
) -> LossOutput:
    """Per-token Clip-Cov loss (N, T); clipped (N, T): tokens without a policy gradient (PPO or selected)."""
    ratio = torch.exp(torch.clamp(x.logp - x.old_logp, -20.0, 20.0))  # (N, T)
    a = x.adv[:, None]  # (N, 1)
    unclipped, clipped = -a * ratio, -a * torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)  # (N, T)
    ppo_binds = clipped.detach() > unclipped.detach()  # (N, T)
    cov = token_covariance(x)  # (N, T)
    candidates = ((cov > cov_low) & (cov < cov_high) & (x.mask > 0) & ~ppo_binds).flatten().nonzero().squeeze(1)
    count = max(int(select_ratio * float(x.mask.sum())), 1)
    chosen = candidates[torch.randperm(len(candidates), device=candidates.device)[:count]]  # (<= count,)
    selected = torch.zeros(x.mask.numel(), dtype=torch.bool, device=x.mask.device)
    selected = selected.index_fill(0, chosen, True).view_as(x.mask)  # (N, T)
    loss = torch.maximum(unclipped, clipped)  # (N, T)
    return LossOutput(torch.where(selected, loss.detach(), loss), selected | ppo_binds)
