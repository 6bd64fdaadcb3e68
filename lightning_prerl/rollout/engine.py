"""The rollout-engine interface: prompts in token ids, G completions per prompt out in token ids.

Engines know nothing of objectives or rewards. The data module calls `sync(policy)` before each
epoch's generation so that the engine samples from exactly the current weights, then `generate`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled.

    Attributes:
        temperature: 0 means greedy.
        top_p: nucleus mass (1.0: off).
        top_k: keep the k most likely tokens (null: off -- true temperature sampling).
        max_new_tokens: completion budget; a completion that hits it has no EOS (truncated).
        seed: base of the per-prompt sampling seeds (null: the data module's seed, i.e. the run's).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    max_new_tokens: int = 128
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling.temperature={self.temperature}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p={self.top_p}: must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens={self.max_new_tokens}: must be >= 1")


@dataclass
class Generation:
    """Completions for a list of prompts: `completions[i * n + j]` is sample j of prompt i.

    Attributes:
        completions: generated token ids, up to and including the first EOS.
        logprobs: the engine's own per-token log-probs of `completions`, when asked for.
    """

    completions: list[list[int]]
    logprobs: list[list[float]] | None = None


class RolloutEngine(Protocol):
    """What the data module needs from a generator."""

    def sync(self, policy: torch.nn.Module) -> None:
        """Make the engine sample from `policy`'s current weights."""

    stop_token_ids: list[int]

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        sampling: SamplingConfig,
        return_logprobs: bool = False,
        seeds: list[int] | None = None,
    ) -> Generation:
        """Sample n completions for each prompt; `seeds` (one per prompt) make them reproducible."""

    def close(self) -> None:
        """Free the engine's resources."""


def cut_at_eos(ids: list[int], eos_ids: set[int], pad_id: int | None) -> list[int]:
    """Tokens up to and including the first EOS; without an EOS, drop trailing padding only."""
    for i, t in enumerate(ids):
        if t in eos_ids:
            return ids[: i + 1]
    if pad_id is not None:
        while ids and ids[-1] == pad_id:
            ids = ids[:-1]
    return ids


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from `parts` (ints, strings), the same in every process and Python session."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
