"""The typed rollout batch: what the data module hands to the policy module.

Shape letters: B prompts, G samples per prompt, N = B * G samples, P prompt tokens (left-padded),
T response tokens (right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch


@dataclass
class RolloutBatch:
    """B prompts x G samples, generated with the prompt, scored, ready for any objective.

    Attributes:
        prompt_ids: (N, P) left-padded prompt tokens (the prompt repeated for each sample).
        prompt_mask: (N, P) 1 on real prompt tokens.
        response_ids: (N, T) right-padded generated tokens, the EOS token included when emitted.
        response_mask: (N, T) 1 on generated tokens (EOS included): the tokens a loss may count.
        rewards: (N,) verifier rewards.
        group_size: G; groups are contiguous blocks of G samples.
        texts: N decoded completions (behaviour metrics).
        has_answer: N flags: does the completion hold a parseable final answer (None: unknown).
        stats: counters and timings of the data path (`rollout/...`, `time/...`), logged by the module.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    group_size: int
    texts: list[str] = field(default_factory=list)
    has_answer: list[bool | None] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.rewards.shape[0]

    def __post_init__(self) -> None:
        n = self.rewards.shape[0]
        if n % self.group_size:
            raise ValueError(f"batch of {n} samples is not whole groups of {self.group_size}")
        for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask"):
            if getattr(self, f).shape[0] != n:
                raise ValueError(f"{f} has {getattr(self, f).shape[0]} rows, rewards has {n}")

    def select(self, rows: slice) -> RolloutBatch:
        """Rows `rows` of every per-sample tensor (micro-batching; groups may be cut, stats dropped)."""
        tensors = {f.name: getattr(self, f.name)[rows] for f in fields(self) if f.type == "torch.Tensor"}
        n = tensors["rewards"].shape[0]
        group = self.group_size if n % self.group_size == 0 else 1
        return replace(
            self, **tensors, group_size=group, texts=self.texts[rows], has_answer=self.has_answer[rows], stats={}
        )

    def micro_batches(self, size: int | None) -> list[tuple[slice, RolloutBatch]]:
        """Consecutive row slices of at most `size` samples (None: the whole batch)."""
        n = len(self)
        size = n if size is None or size <= 0 else size
        out = []
        for start in range(0, n, size):
            rows = slice(start, min(start + size, n))
            out.append((rows, self.select(rows)))
        return out


def pad_right(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> right-padded ids (R, W) and their 0/1 mask (R, W), W = longest row (at least 1)."""
    width = max(1, max(map(len, rows), default=0))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def pad_left(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows -> left-padded ids (R, W) and mask (R, W): prompts end at the last column."""
    ids, mask = pad_right([r[::-1] for r in rows], pad)
    return ids.flip(1), mask.flip(1)
