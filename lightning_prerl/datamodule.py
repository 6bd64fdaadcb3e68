"""RolloutDataModule: prompts -> rollout engine (current policy) -> rewards -> RolloutBatch.

One training epoch is one rollout batch: B prompts x G samples, generated lazily when the epoch's
loader is iterated, i.e. after the previous optimizer step and with the current weights (the
engine is synced first). Prompt slices are a pure function of the epoch index, the rank and the
world size, so a resumed run draws exactly the prompts it would have drawn. The module never
computes a loss; it hands the policy module a typed batch.

Validation batches are built the same way from the held-out prompts: k samples per prompt,
scored, as `RolloutBatch`es with group size k.
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

from lightning_prerl.batch import RolloutBatch, pad_left, pad_right
from lightning_prerl.prompts import PromptSet, render_prompt
from lightning_prerl.rewards import Prompt, RewardFn, RewardScorer
from lightning_prerl.rollout.engine import RolloutEngine, SamplingConfig

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
        prompts_per_step: B, prompts per rank per rollout batch.
        samples_per_prompt: G.
        sampling: training `SamplingConfig` fields.
        eval_samples: k samples per held-out prompt (avg@k, pass@k).
        eval_sampling: evaluation sampling fields (default: the training ones).
        eval_prompts_per_batch: held-out prompts generated per validation batch.
        reward_timeout_s: per-completion reward limit (None: in-process, no limit).
        max_prompt_tokens: longer prompts are skipped and counted (None: no limit).
        shuffle_seed: seed of the per-pass prompt order (None: file order).
        template_kwargs: extra `apply_chat_template` arguments (e.g. enable_thinking: false).
        name: label of the data set in logs and reports.
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
        max_prompt_tokens: int | None = None,
        shuffle_seed: int | None = 0,
        template_kwargs: dict | None = None,
        name: str = "data",
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
        self.name = name
        self.tokenizer = tokenizer
        self._engine_arg = engine
        self.engine: RolloutEngine | None = None
        self.scorer = RewardScorer(reward, timeout_s=reward_timeout_s)
        self.train_set = PromptSet(train_prompts, shuffle_seed)
        self.eval_prompts = eval_prompts or []
        self.prompts_per_step = prompts_per_step
        self.samples_per_prompt = samples_per_prompt
        self.sampling = SamplingConfig(**(sampling or {}))
        self.eval_sampling = SamplingConfig(**(eval_sampling or asdict(self.sampling)))
        self.eval_samples = eval_samples
        self.eval_prompts_per_batch = eval_prompts_per_batch
        self.max_prompt_tokens = max_prompt_tokens
        self.template_kwargs = template_kwargs or {}
        self._rendered: dict[Prompt, list[int]] = {}
        self._synced_at: int | None = None

    # -- engine -------------------------------------------------------------------------------
    def _get_engine(self) -> RolloutEngine:
        if self.engine is None:
            arg = self._engine_arg
            is_factory = isinstance(arg, type) or not hasattr(arg, "generate")
            self.engine = arg(tokenizer=self.tokenizer) if is_factory else arg
        return self.engine

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

    def make_batch(self, prompts: list[Prompt], n: int, sampling: SamplingConfig) -> RolloutBatch:
        """Generate n samples per prompt with the current policy, decode, score, pack."""
        t0 = time.perf_counter()
        engine = self._get_engine()
        step = self.trainer.global_step if self.trainer is not None else 0
        if self._synced_at != step:  # weights change only at optimizer steps
            engine.sync(self._policy())
            self._synced_at = step
        t_sync = time.perf_counter()
        ids = [self._render(p) for p in prompts]
        skipped = 0
        if self.max_prompt_tokens is not None:
            keep = [i for i, x in enumerate(ids) if len(x) <= self.max_prompt_tokens]
            skipped = len(ids) - len(keep)
            prompts, ids = [prompts[i] for i in keep], [ids[i] for i in keep]
            if not prompts:
                raise RuntimeError(f"every prompt of this batch exceeds max_prompt_tokens={self.max_prompt_tokens}")
        gen = engine.generate(ids, n, sampling)
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
        eos = self.tokenizer.eos_token_id
        truncated = sum(1 for c in gen.completions if not c or c[-1] != eos)
        return RolloutBatch(
            prompt_ids=prompt_ids,
            prompt_mask=prompt_mask,
            response_ids=response_ids,
            response_mask=response_mask,
            rewards=torch.tensor(scored.rewards, dtype=torch.float32),
            group_size=n,
            texts=texts,
            has_answer=scored.has_answer,
            stats={
                "rollout/reward_errors": float(scored.errors),
                "rollout/reward_timeouts": float(scored.timeouts),
                "rollout/skipped_prompts": float(skipped),
                "rollout/truncated": truncated / max(1, len(texts)),
                "time/sync": t_sync - t0,
                "time/generate": t_gen - t_sync,
                "time/score": t_score - t_gen,
            },
        )

    def train_batch(self, epoch: int) -> RolloutBatch:
        """The rollout batch of epoch `epoch` on this rank."""
        rank, world = self._rank_world()
        b = self.prompts_per_step
        prompts = self.train_set.take((epoch * world + rank) * b, b)
        return self.make_batch(prompts, self.samples_per_prompt, self.sampling)

    def _eval_shard(self) -> list[Prompt]:
        rank, world = self._rank_world()
        usable = len(self.eval_prompts) - len(self.eval_prompts) % world
        return self.eval_prompts[:usable][rank::world]

    def eval_batch(self, i: int) -> RolloutBatch:
        chunk = self._eval_shard()[i * self.eval_prompts_per_batch : (i + 1) * self.eval_prompts_per_batch]
        return self.make_batch(chunk, self.eval_samples, self.eval_sampling)

    # -- loaders ------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        # the epoch is read when the batch is built, so the loader is right with or without reloads
        return DataLoader(_Stream(1, lambda _: self.train_batch(self.trainer.current_epoch)), batch_size=None)

    def val_dataloader(self) -> DataLoader:
        batches = math.ceil(len(self._eval_shard()) / self.eval_prompts_per_batch)
        return DataLoader(_Stream(batches, self.eval_batch), batch_size=None)
