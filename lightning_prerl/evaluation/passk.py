"""pass@k curves up to large k on the held-out set, before and after training (`callbacks.pass_at_k`).

The regular held-out evaluation draws `data.eval_samples` (2) samples per problem every few steps;
the paper's pass@k plots need many more samples per problem, which is too costly to repeat. This
callback draws `samples` samples for each of the first `problems` held-out problems once when
training starts (the base policy; skipped on a resumed run) and once when it ends, and logs the
unbiased pass@k (Chen et al. 2021) for k = 1, 2, 4, ... up to `samples` as `passk/pass@<k>` against
the optimizer step, through the run's loggers (so the numbers live in `logs/metrics.csv`).
Sampling is the held-out evaluation's (`data.eval_sampling`), seeded per (problem, step). `prompts` (a
list, e.g. a `toy_prompts` node) measures its own held-out set instead of the first `problems` of
`data.eval_prompts`: a large final set beside a small, cheap one for the every-few-steps curve.

Every measurement also appends one row per problem to `<CSV log dir>/passk_problems.csv` (PROBLEM_FIELDS:
step, held-out position, samples, correct samples, transition and reflection thoughts summed over the
samples, SEAL's classifier): the per-problem results the reproduction report bootstraps over problems
and seeds. The file is rewritten whole through `atomic.write_text`, so a kill leaves the previous one.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_prerl import atomic
from lightning_prerl.evaluation.metrics import SEAL_REFLECTION, SEAL_TRANSITION, ThoughtCounts, pass_at_k
from lightning_prerl.evaluation.scoring import pass_ks

log = logging.getLogger(__name__)
PREFIX = "passk"
PROBLEMS_FILE = "passk_problems.csv"
PROBLEM_FIELDS = ["step", "problem", "samples", "correct", "transition_thoughts", "reflection_thoughts"]


def pass_at_ks(correct_counts: list[int], samples: int, ks: list[int]) -> torch.Tensor:
    """(len(ks),) float64 sums over problems of the unbiased pass@k, from per-problem correct counts."""
    return torch.tensor([sum(pass_at_k(samples, c, k) for c in correct_counts) for k in ks], dtype=torch.float64)


class PassAtKCurve(L.Callback):
    """Logs `passk/pass@<k>` (k = 1, 2, 4, ..., `samples`) over the first `problems` held-out problems.

    Every rank draws its share of the problems (padded to equal shares so engines under FSDP stay in
    lockstep; the padding is never counted) and the sums are reduced over ranks.
    """

    def __init__(
        self,
        samples: int = 64,
        problems: int = 32,
        at_start: bool = True,
        at_end: bool = True,
        prompts: list | None = None,
    ):
        if samples < 1 or problems < 1:
            raise ValueError(f"pass_at_k samples={samples}, problems={problems}: must be >= 1")
        self.samples, self.problems, self.at_start, self.at_end = samples, problems, at_start, at_end
        self.prompts = list(prompts) if prompts is not None else None  # None: the data module's held-out set

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_start and trainer.global_step == 0:  # a resumed run measured its base policy already
            self.measure(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.at_end:
            self.measure(trainer)

    def measure(self, trainer: L.Trainer) -> dict[str, float]:
        dm, step, t0 = trainer.datamodule, trainer.global_step, time.perf_counter()
        prompts = (dm.eval_prompts if self.prompts is None else self.prompts)[: self.problems]
        if not prompts:
            return {}
        rank, world = dm._rank_world()
        mine = list(range(rank, len(prompts), world))
        share = math.ceil(len(prompts) / world)
        positions = mine + [mine[0] if mine else 0] * (share - len(mine))  # lockstep padding, not counted
        per_call = max(1, dm.eval_prompts_per_batch * dm.eval_samples // self.samples)  # rows per generate call
        ks = pass_ks(self.samples)
        sums, counted = torch.zeros(len(ks), dtype=torch.float64), 0
        seal, rows = ThoughtCounts(SEAL_TRANSITION, SEAL_REFLECTION), []  # rows: this rank's problems
        for start in range(0, share, per_call):
            chunk = positions[start : start + per_call]
            seeds = dm._seeds(PREFIX, step, chunk)
            batch = dm.make_batch([prompts[j] for j in chunk], self.samples, dm.eval_sampling, seeds)
            correct = (batch.rewards.view(len(chunk), self.samples) > 0.5).sum(1).tolist()  # (chunk,)
            real = max(0, min(len(chunk), len(mine) - start))
            sums += pass_at_ks(correct[:real], self.samples, ks)
            counted += real
            for i in range(real):
                kinds = [k for t in batch.texts[i * self.samples : (i + 1) * self.samples] for k in seal.classify(t)]
                rows.append(
                    [step, chunk[i], self.samples, correct[i], kinds.count("transition"), kinds.count("reflection")]
                )
        totals = trainer.strategy.reduce(
            torch.cat([sums, torch.tensor([float(counted)], dtype=torch.float64)]), reduce_op="sum"
        )
        values = {f"{PREFIX}/pass@{k}": (totals[i] / totals[-1]).item() for i, k in enumerate(ks)}
        rows = _gathered(trainer, rows, share)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=step)
            _append_problems(trainer, rows)
            log.info(
                "pass@k at step %d over %d problems x %d samples (%.0f s): %s",
                step,
                int(totals[-1]),
                self.samples,
                time.perf_counter() - t0,
                ", ".join(f"@{k} {v:.3f}" for k, v in zip(ks, values.values(), strict=True)),
            )
        return values


def _gathered(trainer: L.Trainer, rows: list[list[int]], share: int) -> list[list[int]]:
    """Every rank's per-problem rows (on every rank), in held-out order; padded to `share` rows per rank."""
    if trainer.world_size == 1:
        return rows
    mine = torch.full(
        (share, len(PROBLEM_FIELDS)), -1, dtype=torch.long, device=trainer.strategy.root_device
    )  # (share, F); -1: padding
    if rows:
        mine[: len(rows)] = torch.tensor(rows, dtype=torch.long, device=mine.device)
    every = trainer.strategy.all_gather(mine).reshape(-1, len(PROBLEM_FIELDS))  # (world * share, F)
    return sorted((r for r in every.tolist() if r[0] >= 0), key=lambda r: r[1])


def _append_problems(trainer: L.Trainer, rows: list[list[int]]) -> Path | None:
    """Append `rows` to the CSV logger's `passk_problems.csv` (rewritten whole, atomically)."""
    logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    if logger is None:
        return None
    path = Path(logger.log_dir) / PROBLEMS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.is_file() else ",".join(PROBLEM_FIELDS) + "\n"
    return atomic.write_text(path, old + "".join(",".join(map(str, r)) + "\n" for r in rows))
