"""The typed rollout batch: what the data module hands to the policy module.

Shape letters: B prompts, G samples per prompt, N = B * G samples, P prompt tokens (left-padded),
T response tokens (right-padded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
        sources: N names of the set each sample's prompt came from (the benchmark, for per-benchmark metrics).
        stats: counters and timings of the data path (`rollout/...`, `time/...`), logged by the module.
        padding_prompts: trailing prompts that only keep ranks in lockstep (uneven evaluation
            shards): generated like the others, never scored into metrics.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    group_size: int
    texts: list[str] = field(default_factory=list)
    has_answer: list[bool | None] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    padding_prompts: int = 0

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
        """Rows `rows` of every per-sample tensor, trimmed to their own longest prompt and response.

        Micro-batching: groups may be cut, stats are dropped, and padding columns that no selected
        row uses are removed (prompts are left-padded, responses right-padded).
        """
        tensors = {f.name: getattr(self, f.name)[rows] for f in fields(self) if f.type == "torch.Tensor"}
        p_used = max(1, int(tensors["prompt_mask"].sum(1).max()))
        t_used = max(1, int(tensors["response_mask"].sum(1).max()))
        for name in ("prompt_ids", "prompt_mask"):
            tensors[name] = tensors[name][:, -p_used:]  # (n, P') the last P' columns
        for name in ("response_ids", "response_mask"):
            tensors[name] = tensors[name][:, :t_used]  # (n, T') the first T' columns
        n = tensors["rewards"].shape[0]
        group = self.group_size if n % self.group_size == 0 else 1
        return replace(
            self,
            **tensors,
            group_size=group,
            texts=self.texts[rows],
            has_answer=self.has_answer[rows],
            sources=self.sources[rows],
            stats={},
            padding_prompts=0,
        )

    def micro_batches(
        self,
        size: int | None = None,
        max_tokens: int | None = None,
        agree: Callable[[int], int] = lambda count: count,
    ) -> list[tuple[slice, RolloutBatch]]:
        """Consecutive, trimmed row slices: at most `size` rows and `max_tokens` padded tokens each.

        A micro-batch costs rows x (its longest prompt + response) tokens. With a token budget
        the count depends on the lengths, so `agree` maps this rank's count to the count all ranks
        use (the max over ranks); the most expensive slices are then split until there are that
        many, and every rank runs the same number of forward/backward passes.

        Args:
            size: rows per micro-batch (None: no row limit).
            max_tokens: padded tokens per micro-batch (None: no token limit); a single row over
                the budget still forms its own micro-batch.
            agree: this rank's count -> the count every rank uses.
        """
        n = len(self)
        size = n if size is None or size <= 0 else size
        cost = (self.prompt_mask.sum(1) + self.response_mask.sum(1)).tolist()  # (N,) real tokens per row
        bounds, start = [], 0
        for end in range(1, n + 1):
            rows, width = end - start, max(cost[start:end])
            if end - start > 1 and (rows > size or (max_tokens is not None and rows * width > max_tokens)):
                bounds.append((start, end - 1))
                start = end - 1
        bounds.append((start, n))
        target = agree(len(bounds))
        while len(bounds) < target:  # split the costliest multi-row slice in two
            i = max(
                (k for k, (a, b) in enumerate(bounds) if b - a > 1),
                key=lambda k: (bounds[k][1] - bounds[k][0]) * max(cost[bounds[k][0] : bounds[k][1]]),
            )
            a, b = bounds[i]
            bounds[i : i + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
        return [(slice(a, b), self.select(slice(a, b))) for a, b in bounds]


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


def truncated_flags(response_ids: torch.Tensor, response_mask: torch.Tensor, stop_ids: Sequence[int]) -> list[bool]:
    """Per completion: did it end without a stop token (empty, or cut at the token budget)?

    Args:
        response_ids: (N, T) right-padded completions.
        response_mask: (N, T) 1 on generated tokens.
        stop_ids: the engine's stop token ids.
    """
    lengths = response_mask.sum(1)  # (N,)
    last = response_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # (N,) last real token
    stopped = torch.isin(last, torch.tensor(list(stop_ids), dtype=last.dtype)) & (lengths > 0)  # (N,)
    return (~stopped).tolist()
