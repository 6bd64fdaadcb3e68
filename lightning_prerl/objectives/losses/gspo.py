"""GSPO: Group Sequence Policy Optimization (Zheng et al., arXiv 2507.18071).

    s_i = (pi(y_i | .) / pi_old(y_i | .)) ** (1 / |y_i|) = exp(mean_t log rho_it)     # geometric mean
    loss_i = max(-A_i s_i, -A_i clip(s_i, 1 - eps_low, 1 + eps_high))                  # clipped per sequence

Every token of sequence i carries loss_i, so `aggregation: seq-mean-token-mean` (the YAML's) gives the
paper's (1/G) sum_i loss_i, whose gradient is s_i A_i (1/|y_i|) sum_t grad log pi(y_it) when unclipped.
The paper's clip range is eps_low = 3e-4, eps_high = 4e-4 (sec. 5.1). verl's `compute_policy_loss_gspo`
(verl/trainer/ppo/core_algos.py) writes the same gradient as GSPO-token, exp(sg[log s_i] + log pi - sg[log pi]);
here s_i is differentiated directly. Either way it works in both spaces: the ratio is taken in the
objective's space (P(y|x), or P(y) with the prompt replaced by the start token).
"""

from __future__ import annotations

import torch

from lightning_prerl.objectives.registry import LossInputs, LossOutput, register_loss


@register_loss("gspo")
def gspo(x: LossInputs, eps_low: float, eps_high: float) -> LossOutput:
    """Per-token GSPO loss (N, T), each token holding its sequence's clipped surrogate; clipped (N, T):
    the whole sequence when its ratio left the range on the side that binds."""
    lengths = x.mask.sum(1).clamp(min=1.0)  # (N,) kept tokens per sequence
    log_s = ((x.logp - x.old_logp) * x.mask).sum(1) / lengths  # (N,) mean log-ratio
    s = torch.exp(torch.clamp(log_s, -20.0, 20.0))  # (N,) sequence ratio
    a = x.adv  # (N,)
    seq_loss = torch.maximum(-a * s, -a * torch.clamp(s, 1.0 - eps_low, 1.0 + eps_high))  # (N,)
    clipped = torch.where(a > 0, s.detach() > 1.0 + eps_high, s.detach() < 1.0 - eps_low) & (a != 0)  # (N,)
    return LossOutput(seq_loss[:, None].expand_as(x.logp), clipped[:, None].expand_as(x.logp))  # (N, T), (N, T)
