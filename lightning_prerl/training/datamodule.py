"""RolloutDataModule: prompts -> rollout engine (current policy) -> rewards -> RolloutBatch.

One training epoch is one rollout batch: B prompts x G samples over all ranks, generated lazily
when the epoch's loader is iterated, i.e. after the previous optimizer step and with the current
weights (the engine is synced first). `prompts_per_step` is global: rank r of W takes the r-th of
W equal slices of the epoch's B prompts, so a config means the same on 1 process and on 8 GPUs.
Prompt slices and sampling seeds are pure functions of the position in the prompt stream, so a
resumed run, or the same run on another world size, draws the same prompts and (with the seeded
engines) the same completions. The module never computes a loss; it hands the policy module a
typed batch.

Ranks move in lockstep: prompts longer than `max_prompt_tokens` are dropped once, when the sets
are loaded, by the same rule on every rank (counted and logged); held-out prompts are split so
that each is scored exactly once over all ranks, shorter shards padded with repeats that are
generated (same number of `generate` calls everywhere) but never scored.

Training batches then pass through DAPO's shaping (`shaping.py`): overlong responses masked or
penalised, and with dynamic sampling, flat groups replaced by groups of extra prompts. Extra prompts
come from a second prompt stream, shuffled apart from the main one, at positions that depend only on
(epoch, round, rank), and every rank runs the same number of rounds.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_prerl.data.batch import RolloutBatch, pad_left, pad_right, truncated_flags
from lightning_prerl.data.benchmarks import decontaminate
from lightning_prerl.data.prompts import PartTokens, PromptSet, render_prompt
from lightning_prerl.data.rewards import Prompt, RewardFn, RewardScorer
from lightning_prerl.data.shaping import OverlongShaping, sample_informative
from lightning_prerl.rollout.engine import RolloutEngine, SamplingConfig, derive_seed
from lightning_prerl.training.record import record_batch

log = logging.getLogger(__name__)


class _Stream(IterableDataset):
    """`batches` lazily built batches per pass; `build(i)` makes batch i of the pass."""

    def __init__(self, batches: int, build: Callable[[int], RolloutBatch]):
        self.batches, self.build = batches, build

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[RolloutBatch]:
        for i in range(self.batches):
            yield self.build(i)


class RolloutDataModule(L.LightningDataModule):
    """Streams fresh on-policy rollouts, one batch per epoch.

    Args:
        tokenizer: the policy's tokenizer (chat template, EOS, padding).
        engine: a `RolloutEngine`, or a callable `tokenizer -> RolloutEngine` (Hydra `_partial_`).
        reward: reward callable `(Prompt, completion) -> float`.
        train_prompts: the training problems.
        eval_prompts: held-out problems (None: no validation).
        prompts_per_step: B, prompts per rollout batch over all ranks (must divide by the world size).
        samples_per_prompt: G.
        sampling: training `SamplingConfig` fields.
        eval_samples: k samples per held-out prompt (avg@k, pass@k).
        eval_sampling: evaluation sampling fields (default: the training ones).
        eval_prompts_per_batch: held-out prompts generated per validation batch.
        reward_timeout_s: per-completion reward limit (None: in-process, no limit).
        reward_workers: reward processes when `reward_timeout_s` is set (None: the cores available).
        max_prompt_tokens: longer prompts are dropped at load time and counted (None: no limit).
        decontaminate: benchmark presets whose problems are dropped from the training prompts
            (normalised exact match), counted and logged.
        data_root: where the benchmark files of `decontaminate` live.
        seed: base of the per-prompt sampling seeds (`sampling.seed` overrides it).
        shuffle_seed: seed of the per-pass prompt order (None: file order).
        template_kwargs: extra `apply_chat_template` arguments (e.g. enable_thinking: false).
        name: label of the data set in logs and reports.
        overlong: truncated training samples: "keep", "mask" (never in a loss) or "penalty"
            (DAPO's soft overlong punishment added to the reward).
        overlong_buffer: the punishment interval before `sampling.max_new_tokens` (penalty only).
        overlong_factor: the punishment at `sampling.max_new_tokens`.
        dynamic_sampling: drop groups whose rewards are all equal and generate extra prompts in
            their place (DAPO's dynamic sampling).
        max_extra_rounds: at most this many extra rounds of b prompts per rank and step.
        mini_batches: the policy's PPO mini-batches per pass (`module.mini_batches`): orders each
            rank's prompts so that its i-th mini-batch is its share of the global i-th one.
        record_rollouts: write every training batch to `<run dir>/rollouts/` (`record.py`), for
            `experiments/replay.py`.
        fixed_context: a text tokenised once (no template) for the `fixed` conditioning space.
        context_parts: the prompt parts the batches carry as tokens for the objective's spaces and the
            alignment diagnostic (`batch.PROMPT_PARTS`: question, system, fixed; `compose` derives them
            from the config): each tokenised once per prompt, without the chat template.
    """

    def __init__(
        self,
        tokenizer,
        engine: RolloutEngine | Callable,
        reward: RewardFn,
        train_prompts: list[Prompt],
        eval_prompts: list[Prompt] | None = None,
        prompts_per_step: int = 16,
        samples_per_prompt: int = 8,
        sampling: dict | None = None,
        eval_samples: int = 2,
        eval_sampling: dict | None = None,
        eval_prompts_per_batch: int = 100,
        reward_timeout_s: float | None = None,
        reward_workers: int | None = None,
        max_prompt_tokens: int | None = None,
        shuffle_seed: int | None = 0,
        template_kwargs: dict | None = None,
        decontaminate: list[str] | None = None,
        data_root: str = ".",
        seed: int = 0,
        name: str = "data",
        overlong: str = "keep",
        overlong_buffer: int | None = None,
        overlong_factor: float = 1.0,
        dynamic_sampling: bool = False,
        max_extra_rounds: int = 4,
        mini_batches: int = 1,
        record_rollouts: bool = False,
        fixed_context: str | None = None,
        context_parts: list[str] | None = None,
    ):
        super().__init__()
        for key, value in (
            ("prompts_per_step", prompts_per_step),
            ("samples_per_prompt", samples_per_prompt),
            ("eval_samples", eval_samples),
            ("eval_prompts_per_batch", eval_prompts_per_batch),
        ):
            if value < 1:
                raise ValueError(f"data.{key}={value}: must be >= 1")
        if max_extra_rounds < 0:
            raise ValueError(f"data.max_extra_rounds={max_extra_rounds}: must be >= 0")
        self.name = name
        self.tokenizer = tokenizer
        self._engine_arg = engine
        self.engine: RolloutEngine | None = None
        self.scorer = RewardScorer(reward, timeout_s=reward_timeout_s, workers=reward_workers)
        self.train_prompts, self.shuffle_seed = train_prompts, shuffle_seed
        self.train_set: PromptSet | None = None
        self.extra_set: PromptSet | None = None  # dynamic sampling's extra prompts
        self.eval_prompts = eval_prompts or []
        self.seed = seed
        self.decontaminate, self.data_root = list(decontaminate or []), data_root
        self.prompts_per_step = prompts_per_step
        self.samples_per_prompt = samples_per_prompt
        self.sampling = SamplingConfig(**(sampling or {}))
        self.eval_sampling = SamplingConfig(**(eval_sampling or asdict(self.sampling)))
        self.overlong = OverlongShaping(overlong, self.sampling.max_new_tokens, overlong_buffer, overlong_factor)
        self.dynamic_sampling, self.max_extra_rounds = dynamic_sampling, max_extra_rounds
        self.mini_batches, self.record_rollouts = mini_batches, record_rollouts
        self.eval_samples = eval_samples
        self.eval_prompts_per_batch = eval_prompts_per_batch
        self.max_prompt_tokens = max_prompt_tokens
        self.template_kwargs = template_kwargs or {}
        self._rendered: dict[Prompt, list[int]] = {}
        self.part_tokens = PartTokens(tokenizer, context_parts or [], fixed_context)
        self.dropped_prompts = {"train": 0, "eval": 0, "contaminated": 0}
        self._synced_at: int | None = None

    # -- engine -------------------------------------------------------------------------------
    def _get_engine(self) -> RolloutEngine:
        if self.engine is None:
            arg = self._engine_arg
            is_factory = isinstance(arg, type) or not hasattr(arg, "generate")
            self.engine = arg(tokenizer=self.tokenizer) if is_factory else arg
        return self.engine

    def setup(self, stage: str) -> None:
        """Check the global batch against the world size; drop over-long prompts (same on every rank);
        size the reward pool for the ranks on this node."""
        _, world = self._rank_world()
        if self.trainer is not None:  # reward processes: this rank's share of the node's cores
            self.scorer.ranks_per_node = getattr(self.trainer, "num_devices", None)
        if self.prompts_per_step % (world * self.mini_batches):
            raise ValueError(
                f"data.prompts_per_step={self.prompts_per_step} does not divide by the world size {world} x "
                f"module.mini_batches={self.mini_batches}: it is the global number of prompts per step, split "
                f"evenly over ranks and mini-batches"
            )
        self._load_prompts()

    def _load_prompts(self) -> None:
        if self.train_set is None:
            kept = decontaminate(self.train_prompts, self.decontaminate, self.data_root)
            self.dropped_prompts["contaminated"] = len(self.train_prompts) - len(kept)
            self.train_prompts = self._length_filter(kept, "train")
            self.eval_prompts = self._length_filter(self.eval_prompts, "eval")
            self.train_set = PromptSet(self.train_prompts, self.shuffle_seed)
            self.extra_set = PromptSet(self.train_prompts, derive_seed(self.shuffle_seed, "train_extra"))

    def _length_filter(self, prompts: list[Prompt], split: str) -> list[Prompt]:
        if self.max_prompt_tokens is None or not prompts:
            return prompts
        kept = [p for p in prompts if len(self._render(p)) <= self.max_prompt_tokens]
        self.dropped_prompts[split] = len(prompts) - len(kept)
        if self.dropped_prompts[split]:
            log.info(
                "%s: %d of %d %s prompts are longer than data.max_prompt_tokens=%d and are dropped",
                self.name,
                self.dropped_prompts[split],
                len(prompts),
                split,
                self.max_prompt_tokens,
            )
        if not kept:
            raise ValueError(f"data.max_prompt_tokens={self.max_prompt_tokens}: every {split} prompt is longer")
        return kept

    def teardown(self, stage: str) -> None:
        self.scorer.close()

    def _policy(self) -> torch.nn.Module:
        return self.trainer.lightning_module.policy

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    # -- batches ------------------------------------------------------------------------------
    def _render(self, prompt: Prompt) -> list[int]:
        if prompt not in self._rendered:
            self._rendered[prompt] = render_prompt(self.tokenizer, prompt, self.template_kwargs)
        return self._rendered[prompt]

    def _seeds(self, purpose: str, step: int, positions: list[int]) -> list[int]:
        """Per-prompt sampling seeds from (base seed, purpose, step, position in the prompt stream)."""
        base = self.sampling.seed if self.sampling.seed is not None else self.seed
        return [derive_seed(base, purpose, step, pos) for pos in positions]

    def make_batch(
        self,
        prompts: list[Prompt],
        n: int,
        sampling: SamplingConfig,
        seeds: list[int],
        padding_prompts: int = 0,
        logprobs: bool = False,
    ) -> RolloutBatch:
        """Generate n samples per prompt with the current policy, decode, score, pack; `logprobs`: keep
        the engine's sampling log-probs when it returns them (`rollout.return_logprobs`)."""
        t0 = time.perf_counter()
        engine = self._get_engine()
        step = self.trainer.global_step if self.trainer is not None else 0
        if self._synced_at != step:  # weights change only at optimizer steps
            engine.sync(self._policy())
            self._synced_at = step
        t_sync = time.perf_counter()
        ids = [self._render(p) for p in prompts]
        gen = engine.generate(ids, n, sampling, logprobs and getattr(engine, "return_logprobs", False), seeds)
        t_gen = time.perf_counter()
        texts = self.tokenizer.batch_decode(gen.completions, skip_special_tokens=True)
        repeated = [p for p in prompts for _ in range(n)]
        scored = self.scorer.score(repeated, texts)
        for msg in scored.messages[:3]:
            log.warning("reward failed on a completion (scored 0): %s", msg)
        t_score = time.perf_counter()
        pad = self.tokenizer.pad_token_id
        prompt_ids, prompt_mask = pad_left([x for x in ids for _ in range(n)], pad)
        response_ids, response_mask = pad_right(gen.completions, pad)
        truncated = sum(truncated_flags(response_ids, response_mask, engine.stop_token_ids))
        engine_logp = None
        if gen.logprobs is not None:
            engine_logp = torch.zeros(response_ids.shape)  # (N, T), 0 on padding
            for i, row in enumerate(gen.logprobs):
                engine_logp[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            rewards=torch.tensor(scored.rewards, dtype=torch.float32),
            group_size=n,
            texts=texts,
            has_answer=scored.has_answer,
            sources=[p.source for p in repeated],
            seeds=[s for s in seeds for _ in range(n)],
            padding_prompts=padding_prompts,
            rollout_logprobs=engine_logp,
            **self.part_tokens.tensors(prompts, n),
            stats={
                "rollout/reward_errors": float(scored.errors),
                "rollout/reward_timeouts": float(scored.timeouts),
                "rollout/dropped_prompts": float(self.dropped_prompts["train"]),
                "rollout/truncated": truncated / max(1, len(texts)),
                "rollout/oom_splits": float(getattr(self.engine, "oom_splits", 0)),
                "time/sync": t_sync - t0,
                "time/generate": t_gen - t_sync,
                "time/score": t_score - t_gen,
            },
        )

    def train_batch(self, epoch: int) -> RolloutBatch:
        """This rank's slice of the global rollout batch of epoch `epoch`, shaped for training."""
        world = self._rank_world()[1]
        batch = self._train_round(*self.train_request(epoch))
        if self.dynamic_sampling:
            batch = sample_informative(
                batch,
                lambda r: self._extra_round(epoch, r),
                self.max_extra_rounds,
                self._any_rank,
                world,
                self.tokenizer.pad_token_id,
                self.overlong.verifier_rewards,
            )
        batch.stats.update(self.overlong.stats(batch, self._truncated(batch), world))
        return batch

    def train_request(self, epoch: int) -> tuple[list[Prompt], list[int]]:
        """This rank's prompts of epoch `epoch` and their sampling seeds."""
        self._load_prompts()
        rank, world = self._rank_world()
        positions, per_mini = self.train_positions(epoch, rank, world), self._per_mini(world)
        prompts = [p for start in positions[::per_mini] for p in self.train_set.take(start, per_mini)]
        return prompts, self._seeds("train", 0, positions)

    def _per_mini(self, world: int) -> int:
        return self.prompts_per_step // world // self.mini_batches

    def train_positions(self, epoch: int, rank: int, world: int) -> list[int]:
        """Positions in the prompt stream of rank `rank`'s prompts in epoch `epoch`.

        The epoch owns positions [epoch * B, (epoch + 1) * B). With M = `mini_batches` PPO mini-batches,
        global mini-batch i is the i-th run of B / M positions and rank r takes the r-th of W equal
        slices of each: the rank's mini-batch i is its share of global mini-batch i, so every update
        sees the same prompts on any world size (M = 1: the r-th of W slices of the epoch).
        """
        per_mini, step = self._per_mini(world), self.prompts_per_step // self.mini_batches
        firsts = [epoch * self.prompts_per_step + i * step + rank * per_mini for i in range(self.mini_batches)]
        return [first + j for first in firsts for j in range(per_mini)]

    def extra_positions(self, epoch: int, round: int) -> list[int]:
        """Positions in the extra prompt stream of this rank's extra round `round` (1, 2, ...) of
        epoch `epoch`: each (epoch, round) owns a block of `prompts_per_step` positions, split over
        ranks like the main stream, so extra prompts never depend on a resume or on other epochs."""
        rank, world = self._rank_world()
        b = self.prompts_per_step // world
        start = (epoch * self.max_extra_rounds + round - 1) * self.prompts_per_step + rank * b
        return list(range(start, start + b))

    def _extra_round(self, epoch: int, round: int) -> RolloutBatch:
        positions = self.extra_positions(epoch, round)
        prompts = self.extra_set.take(positions[0], len(positions))
        return self._train_round(prompts, self._seeds("train_extra", 0, positions))

    def _train_round(self, prompts: list[Prompt], seeds: list[int]) -> RolloutBatch:
        batch = self.make_batch(prompts, self.samples_per_prompt, self.sampling, seeds, logprobs=True)
        return self.overlong.apply(batch, self._truncated(batch))

    def _truncated(self, batch: RolloutBatch) -> torch.Tensor:
        """(N,) bool: samples that ended without a stop token."""
        flags = truncated_flags(batch.response_ids, batch.response_mask, self._get_engine().stop_token_ids)
        return torch.tensor(flags, dtype=torch.bool)

    def _any_rank(self, short: bool) -> bool:
        """Is any rank short of informative groups? The same answer on every rank (lockstep)."""
        if self._rank_world()[1] == 1:
            return short
        flag = torch.tensor(float(short), device=self.trainer.strategy.root_device)
        return bool(self.trainer.strategy.reduce(flag, reduce_op="max") > 0)

    def _eval_shard(self) -> tuple[list[int], int]:
        """Indices of this rank's held-out prompts (every prompt once over all ranks) and how many
        trailing ones are repeats that only keep the shards equally long."""
        self._load_prompts()
        rank, world = self._rank_world()
        mine = list(range(rank, len(self.eval_prompts), world))
        per_rank = math.ceil(len(self.eval_prompts) / world)
        padding = per_rank - len(mine)
        return mine + [mine[0] if mine else 0] * padding, padding

    def eval_batch(self, i: int) -> RolloutBatch:
        shard, padding = self._eval_shard()
        size = self.eval_prompts_per_batch
        chunk = shard[i * size : (i + 1) * size]
        pad_here = min(len(chunk), max(0, i * size + len(chunk) - (len(shard) - padding)))  # padding ends the shard
        step = self.trainer.global_step if self.trainer is not None else 0
        prompts = [self.eval_prompts[j] for j in chunk]
        seeds = self._seeds("eval", step, chunk)
        return self.make_batch(prompts, self.eval_samples, self.eval_sampling, seeds, pad_here)

    # -- loaders ------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        # the epoch is read when the batch is built, so the loader is right with or without reloads
        return DataLoader(_Stream(1, lambda _: self._epoch_batch(self.trainer.current_epoch)), batch_size=None)

    def _epoch_batch(self, epoch: int) -> RolloutBatch:
        batch = self.train_batch(epoch)
        if self.record_rollouts:
            record_batch(self, batch, epoch)
        return batch

    def val_dataloader(self) -> DataLoader:
        batches = math.ceil(len(self._eval_shard()[0]) / self.eval_prompts_per_batch)
        return DataLoader(_Stream(batches, self.eval_batch), batch_size=None)
