"""Callbacks and logging: end-of-run export, report and summary, a CSV logger that survives resumes (the
DSRL objective switch lives in `dsrl.py`, resume state in `checkpoints.py`)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

from lightning_prerl.reports.plots import plot_run
from lightning_prerl.reports.summary import build_summary, print_summary, write_summary
from lightning_prerl.scale.models import export_policy
from lightning_prerl.training.dsrl import PhaseSchedule

log = logging.getLogger(__name__)


class ExportPolicy(L.Callback):
    """At the end of fit, `save_pretrained` the policy and tokenizer into `out_dir` (written by rank 0).

    The weights are written in the run's `model.dtype` (bf16 for the GPU presets), not in the
    float32 of the master weights.
    """

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        dtype = pl_module.hparams.get("dtype")
        export_policy(pl_module.policy, pl_module.tokenizer, self.out_dir, write=trainer.is_global_zero, dtype=dtype)
        if trainer.is_global_zero:
            log.info("policy exported to %s", self.out_dir)


def csv_logger(trainer: L.Trainer) -> CSVLogger | None:
    """The run's CSV logger (its `log_dir` holds metrics.csv and the diagnostics' per-sample files)."""
    return next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)


def saved_metrics(trainer: L.Trainer, purpose: str) -> Path | None:
    """On rank 0, the CSV logger's metrics.csv flushed to disk; None elsewhere, or (with a warning
    naming `purpose`) when no CSV logger is configured or it wrote nothing."""
    if not trainer.is_global_zero:
        return None
    logger = csv_logger(trainer)
    if logger is None:
        log.warning("no CSVLogger configured: no %s", purpose)
        return None
    logger.save()
    metrics = Path(logger.log_dir) / "metrics.csv"
    return metrics if metrics.is_file() else None


class RunReport(L.Callback):
    """At the end of fit, draw the run's PNG report from the CSV logger's metrics (rank 0)."""

    def __init__(self, out_png: str, title: str = ""):
        self.out_png = Path(out_png)
        self.title = title

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        metrics = saved_metrics(trainer, "run report")
        if metrics is not None:
            plot_run(metrics, self.out_png, self.title)
            log.info("run report: %s", self.out_png)


def _name_phases(phases: list[dict], trainer: L.Trainer) -> None:
    """Each phase's name and objective beside the start step the metrics logged for it."""
    schedule = next((cb for cb in trainer.callbacks if isinstance(cb, PhaseSchedule)), None)
    for phase in phases if schedule is not None else []:
        if phase["phase"] < len(schedule.phases):
            phase["name"] = schedule.phase_names[phase["phase"]]
            phase["objective"] = schedule.phases[phase["phase"]].objective.name


class RunSummary(L.Callback):
    """At the end of fit, print the run summary and write it as `run_dir/summary.json` (rank 0).

    Built from the CSV logger's metrics.csv (`summary.py`). Listed after `export` and `report` in
    conf/config.yaml, so the policy and report it points at are written by then.
    """

    def __init__(self, run_dir: str):
        self.run_dir = Path(run_dir)

    def on_fit_end(self, trainer: L.Trainer, pl_module) -> None:
        metrics = saved_metrics(trainer, "run summary")
        if metrics is None:
            return
        out = self.run_dir / "summary.json"
        summary = build_summary(metrics, {**self._artefacts(trainer), "metrics": str(metrics), "summary": str(out)})
        summary["optimizer_steps"] = trainer.global_step
        _name_phases(summary["phases"], trainer)
        write_summary(summary, out)
        # the progress bar's live display stops at teardown, after on_fit_end: stopped later, Rich
        # draws its last frame again below the summary. Its teardown stops it now (idempotent).
        if trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.teardown(trainer, pl_module, "fit")
        print_summary(summary)

    def _artefacts(self, trainer: L.Trainer) -> dict[str, str]:
        """{what: path} of the outputs this run left on disk."""
        found = {"run_dir": self.run_dir}
        for cb in trainer.callbacks:
            if isinstance(cb, ExportPolicy):
                found["policy"] = cb.out_dir
            elif isinstance(cb, RunReport):
                found["report"] = cb.out_png
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            found["checkpoints"] = Path(trainer.checkpoint_callback.dirpath)
        for lg in trainer.loggers:
            if isinstance(lg, TensorBoardLogger):
                found["tensorboard"] = Path(lg.log_dir)
            elif isinstance(lg, WandbLogger) and lg.save_dir:
                found["wandb"] = Path(lg.save_dir) / "wandb"
        return {what: str(path) for what, path in found.items() if path.exists()}


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger, except that a run resumed in its own directory keeps its history.

    CSVLogger deletes an existing metrics.csv when it starts. `resume_from(step)` keeps the rows the
    interrupted run logged before the checkpointed step and drops the rest (the checkpoint of step k
    is written before step k's evaluation and step k+1's training, which the resumed run logs again).
    So an interrupted and resumed run ends with the same metrics.csv as an uninterrupted one, bar the
    wall-clock `time/*` columns.
    """

    _kept: list[dict] | None = None

    def resume_from(self, step: int) -> None:
        path = Path(self.log_dir) / "metrics.csv"
        if not path.is_file():
            return
        with open(path, newline="") as fh:
            self._kept = [row for row in csv.DictReader(fh) if int(row["step"]) < step]

    @property
    def experiment(self):
        writer = super().experiment
        if self._kept:
            kept, self._kept = self._kept, None
            writer.metrics_keys = sorted({k for row in kept for k in row})
            writer.metrics = [{k: v for k, v in row.items() if v not in ("", None)} for row in kept]
            writer.save()
        return writer
