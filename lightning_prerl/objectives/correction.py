"""Rollout-vs-trainer mismatch: how far the engine's sampling log-probs are from the trainer's, and
its correction by truncated importance sampling (TIS) or masking.

The engine (vLLM, or the transformers engine in another dtype) samples y from pi_rollout(y | x); the
trainer computes pi_old(y | x) on the same tokens before the first update. Their ratio
rho_t = pi_old(y_t | x, y_<t) / pi_rollout(y_t | x, y_<t) measures the mismatch; as verl's
`rollout_correction` and TRL's `vllm_importance_sampling_*`:

- TIS, token level: w_t = min(rho_t, C); sequence level: w = min(prod_t rho_t, C) on every token.
- Masking, token level: tokens with rho_t outside [lo, hi] leave the loss (and its token count);
  sequence level: a sequence whose geometric-mean ratio exp(mean_t log rho_t) leaves [lo, hi] leaves
  whole (the product of thousands of ratios is not a usable statistic).

Which loss it applies to: the ratio is one of *sampling* distributions, P(y|x) of the trainer over
P(y|x) of the engine, whatever space the gradient is taken in. The PreRL family's gradient
E_{y ~ pi(.|x)}[A grad log P(y)] samples from P(y|x) too, so the same weights correct it; the authors
pass no rollout log-probs to it, so it is off by default there (`prerl: false`): applying it costs
one no-grad conditional forward per rollout batch that a PreRL step does not otherwise run.

Shape letters: N samples, T response tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LEVELS = (None, "token", "sequence")


@dataclass(frozen=True)
class RolloutCorrection:
    """Correction of the rollout-vs-trainer mismatch (module.rollout_correction).

    Attributes:
        tis: truncated importance sampling level: null (off), token or sequence.
        tis_cap: C, the cap of the importance weights.
        mask: masking level: null (off), token or sequence.
        mask_low, mask_high: [lo, hi], the ratios kept by masking.
        prerl: also correct the prompt-free (PreRL family) losses (a conditional no-grad forward).
    """

    tis: str | None = None
    tis_cap: float = 2.0
    mask: str | None = None
    mask_low: float = 0.5
    mask_high: float = 2.0
    prerl: bool = False

    def __post_init__(self) -> None:
        for key in ("tis", "mask"):
            if getattr(self, key) not in LEVELS:
                raise ValueError(
                    f"module.rollout_correction.{key}={getattr(self, key)!r}: expected null, token or sequence"
                )
        if self.tis_cap < 1:
            raise ValueError(f"module.rollout_correction.tis_cap={self.tis_cap}: must be >= 1")
        if not 0 <= self.mask_low < 1 < self.mask_high:
            raise ValueError(
                f"module.rollout_correction.mask_low={self.mask_low}, mask_high={self.mask_high}: "
                f"need 0 <= mask_low < 1 < mask_high"
            )

    @property
    def active(self) -> bool:
        return self.tis is not None or self.mask is not None

    def applies_to(self, space: str) -> bool:
        return self.active and (space == "conditional" or self.prerl)

    def weights(
        self, train_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Importance weights and the kept-token mask.

        Args:
            train_logp: (N, T) trainer log-probs of the rollout tokens before the first update.
            rollout_logp: (N, T) the engine's log-probs of the same tokens.
            mask: (N, T) 1 on response tokens.

        Returns:
            is_weights (N, T) or None (TIS off), and keep (N, T) float: 0 on masked tokens.
        """
        log_ratio = (train_logp - rollout_logp).float() * mask  # (N, T), 0 on padding
        lengths = mask.sum(1).clamp(min=1)  # (N,)
        weights = None
        if self.tis == "token":
            weights = torch.exp(log_ratio.clamp(max=20.0)).clamp(max=self.tis_cap)  # (N, T)
        elif self.tis == "sequence":
            seq = torch.exp(log_ratio.sum(1).clamp(max=20.0)).clamp(max=self.tis_cap)  # (N,)
            weights = seq[:, None].expand_as(log_ratio).contiguous()  # (N, T)
        keep = torch.ones_like(log_ratio)  # (N, T)
        lo, hi = torch.log(torch.tensor(self.mask_low)), torch.log(torch.tensor(self.mask_high))
        if self.mask == "token":
            keep = ((log_ratio >= lo) & (log_ratio <= hi)).float()  # (N, T)
        elif self.mask == "sequence":
            geo = log_ratio.sum(1) / lengths  # (N,) log of the geometric-mean ratio
            keep = ((geo >= lo) & (geo <= hi)).float()[:, None].expand_as(log_ratio).contiguous()  # (N, T)
        return weights, keep


class MismatchStats:
    """Accumulates rollout-vs-trainer mismatch over micro-batches; `result` reduces over ranks.

    Logged as `rollout_corr/abs_diff` (mean |log pi_old - log pi_rollout| per token),
    `rollout_corr/kl` (k3 estimate of KL(pi_rollout || pi_old) from the engine's own samples),
    `rollout_corr/ratio_max` (largest token ratio pi_old / pi_rollout), and, when the correction is on,
    `rollout_corr/masked_tokens` (share of response tokens masked) and `rollout_corr/is_weight_mean`.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.ratio_max = torch.tensor(0.0)

    def add(
        self,
        train_logp: torch.Tensor,
        rollout_logp: torch.Tensor,
        mask: torch.Tensor,
        keep: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        """train_logp, rollout_logp, mask (N, T); keep, weights (N, T) from `RolloutCorrection.weights`."""
        mask = mask.float()
        log_ratio = (train_logp.detach().float() - rollout_logp.float()) * mask  # (N, T)
        k3 = (torch.exp(log_ratio.clamp(max=20.0)) - 1.0 - log_ratio) * mask  # (N, T)
        parts = {"tokens": mask.sum(), "abs_diff": log_ratio.abs().sum(), "kl": k3.sum()}
        if keep is not None:
            parts["masked_tokens"] = ((1.0 - keep) * mask).sum()
        if weights is not None:
            parts["is_weight_mean"] = (weights * mask).sum()
        for key, value in parts.items():
            self.sums[key] = self.sums.get(key, torch.zeros((), device=value.device)) + value
        masked = log_ratio.masked_fill(mask == 0, float("-inf"))  # (N, T)
        if masked.numel():
            self.ratio_max = torch.maximum(self.ratio_max.to(masked.device), torch.exp(masked.max().clamp(max=20.0)))

    def result(
        self, global_sum: Callable[[torch.Tensor], torch.Tensor], global_max: Callable[[torch.Tensor], torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per-token means over all ranks (every rank must call it when any rank added)."""
        if not self.sums:
            return {}
        tokens = global_sum(self.sums["tokens"]).clamp(min=1)
        out = {f"rollout_corr/{k}": global_sum(v) / tokens for k, v in self.sums.items() if k != "tokens"}
        out["rollout_corr/ratio_max"] = global_max(self.ratio_max)
        return out
