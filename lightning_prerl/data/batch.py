"""The typed rollout batch: what the data module hands to the policy module.

Shape letters: B prompts, G samples per prompt, N = B * G samples, P prompt tokens (left-padded),
T response tokens (right-padded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import torch

RESPONSE_ALIGNED = ("rollout_logprobs", "loss_mask", "is_weights", "old_logprobs")  # (N, T) like response_ids
PROMPT_PARTS = ("question", "system", "fixed")  # left-padded (N, W) `<part>_ids` / `<part>_mask` pairs
PART_TENSORS = tuple(f"{part}_{kind}" for part in PROMPT_PARTS for kind in ("ids", "mask"))
OPTIONAL_ROWS = ("sample_mask", "advantages", "policy_version", *RESPONSE_ALIGNED, *PART_TENSORS)


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
        seeds: N sampling seeds (each prompt's, repeated over its G samples): with the same engine and
            weights they draw the same completions (the rollout record keeps them).
        stats: counters and timings of the data path (`rollout/...`, `time/...`), logged by the module.
        padding_prompts: trailing prompts that only keep ranks in lockstep (uneven evaluation
            shards): generated like the others, never scored into metrics.
        sample_mask: (N,) bool, False for samples that count in their group's advantage but never
            enter a loss (`data.overlong: mask`, dynamic-sampling fill groups); None: all enter.
        rollout_logprobs: (N, T) the engine's own log-probs of the response tokens (0 on padding),
            when it returned them: rollout-vs-trainer mismatch and its correction.
        policy_version: (N,) int64, the trainer step whose weights generated each sample, when they
            are not the training step's own (asynchronous rollouts); None: the current weights.
        advantages: (N,) per-sample advantages, set by `update.prepare` before the first update.
        loss_mask: (N, T) float, the tokens the loss counts (response, kept samples, correction
            masks), set by `update.prepare`.
        is_weights: (N, T) truncated importance weights of the rollout correction (None: off).
        old_logprobs: (N, T) log-probs before the first update in the active objective's space
            (None: the update is the batch's only one, and they equal the detached current ones).
        question_ids, question_mask: (N, Q) left-padded tokens of the bare question (no chat template,
            no system prompt), for the `question` space (`objectives/spaces.py`); None: not carried.
        system_ids, system_mask: (N, S) left-padded tokens of the bare system prompt (no row where a
            prompt has none), for the `system` space; None: not carried.
        fixed_ids, fixed_mask: (N, F) `data.fixed_context`'s tokens on every row, for the `fixed`
            space; None: no fixed context.
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
    seeds: list[int] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    padding_prompts: int = 0
    sample_mask: torch.Tensor | None = None
    rollout_logprobs: torch.Tensor | None = None
    policy_version: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None
    old_logprobs: torch.Tensor | None = None
    question_ids: torch.Tensor | None = None
    question_mask: torch.Tensor | None = None
    system_ids: torch.Tensor | None = None
    system_mask: torch.Tensor | None = None
    fixed_ids: torch.Tensor | None = None
    fixed_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.rewards.shape[0]

    def __post_init__(self) -> None:
        n = self.rewards.shape[0]
        if n % self.group_size:
            raise ValueError(f"batch of {n} samples is not whole groups of {self.group_size}")
        for f in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", *OPTIONAL_ROWS):
            value = getattr(self, f)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"{f} has {value.shape[0]} rows, rewards has {n}")
        for f in RESPONSE_ALIGNED:
            value = getattr(self, f)
            if value is not None and value.shape != self.response_ids.shape:
                raise ValueError(f"{f} has shape {tuple(value.shape)}, response_ids {tuple(self.response_ids.shape)}")

    def tensors_at(self, rows: slice | torch.Tensor) -> dict[str, torch.Tensor]:
        """Every per-sample tensor (optional ones when set) at `rows`: a slice or an (n,) index tensor."""
        return {
            f.name: getattr(self, f.name)[rows]
            for f in fields(self)
            if f.type.startswith("torch.Tensor") and getattr(self, f.name) is not None
        }

    def select(self, rows: slice | torch.Tensor) -> RolloutBatch:
        """Rows `rows` (a slice, or an (n,) index tensor) of every per-sample tensor, trimmed to their
        own longest prompt and response.

        Micro-batching: groups may be cut, stats are dropped, and padding columns that no selected
        row uses are removed (prompts are left-padded, responses right-padded).
        """
        tensors = self.tensors_at(rows)
        t_used = max(1, int(tensors["response_mask"].sum(1).max()))
        for part in ("prompt", *PROMPT_PARTS):
            if f"{part}_ids" in tensors:
                used = max(1, int(tensors[f"{part}_mask"].sum(1).max()))
                for name in (f"{part}_ids", f"{part}_mask"):
                    tensors[name] = tensors[name][:, -used:]  # (n, W') the last W' columns
        for name in ("response_ids", "response_mask", *RESPONSE_ALIGNED):
            if name in tensors:
                tensors[name] = tensors[name][:, :t_used]  # (n, T') the first T' columns
        n = tensors["rewards"].shape[0]
        contiguous = isinstance(rows, slice)
        group = self.group_size if contiguous and n % self.group_size == 0 else 1

        def pick(values: list) -> list:
            if contiguous:
                return values[rows]
            return [values[i] for i in rows.tolist()] if values else values  # lists left empty stay empty

        return replace(
            self,
            **tensors,
            group_size=group,
            texts=pick(self.texts),
            has_answer=pick(self.has_answer),
            sources=pick(self.sources),
            seeds=pick(self.seeds),
            stats={},
            padding_prompts=0,
        )

    def split(self, parts: int) -> list[RolloutBatch]:
        """`parts` consecutive mini-batches of whole groups (PPO mini-batches), each trimmed.

        The data module orders each rank's prompts so that mini-batch i of every rank holds its
        share of the global mini-batch i: an update sees the same prompts on any world size.
        """
        groups = len(self) // self.group_size
        if groups % parts:
            raise ValueError(
                f"module.mini_batches={parts}: this rank's {groups} prompts do not split evenly "
                f"(data.prompts_per_step / world size must divide by it)"
            )
        if parts == 1:
            return [self]
        rows = len(self) // parts
        return [self.select(slice(i * rows, (i + 1) * rows)) for i in range(parts)]

    def micro_batches(
        self,
        size: int | None = None,
        max_tokens: int | None = None,
        agree: Callable[[int], int] = lambda count: count,
    ) -> list[tuple[slice | torch.Tensor, RolloutBatch]]:
        """Trimmed micro-batches of rows of similar length: at most `size` rows and `max_tokens`
        padded tokens each, with the rows (a slice, or an index tensor) each one holds.

        A micro-batch costs rows x (its longest prompt + longest response) tokens, so when the batch
        is cut at all its rows are first ordered by length (verl's dynamic batch size does the same):
        every micro-batch is then padded only to rows like its own. Uncut, the batch is one pass in
        its own order. With a token budget the count depends on the lengths, so `agree` maps this
        rank's count to the count all ranks use (the max over ranks); the most expensive micro-batches
        are then split until there are that many, and every rank runs the same number of
        forward/backward passes. A rank with fewer rows than that count (it forwards only its kept
        samples) fills up with row 0 under an all-zero loss mask (slice(0, 0): it maps to no row).

        Args:
            size: rows per micro-batch (None: no row limit).
            max_tokens: padded tokens per micro-batch (None: no token limit); a single row over
                the budget still forms its own micro-batch.
            agree: this rank's count -> the count every rank uses.
        """
        n = len(self)
        size = n if size is None or size <= 0 else size
        p_len, r_len = self.prompt_mask.sum(1).tolist(), self.response_mask.sum(1).tolist()  # (N,) real tokens
        order = sorted(range(n), key=lambda i: (p_len[i] + r_len[i], r_len[i]))  # shortest first, stable

        def cost(a: int, b: int) -> int:  # padded tokens of the sorted rows a..b-1
            rows = order[a:b]
            return (b - a) * (max(p_len[i] for i in rows) + max(r_len[i] for i in rows))

        bounds, start, widest = [], 0, (0, 0)  # widest: longest prompt, response of the open slice
        for end in range(1, n + 1):
            i = order[end - 1]
            grown = (max(widest[0], p_len[i]), max(widest[1], r_len[i]))
            over = max_tokens is not None and (end - start) * sum(grown) > max_tokens
            if end - start > 1 and (end - start > size or over):
                bounds.append((start, end - 1))
                start, grown = end - 1, (p_len[i], r_len[i])
            widest = grown
        bounds.append((start, n))
        target = agree(len(bounds))
        while len(bounds) < target and any(b - a > 1 for a, b in bounds):  # split the costliest multi-row slice
            i = max((k for k, (a, b) in enumerate(bounds) if b - a > 1), key=lambda k: cost(*bounds[k]))
            a, b = bounds[i]
            bounds[i : i + 1] = [(a, (a + b) // 2), ((a + b) // 2, b)]
        if len(bounds) == 1:
            out = [(slice(0, n), self.select(slice(0, n)))]
        else:
            index = torch.tensor(order, dtype=torch.long)  # (N,) rows by length
            out = [(index[a:b], self.select(index[a:b])) for a, b in bounds]
        if len(out) < target:  # lockstep filler: a forward/backward pass that learns nothing
            filler = self.select(slice(0, 1))
            if filler.loss_mask is not None:
                filler = replace(filler, loss_mask=torch.zeros_like(filler.loss_mask))
            out += [(slice(0, 0), filler)] * (target - len(out))
        return out


def keep_rollout_dtypes(plugin) -> None:
    """Let `RolloutBatch`es pass the precision plugin's `convert_input` unchanged.

    Lightning casts every batch before the step (`trainer.precision_plugin.convert_input`, loops/
    training_epoch_loop.py and evaluation_loop.py), and `DeepSpeedPrecision.convert_input` (also
    HalfPrecision, FSDPPrecision at "-true", DoublePrecision) casts every floating tensor, into
    dataclasses: rewards, advantages and the engine's log-probs would become bf16 (the mismatch
    log-ratio off by ~|logp| * 2^-9). A rollout batch holds integer ids for the model and float32
    bookkeeping that must stay float32; the model's compute dtype is set by the policy itself.
    """
    convert = plugin.convert_input
    if getattr(convert, "keeps_rollout_dtypes", False):
        return

    def convert_input(data):
        return data if isinstance(data, RolloutBatch) else convert(data)

    convert_input.keeps_rollout_dtypes = True
    plugin.convert_input = convert_input  # an instance attribute shadows the class method


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


def take_groups(batch: RolloutBatch, groups: Sequence[int]) -> RolloutBatch:
    """Groups `groups` (indices into the B groups, in that order) of a batch, at its full widths.

    Stats are kept as they are and padding prompts dropped: the caller knows what the rows mean.
    """
    g = batch.group_size
    rows = torch.tensor([i * g + j for i in groups for j in range(g)], dtype=torch.long)  # (n,) n = len(groups) * G
    tensors = batch.tensors_at(rows)
    pick = rows.tolist()
    return replace(
        batch,
        **tensors,
        texts=[batch.texts[i] for i in pick] if batch.texts else [],
        has_answer=[batch.has_answer[i] for i in pick] if batch.has_answer else [],
        sources=[batch.sources[i] for i in pick] if batch.sources else [],
        seeds=[batch.seeds[i] for i in pick] if batch.seeds else [],
        padding_prompts=0,
    )


def concat_batches(batches: Sequence[RolloutBatch], pad: int) -> RolloutBatch:
    """Batches of one group size stacked row-wise, groups kept contiguous and in order.

    Prompts are left-padded and responses right-padded with `pad` (masks and response-aligned
    tensors with 0) to the widest part. A `sample_mask` missing from some parts counts as all
    True there; any other optional tensor must be present in all parts or in none. Stats are the
    first part's (the caller merges them).
    """
    g = batches[0].group_size
    if any(b.group_size != g for b in batches):
        raise ValueError(f"cannot concatenate group sizes {sorted({b.group_size for b in batches})}")
    t_width = max(b.response_ids.shape[1] for b in batches)

    def left(x: torch.Tensor, value: int, width: int) -> torch.Tensor:  # (n, P) -> (n, width)
        return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

    def stack_left(parts: list[torch.Tensor], value: int) -> torch.Tensor:  # left-padded to the widest
        width = max(x.shape[1] for x in parts)
        return torch.cat([left(x, value, width) for x in parts])

    def right(x: torch.Tensor, value: float) -> torch.Tensor:  # (n, T) -> (n, t_width)
        return torch.nn.functional.pad(x, (0, t_width - x.shape[1]), value=value)

    tensors = {
        "prompt_ids": stack_left([b.prompt_ids for b in batches], pad),  # (N, P)
        "prompt_mask": stack_left([b.prompt_mask for b in batches], 0),  # (N, P)
        "response_ids": torch.cat([right(b.response_ids, pad) for b in batches]),  # (N, T)
        "response_mask": torch.cat([right(b.response_mask, 0) for b in batches]),  # (N, T)
        "rewards": torch.cat([b.rewards for b in batches]),  # (N,)
    }
    if any(b.sample_mask is not None for b in batches):
        tensors["sample_mask"] = torch.cat(  # (N,)
            [b.sample_mask if b.sample_mask is not None else torch.ones(len(b), dtype=torch.bool) for b in batches]
        )
    for name in OPTIONAL_ROWS:
        present = [getattr(b, name) is not None for b in batches]
        if name == "sample_mask" or not any(present):
            continue
        if not all(present):
            raise ValueError(f"cannot concatenate batches where only some have {name}")
        parts = [getattr(b, name) for b in batches]
        if name in PART_TENSORS:  # left-padded like the prompt
            tensors[name] = stack_left(parts, pad if name.endswith("_ids") else 0)  # (N, W)
        else:
            tensors[name] = torch.cat([right(x, 0) for x in parts] if name in RESPONSE_ALIGNED else parts)
    return replace(
        batches[0],
        **tensors,
        texts=[t for b in batches for t in b.texts],
        has_answer=[h for b in batches for h in b.has_answer],
        sources=[s for b in batches for s in b.sources],
        seeds=[s for b in batches for s in b.seeds],
        padding_prompts=0,
    )
