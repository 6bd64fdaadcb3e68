"""Mechanism (b) on a real model: how one optimizer step moves the log-probability of reflection and
transition openings at held-out thought boundaries (`experiments/probe_smollm2.py`; docs/results/smollm2.md).

A boundary is the end of a sentence or line inside a held-out completion (`boundaries`): the prompt and the
completion up to there are the context, and each opening (`REFLECTION`, `CONTROL`) continues it with the
whitespace the completion had there. `continuation_logprobs` scores log P(opening | context), summed over the
opening's tokens, under the base policy and under each one-step policy; a boundary's change is the mean over
its openings of (after - before), and a problem's the mean over its boundaries. `summarise` bootstraps the
problems (`intervals.over_problems`) and pairs objectives on the same problems (`intervals.paired_difference`).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from lightning_prerl.evaluation import intervals
from lightning_prerl.reproduction.stats import as_dict

# SEAL's openings (conf/behavior/seal.yaml): the reflection keywords and transition keywords a thought starts with
REFLECTION = ["Wait", "Wait, let me check", "Let me check", "Let me verify", "Hold on", "Alternatively", "Another way"]
CONTROL = ["The", "So", "Then", "Now", "Next", "This"]  # execution openings: no reflection or transition keyword
SENTENCE_END = re.compile(r"(?<=[.!?:])[ \t]+|\n+")


def boundaries(text: str) -> list[tuple[int, str]]:
    """(end of the context in `text`, the whitespace that followed) at every sentence or line end that more
    text follows: "12+7=19. The answer is 19." -> [(8, " ")]."""
    return [(m.start(), m.group()) for m in SENTENCE_END.finditer(text) if m.end() < len(text.rstrip())]


@torch.no_grad()
def continuation_logprobs(model, rows: list[tuple[list[int], list[int]]], batch_size: int = 32) -> torch.Tensor:
    """(N,) float64 log P(continuation | context) of each (context ids, continuation ids), summed over the
    continuation's tokens; right-padded batches (a causal model never reads the padding to its right)."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(c) + len(x) for c, x in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T)
        scored = torch.zeros(len(chunk), width, dtype=torch.bool)  # (B, T): continuation positions
        for i, (context, cont) in enumerate(chunk):
            ids[i, : len(context) + len(cont)] = torch.tensor(context + cont)
            mask[i, : len(context) + len(cont)] = 1
            scored[i, len(context) : len(context) + len(cont)] = True
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)  # (B, T, V)
        token = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T-1): log P(ids[t+1] | ids[:t+1])
        out.append((token * scored[:, 1:]).sum(1))  # (B,)
    return torch.cat(out)


def boundary_rows(
    tokenizer, prompt_ids: list[int], completion: str, openings: list[str], limit: int | None = None
) -> list:
    """(context ids, opening ids) for each of the first `limit` (None: every) boundaries of `completion` x
    opening, boundary-major."""
    rows = []
    for end, space in boundaries(completion)[:limit]:
        context = prompt_ids + tokenizer(completion[:end], add_special_tokens=False)["input_ids"]
        rows += [(context, tokenizer(space + o, add_special_tokens=False)["input_ids"]) for o in openings]
    return rows


def per_problem(change: np.ndarray, counts: list[int], openings: int) -> np.ndarray:
    """(P,) mean change per problem from (sum(counts) * openings,) boundary-major changes; `counts[p]`:
    problem p's boundaries (problems with none are left out by the caller)."""
    by_boundary = change.reshape(-1, openings).mean(1)  # (boundaries,)
    return np.array([part.mean() for part in np.split(by_boundary, np.cumsum(counts)[:-1])])  # (P,)


def summarise(changes: dict[str, dict[str, np.ndarray]], pairs: list[tuple[str, str]]) -> dict:
    """Per objective: reflection, control and reflection - control changes (each (P,)) with intervals over
    problems; per (a, b) in `pairs`: b - a of the reflection and of the reflection - control change."""
    out = {}
    for name, c in changes.items():
        out[name] = {k: as_dict(intervals.over_problems(v)) for k, v in c.items()}
    for a, b in pairs:
        out[f"{b}-{a}"] = {
            k: as_dict(intervals.paired_difference(changes[a][k], changes[b][k])) for k in ("reflection", "excess")
        }
    return out
