"""DAPO's training-batch shaping (arXiv 2503.14476): overlong responses and dynamic sampling.

Only training rollouts pass through here; evaluation rewards are never changed.

Overlong responses (`data.overlong`); truncated samples (no stop token) are counted in every mode:
    keep     nothing changes.
    mask     truncated samples keep their reward in their group's advantage but never enter a loss
             (`sample_mask` False): the paper's overlong filtering.
    penalty  the soft overlong punishment (eq. 13) is added to the verifier reward. With
             L = `sampling.max_new_tokens`, C = `overlong_buffer` and f = `overlong_factor`:
             0 for |y| <= L - C, then -(|y| - (L - C)) / C * f, reaching -f at |y| = L.
             As verl's DAPO reward manager, |y| counts the stop token; generation stops at L, so
             eq. 13's third case (|y| > L: -f) is the end of the ramp.

Dynamic sampling (`data.dynamic_sampling`, verl's `filter_groups`): groups whose rewards are all
equal (`flat_groups`) carry no signal and are dropped, and rounds of fresh prompts are generated
until the rank has its b groups or `data.max_extra_rounds` is reached. Departures from verl:
rounds are per rank (b prompts each) and every rank runs the same number of them, because
generation under FSDP runs collectives; past the cap verl raises, here the missing groups are filled
with flat ones that never enter a loss (`sample_mask` False), and counted. As the DAPO recipe
(`filter_groups.metric: acc`), the filter reads the verifier rewards: the overlong penalty alone
does not make a group informative.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from lightning_prerl.data.batch import RolloutBatch, concat_batches, take_groups
from lightning_prerl.objectives.advantages import REWARD_TOLERANCE, flat_groups

OVERLONG_MODES = ("keep", "mask", "penalty")
ADDITIVE_STATS = ("time/", "rollout/reward_errors", "rollout/reward_timeouts")  # summed over rounds


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (eq. 13), to add to the verifier reward.

    Args:
        lengths: (N,) response lengths in tokens, the stop token included.
        max_len: L, the generation budget (`sampling.max_new_tokens`).
        buffer: C, the punishment interval before L (0 < C <= L).
        factor: the punishment at L and beyond.

    Returns:
        (N,) 0 up to L - C tokens, then falling linearly to -factor at L, -factor beyond.
    """
    exceed = lengths.float() - (max_len - buffer)  # (N,) tokens past the expected length
    return (-exceed / buffer * factor).clamp(min=-factor, max=0.0)  # (N,)


@dataclass(frozen=True)
class OverlongShaping:
    """What `data.overlong` does to a training batch (see the module docstring).

    Attributes:
        mode: "keep", "mask" or "penalty".
        max_len: `sampling.max_new_tokens`.
        buffer: `overlong_buffer` (penalty only: 0 < buffer <= max_len).
        factor: `overlong_factor` (>= 0).
    """

    mode: str = "keep"
    max_len: int = 1
    buffer: int | None = None
    factor: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in OVERLONG_MODES:
            raise ValueError(f"data.overlong={self.mode!r}: expected one of {list(OVERLONG_MODES)}")
        if self.factor < 0:
            raise ValueError(f"data.overlong_factor={self.factor}: must be >= 0")
        if self.mode == "penalty" and (self.buffer is None or not 0 < self.buffer <= self.max_len):
            raise ValueError(
                f"data.overlong_buffer={self.buffer}: data.overlong=penalty needs 0 < buffer <= "
                f"data.sampling.max_new_tokens={self.max_len}"
            )

    def _penalty(self, batch: RolloutBatch) -> torch.Tensor:
        return overlong_penalty(batch.response_mask.sum(1), self.max_len, self.buffer, self.factor)  # (N,)

    def verifier_rewards(self, batch: RolloutBatch) -> torch.Tensor:
        """(N,) the rewards of a batch shaped by `apply`, without the overlong penalty."""
        return batch.rewards - self._penalty(batch) if self.mode == "penalty" else batch.rewards

    def apply(self, batch: RolloutBatch, truncated: torch.Tensor) -> RolloutBatch:
        """The batch with its rewards or sample mask shaped; `truncated` (N,) bool: no stop token."""
        if self.mode == "mask":
            keep = ~truncated  # (N,)
            return replace(batch, sample_mask=keep if batch.sample_mask is None else batch.sample_mask & keep)
        if self.mode == "penalty":
            return replace(batch, rewards=batch.rewards + self._penalty(batch))  # (N,)
        return batch

    def stats(self, batch: RolloutBatch, truncated: torch.Tensor, world: int = 1) -> dict[str, float]:
        """`rollout/...` stats of the batch trained on; counts are over all `world` ranks (the
        policy averages stats over ranks)."""
        out = {"rollout/truncated": float(truncated.sum()) / max(1, len(truncated))}
        if self.mode == "mask":
            out["rollout/overlong_masked"] = float(truncated.sum()) * world
        if self.mode == "penalty":
            penalty = self._penalty(batch)  # (N,)
            out["rollout/overlong_penalty"] = penalty.mean().item()
            out["rollout/verifier_reward_mean"] = self.verifier_rewards(batch).mean().item()
        return out


