"""SAPO: Soft Adaptive Policy Optimization (Gao et al., arXiv 2511.20347).

    f(rho) = sigmoid(tau (rho - 1)) * 4 / tau,   tau = tau_pos if A_i > 0 else tau_neg
    loss_it = -f(rho_it) * A_i

A smooth gate replaces the hard clip: its gradient weight 4 sigmoid (1 - sigmoid) * rho is 1 at rho = 1
(the policy gradient on-policy) and decays smoothly as the ratio moves away, faster for negative
advantages (tau_neg > tau_pos). Defaults tau_pos = 1.0, tau_neg = 1.05 (the paper's) and the
seq-mean-token-mean aggregation as verl's `compute_policy_loss_sapo` (verl/trainer/ppo/core_algos.py,
actor.yaml), where tau_neg also applies at A = 0. Nothing is clipped: `train/clip_fraction` stays 0.
"""

from __future__ import annotations

import torch

from lightning_prerl.objectives.registry import LossInputs, LossOutput, register_loss


@register_loss("sapo")
def sapo(x: LossInputs, tau_pos: float = 1.0, tau_neg: float = 1.05) -> LossOutput:
    """Per-token SAPO loss (N, T); clipped (N, T) all False (a soft gate, no clip)."""
    ratio = torch.exp(torch.clamp(x.logp - x.old_logp, -20.0, 20.0))  # (N, T)
    a = x.adv[:, None]  # (N, 1)
    tau = torch.where(a > 0, tau_pos, tau_neg)  # (N, 1)
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)  # (N, T)
    return LossOutput(-gate * a, torch.zeros_like(ratio, dtype=torch.bool))
