"""CISPO: Clipped IS-weight Policy Optimization (MiniMax-M1, arXiv 2506.13585, sec. 3.1).

    loss_it = -sg(clip(rho_it, 1 - eps_low_is, 1 + eps_high_is)) * A_i * log pi(y_it)

The importance weight is clipped and detached, never the token: every token keeps a gradient
(A_i * w_it * grad log pi), where PPO drops those whose ratio left the range. The paper sets no lower
bound (a large eps_low_is: 1.0 here, the weight floor 0) and tunes eps_high_is; 0.28 is Trinity-RFT's
default (DAPO's clip-higher bound, also the PreRL paper's GRPO baseline). Token-mean aggregation as in the paper
(1 / sum_i |o_i|). verl's `compute_policy_loss_cispo` (verl/trainer/ppo/core_algos.py) is the same
loss with its clip range taken from the PPO keys. The loss value is not ~0 on-policy (it carries log pi);
its gradient at rho = 1 is the policy gradient's.
"""

from __future__ import annotations

import torch

from lightning_prerl.objectives.registry import LossInputs, LossOutput, register_loss


@register_loss("cispo")
def cispo(x: LossInputs, eps_low_is: float = 1.0, eps_high_is: float = 0.28) -> LossOutput:
    """Per-token CISPO loss (N, T); clipped (N, T): tokens whose IS weight was clipped."""
    ratio = torch.exp(torch.clamp(x.logp.detach() - x.old_logp, -20.0, 20.0))  # (N, T)
    weight = torch.clamp(ratio, 1.0 - eps_low_is, 1.0 + eps_high_is)  # (N, T), no gradient
    loss = -weight * x.adv[:, None] * x.logp  # (N, T)
    clipped = (ratio > 1.0 + eps_high_is) | (ratio < 1.0 - eps_low_is)  # (N, T)
    return LossOutput(loss, clipped)
