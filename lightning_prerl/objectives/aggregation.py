"""How per-token losses become one scalar per optimizer step (`objective.aggregation`).

    loss = sum_{i,t} weights_it * loss_it / normaliser,   normaliser = sum over ranks of count(...)

An aggregation splits into a row-local part and a batch-wide part so that micro-batch size and world
size never change the update: `weights(mask)` depends on each row alone (it runs micro-batch by
micro-batch), `count(mask, rows)` runs once on a rank's whole (mini-)batch and the update sums it over
ranks (`update.backward_objective`). Samples a micro-batch does not forward (A = 0, nothing kept) still
count, exactly as if they had been forwarded with a zero loss.

Modes (verl's `agg_loss` names; TRL's `loss_type` in brackets):

- `token-mean`: every kept token of the batch weighs the same (verl's default, the paper's; [dapo]).
- `seq-mean-token-sum`: per-sequence token sums, averaged over the kept sequences.
- `seq-mean-token-mean`: per-sequence token means, averaged over the kept sequences (GRPO's original
  1/|o_i|; GSPO and SAPO use it).
- `constant`: sum over all tokens / (samples x `length`), Dr.GRPO's fix of the length bias
  (arXiv 2503.20783, sec. 3.1: 1/|o_i| replaced by a constant; TRL [dr_grpo] divides by the number of
  completions x `max_completion_length`). Every real sample counts (`rows`), kept or not, so the
  normaliser is the same number every step.

Shapes: N samples, T response tokens; `mask` (N, T) float loss mask, `rows` (N,) bool real samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightning_prerl.objectives.registry import register_aggregation


@register_aggregation("token-mean")
class TokenMean:
    def weights(self, mask: torch.Tensor) -> torch.Tensor:
        return mask  # (N, T)

    def count(self, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return mask.sum()  # kept tokens


@register_aggregation("seq-mean-token-sum")
class SeqMeanTokenSum:
    def weights(self, mask: torch.Tensor) -> torch.Tensor:
        return mask  # (N, T)

    def count(self, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (mask.sum(1) > 0).sum().to(mask.dtype)  # kept sequences


@register_aggregation("seq-mean-token-mean")
class SeqMeanTokenMean:
    def weights(self, mask: torch.Tensor) -> torch.Tensor:
        return mask / mask.sum(1, keepdim=True).clamp(min=1.0)  # (N, T): each kept row sums to 1

    def count(self, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (mask.sum(1) > 0).sum().to(mask.dtype)  # kept sequences


@register_aggregation("constant")
@dataclass(frozen=True)
class Constant:
    """Dr.GRPO: `length` is the response budget (the YAML sets `data.sampling.max_new_tokens`)."""

    length: int

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"objective.aggregation_args.length={self.length}: must be >= 1")

    def weights(self, mask: torch.Tensor) -> torch.Tensor:
        return mask  # (N, T)

    def count(self, mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return rows.sum().to(mask.dtype) * self.length  # samples x budget, kept or not
