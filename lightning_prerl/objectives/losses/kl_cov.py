"""KL-Cov (Cui et al., "The Entropy Mechanism of RL for Reasoning LMs", arXiv 2505.22617, sec. 5).

    cov_it = (A_i - mean A) (log pi_it - mean log pi)           # means over the kept tokens
    loss_it = -A_i rho_it + penalty_coef * |log rho_it|  on the top select_ratio share of tokens by cov_it
    loss_it = -A_i rho_it                                 elsewhere (no clip)

A KL penalty on the few tokens whose covariance drives the entropy collapse. Defaults select_ratio 2e-4
and penalty_coef 1.0 are verl's `compute_policy_loss_kl_cov` defaults (verl/trainer/ppo/core_algos.py;
its actor.yaml sets ppo_kl_coef 0.1), selection over one micro-batch as there. |log rho| is 0 with a
zero gradient on-policy: the penalty acts from the second update of a rollout batch on
(`module.ppo_epochs` or `module.mini_batches` > 1).
"""

from __future__ import annotations

import torch

from lightning_prerl.objectives.losses.clip_cov import token_covariance
from lightning_prerl.objectives.registry import LossInputs, LossOutput, register_loss


@register_loss("kl_cov")
def kl_cov(x: LossInputs, select_ratio: float = 2e-4, penalty_coef: float = 1.0) -> LossOutput:
    """Per-token KL-Cov loss (N, T); clipped (N, T): the penalised tokens."""
    log_ratio = torch.clamp(x.logp - x.old_logp, -20.0, 20.0)  # (N, T)
    loss = -x.adv[:, None] * torch.exp(log_ratio)  # (N, T)
    cov = token_covariance(x).masked_fill(x.mask <= 0, -torch.inf).flatten()  # (N*T,)
    count = max(int(select_ratio * float(x.mask.sum())), 1)
    top = torch.topk(cov, min(count, int((x.mask > 0).sum())), largest=True).indices  # (k,)
    selected = torch.zeros_like(cov, dtype=torch.bool).index_fill(0, top, True).view_as(x.mask)  # (N, T)
    return LossOutput(torch.where(selected, loss + penalty_coef * log_ratio.abs(), loss), selected)