def sample_informative(
    first: RolloutBatch,
    next_round: Callable[[int], RolloutBatch],
    max_extra_rounds: int,
    any_short: Callable[[bool], bool] = lambda short: short,
    world: int = 1,
    pad: int = 0,
    scores: Callable[[RolloutBatch], torch.Tensor] = lambda batch: batch.rewards,
) -> RolloutBatch:
    """This rank's b groups with a learning signal, drawing extra rounds while any rank is short.

    Args:
        first: the step's main round of b groups, scored and shaped.
        next_round: round r (1, 2, ...) -> that round's b fresh groups, scored and shaped.
        max_extra_rounds: the cap on extra rounds.
        any_short: this rank is short -> is any rank short (the same answer on every rank, so all
            run the same rounds).
        world: ranks; counts in the stats are over all of them.
        pad: the pad token id.
        scores: batch -> (N,) the rewards whose flat groups are dropped (the verifier's).

    Returns:
        b groups: the first b informative ones in generation order, then, if the cap left the rank
        short, flat fill groups with `sample_mask` False. Its stats: the first round's, times and
        reward errors summed over rounds, plus `rollout/filtered_groups` (flat groups found),
        `extra_prompts`, `extra_rounds`, `unfilled_groups` (fill groups) and `reward_mean_generated`.
    """
    g = first.group_size
    b = len(first) // g
    rounds, informative, flat = [first], [], []  # flat / informative: (round, group) in generation order

    def sort(r: int) -> None:
        is_flat = flat_groups(scores(rounds[r]).view(-1, g), REWARD_TOLERANCE).tolist()  # (b,)
        for i, f in enumerate(is_flat):
            (flat if f else informative).append((r, i))

    sort(0)
    while len(rounds) - 1 < max_extra_rounds and any_short(len(informative) < b):
        rounds.append(next_round(len(rounds)))
        sort(len(rounds) - 1)
    chosen, fill = informative[:b], flat[: max(0, b - len(informative))]
    parts = [take_groups(batch, [i for rr, i in chosen if rr == r]) for r, batch in enumerate(rounds)]
    for r, batch in enumerate(rounds):
        part = take_groups(batch, [i for rr, i in fill if rr == r])
        parts.append(replace(part, sample_mask=torch.zeros(len(part), dtype=torch.bool)))  # (n,) never in a loss
    out = concat_batches([p for p in parts if len(p)], pad)
    stats = dict(first.stats)
    for key in stats:
        if key.startswith(ADDITIVE_STATS):
            stats[key] = float(sum(batch.stats.get(key, 0.0) for batch in rounds))
    stats.update(
        {
            "rollout/filtered_groups": float(len(flat) * world),
            "rollout/extra_prompts": float((len(rounds) - 1) * b * world),
            "rollout/extra_rounds": float(len(rounds) - 1),
            "rollout/unfilled_groups": float(len(fill) * world),
            "rollout/reward_mean_generated": torch.cat([batch.rewards for batch in rounds]).mean().item(),
        }
    )
    return replace(out, stats=stats)
