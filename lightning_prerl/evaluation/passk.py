"""pass@k curves up to large k on the held-out set, before and after training (`callbacks.pass_at_k`).

The regular held-out evaluation draws `data.eval_samples` (2) samples per problem every few steps;
the paper's pass@k plots need many more samples per problem, which is too costly to repeat. This
callback draws `samples` samples for each of the first `problems` held-out problems once when
training starts (the base policy; skipped on a resumed run) and once when it ends, and logs the
unbiased pass@k (Chen et al. 2021) for k = 1, 2, 4, ... up to `samples` as `passk/pass@<k>` against
the optimizer step, through the run's loggers (so the numbers live in `logs/metrics.csv`).
Sampling is the held-out evaluation's (`data.eval_sampling`), seeded per (problem, step).
"""

from __future__ import annotations

import logging
import math
import time

import lightning as L
import torch

from lightning_prerl.evaluation.metrics import pass_at_k
from lightning_prerl.evaluation.scoring import pass_ks

log = logging.getLogger(__name__)
PREFIX = "passk"


def pass_at_ks(correct_counts: list[int], samples: int, ks: list[int]) -> torch.Tensor:
    """(len(ks),) float64 sums over problems of the unbiased pass@k, from per-problem correct counts."""
    return torch.tensor([sum(pass_at_k(samples, c, k) for c in correct_counts) for k in ks], dtype=torch.float64)


class PassAtKCurve(L.Callback):
    """Logs `passk/pass@<k>` (k = 1, 2, 4, ..., `samples`) over the first `problems` held-out problems.

    Every rank draws its share of the problems (padded to equal shares so engines under FSDP stay in
    lockstep; the padding is never counted) and the sums are reduced over ranks.
    """

    def __init__(self, samples: int = 64, problems: int = 32, at_start: bool = True, at_end: bool = True):
        if samples < 1 or problems < 1:
            raise ValueError(f"pass_at_k samples={samples}, problems={problems}: must be >= 1")
        self.samples, self.problems, self.at_start, self.at_end = samples, problems, at_start, at_end

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_start and trainer.global_step == 0:  # a resumed run measured its base policy already
            self.measure(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_end:
            self.measure(trainer)

    def measure(self, trainer: L.Trainer) -> dict[str, float]:
        dm, step, t0 = trainer.datamodule, trainer.global_step, time.perf_counter()
        prompts = dm.eval_prompts[: self.problems]
        if not prompts:
            return {}
        rank, world = dm._rank_world()
        mine = list(range(rank, len(prompts), world))
        share = math.ceil(len(prompts) / world)
        positions = mine + [mine[0] if mine else 0] * (share - len(mine))  # lockstep padding, not counted
        per_call = max(1, dm.eval_prompts_per_batch * dm.eval_samples // self.samples)  # rows per generate call
        ks = pass_ks(self.samples)
        sums, counted = torch.zeros(len(ks), dtype=torch.float64), 0
        for start in range(0, share, per_call):
            chunk = positions[start : start + per_call]
            seeds = dm._seeds(PREFIX, step, chunk)
            batch = dm.make_batch([prompts[j] for j in chunk], self.samples, dm.eval_sampling, seeds)
            correct = (batch.rewards.view(len(chunk), self.samples) > 0.5).sum(1).tolist()  # (chunk,)
            real = max(0, min(len(chunk), len(mine) - start))
            sums += pass_at_ks(correct[:real], self.samples, ks)
            counted += real
        totals = trainer.strategy.reduce(
            torch.cat([sums, torch.tensor([float(counted)], dtype=torch.float64)]), reduce_op="sum"
        )
        values = {f"{PREFIX}/pass@{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(ks)}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
            log.info(
                "pass@k at step %d over %d problems x %d samples (%.0f s): %s",
                step,
                int(totals[-1]),
                self.samples,
                time.perf_counter() - t0,
                ", ".join(f"@{k} {v:.3f}" for k, v in zip(ks, values.values(), strict=True)),
            )
        return values
