"""Hydra multirun sweeps: what each job swept, summaries over seeds, and parallel jobs that stay in their cores.

A job is a directory holding `.hydra/overrides.yaml` (Hydra writes it); its metrics are the CSVLogger's
`logs/metrics.csv`. A configuration is one combination of the swept keys other than `seed`; its
summary is the mean and sample standard deviation (n - 1) over its seeds of each held-out metric's
final value. Plots of these are drawn by `report.py`.
"""

from __future__ import annotations

import csv
import itertools
import logging
import multiprocessing
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.experimental.callback import Callback

from lightning_prerl.data.rewards import machine_cores
from lightning_prerl.evaluation import intervals
from lightning_prerl.reports.logs import read_metrics

SEED_KEY = "seed"
FAILED = "failed.txt"  # in a job's directory: the one line that ended it (`record_failure`)
log = logging.getLogger(__name__)


def record_failure(job_dir: str | Path, exc: BaseException) -> str:
    """Writes why a sweep job ended (one line: a config error's own line, an exit code, or the exception's
    type and first line) to `job_dir/failed.txt`, logs the traceback to the job's log, returns the line."""
    if isinstance(exc, SystemExit):
        line = exc.code if isinstance(exc.code, str) else f"exit code {exc.code}"
    else:
        line = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        log.error("job failed", exc_info=exc)
    line = " ".join(str(line).split())
    Path(job_dir).mkdir(parents=True, exist_ok=True)
    (Path(job_dir) / FAILED).write_text(line + "\n")
    log.error("job failed: %s", line)
    return line


@dataclass
class Job:
    """One run of a sweep: its directory, its overrides and its logged series."""

    dir: Path
    overrides: dict[str, str]
    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    failed: str | None = None  # the line that ended a failed job (`record_failure`)

    def final(self, metric: str) -> float | None:
        """The last logged value of `metric` (None when never logged)."""
        points = self.series.get(metric)
        return points[-1][1] if points else None


@dataclass
class Configuration:
    """Jobs that differ only by seed."""

    values: dict[str, str]
    jobs: list[Job]

    def label(self, names: dict[str, str] | None = None) -> str:
        names = names or {}
        return ", ".join(f"{names.get(k, k)}={v}" for k, v in self.values.items()) or "all jobs"

    def finals(self, metric: str) -> list[float]:
        return [v for v in (job.final(metric) for job in self.jobs) if v is not None]

    def finals_by_seed(self, metric: str) -> dict[str, float]:
        """{seed override: final `metric`} (jobs without a seed override count as seed "")."""
        return {job.overrides.get(SEED_KEY, ""): v for job in self.jobs if (v := job.final(metric)) is not None}


def paired_over_seeds(base: Configuration, other: Configuration, metric: str) -> intervals.Interval:
    """`other` minus `base` in final `metric`, paired by seed (seeds both ran), with a t interval."""
    a, b = base.finals_by_seed(metric), other.finals_by_seed(metric)
    return intervals.over_seeds([b[seed] - a[seed] for seed in a.keys() & b.keys()])


def _override_key(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def read_overrides(job_dir: Path) -> dict[str, str]:
    """{key: value} of a job's command-line overrides (Hydra's own `hydra.*` ones left out)."""
    import yaml

    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    return dict(_override_key(o) for o in overrides if not o.startswith("hydra.") and "=" in o)


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every job directory under `sweep_dir`, in job-number order, with its metrics (if any)."""
    dirs = {p.parent.parent for p in Path(sweep_dir).rglob("overrides.yaml") if p.parent.name == ".hydra"}
    jobs = []
    for d in sorted(dirs, key=lambda d: (len(d.name), d.name)):
        metrics, failed = d / "logs" / "metrics.csv", d / FAILED
        series = read_metrics(metrics) if metrics.is_file() else {}
        jobs.append(Job(d, read_overrides(d), series, failed.read_text().strip() if failed.is_file() else None))
    return jobs


def write_failures(path: Path, jobs: list[Job]) -> Path | None:
    """`sweep_failures.csv`: job directory, overrides and the line that ended each failed job (None: none failed)."""
    failed = [job for job in jobs if job.failed is not None]
    if not failed:
        path.unlink(missing_ok=True)
        return None
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["job", "overrides", "error"])
        for job in failed:
            writer.writerow([job.dir.name, " ".join(f"{k}={v}" for k, v in job.overrides.items()), job.failed])
    return path


def swept_keys(jobs: list[Job], sweep_dir: Path | None = None) -> list[str]:
    """Keys whose value differs between jobs, in the order of the sweep's command line (multirun.yaml)."""
    seen: list[str] = []
    for job in jobs:
        seen += [k for k in job.overrides if k not in seen]
    swept = [k for k in seen if len({job.overrides.get(k) for job in jobs}) > 1]
    order = {k: i for i, k in enumerate(_command_line_keys(sweep_dir))} if sweep_dir else {}
    return sorted(swept, key=lambda k: order.get(k, len(order) + seen.index(k)))


def _command_line_keys(sweep_dir: Path) -> list[str]:
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.is_file():
        return []
    import yaml

    task = ((yaml.safe_load(path.read_text()) or {}).get("hydra") or {}).get("overrides", {}).get("task") or []
    return [_override_key(o)[0] for o in task]


def ordered_values(jobs: list[Job], key: str) -> list[str]:
    """The values `key` takes: numerically sorted when all are numbers, else in order of first use."""
    values = list(dict.fromkeys(job.overrides.get(key, "") for job in jobs))
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def group_configurations(jobs: list[Job], keys: list[str]) -> list[Configuration]:
    """One Configuration per combination of `keys` that some job ran, in grid order."""
    grid = itertools.product(*(ordered_values(jobs, k) for k in keys))
    configs = []
    for combo in grid:
        values = dict(zip(keys, combo, strict=True))
        members = [j for j in jobs if all(j.overrides.get(k, "") == v for k, v in values.items())]
        if members:
            configs.append(Configuration(values, members))
    return configs


def mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None below two values, both None for none."""
    if not xs:
        return None, None
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None


def summary_metrics(jobs: list[Job], metric: str) -> list[str]:
    """`metric` first, then every other aggregate held-out metric (`val/name`) some job logged."""
    logged = {k for job in jobs for k in job.series if k.startswith("val/") and k.count("/") == 1}
    return [metric] + sorted(logged - {metric})


def write_summary(path: Path, configs: list[Configuration], keys: list[str], metrics: list[str], metric: str) -> Path:
    """`sweep_summary.csv`: the swept keys, `seeds` (jobs with a final `metric`), `jobs` (their
    directories), `<m>_mean`, `<m>_std`, `<m>_ci_low`, `<m>_ci_high` (95 % t interval over seeds) of each
    metric's final value, and `<metric>_minus_first` with its interval: the difference to the first
    configuration paired by seed (empty for the first one, or without shared seeds)."""
    stat_names = ("mean", "std", "ci_low", "ci_high")
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        delta = [f"{metric}_minus_first{s}" for s in ("", "_ci_low", "_ci_high")]
        writer.writerow([*keys, "seeds", "jobs", *(f"{m}_{s}" for m in metrics for s in stat_names), *delta])
        for i, config in enumerate(configs):
            stats = []
            for m in metrics:
                finals = config.finals(m)
                ci = intervals.over_seeds(finals)
                stats += [*mean_std(finals), *((ci.low, ci.high) if finals else (None, None))]
            diff = paired_over_seeds(configs[0], config, metric) if i else None
            paired = (diff.estimate, diff.low, diff.high) if diff is not None and diff.n else (None,) * 3
            writer.writerow(
                [
                    *config.values.values(),
                    len(config.finals(metric)),
                    " ".join(job.dir.name for job in config.jobs),
                    *("" if v is None else repr(v) for v in (*stats, *paired)),
                ]
            )
    return path


def short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix that tells each key apart: objective.warmup.coef -> coef."""
    names = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            name = ".".join(parts[-n:])
            if sum(k == name or k.endswith("." + name) for k in keys) == 1:
                break
        names[key] = name
    return names


# -- parallel jobs -----------------------------------------------------------------------------------


def oversubscription(n_jobs: int, threads: int | None, cores: int, omp_env: str | None = None) -> str | None:
    """Why `n_jobs` parallel jobs of `threads` torch threads each would overload `cores` cores (else None).

    `threads=None` keeps torch's default, which follows OMP_NUM_THREADS: joblib's loky workers inherit
    the parent's OMP_NUM_THREADS (`omp_env`) or, unset, get cores // n_jobs (at least 1).
    """
    n = max(cores + 1 + n_jobs, 1) if n_jobs < 0 else n_jobs  # joblib: -1 = every core
    if n > cores:
        return f"hydra.launcher.n_jobs={n_jobs}: {n} jobs at once on {cores} cores; use n_jobs <= {cores}"
    per_job = threads or (int(omp_env) if omp_env else cores // n)
    if n * per_job <= cores:
        return None
    source = f"threads={threads}" if threads else f"OMP_NUM_THREADS={per_job}"
    return (
        f"hydra.launcher.n_jobs={n_jobs} with {source}: {n} jobs x {per_job} threads on {cores} cores; "
        f"use threads <= {cores // n}, or threads=null with OMP_NUM_THREADS unset (each job then gets cores // n_jobs)"
    )


class ParallelJobs(Callback):
    """Hydra callback that keeps parallel sweep jobs (hydra/launcher=joblib) in their cores and working.

    - at the start of a multirun: exits with one line when n_jobs x threads exceeds the cores, and warns
      when vLLM would run on CPU in several jobs at once (each allocates its own KV cache);
    - at the start of each job: a loky worker leaves multiprocessing's start method at "loky", which
      the children it spawns cannot resolve (the reward pool of `data.reward_timeout_s` would respawn
      failing workers forever), so the platform default is restored.
    """

    def on_multirun_start(self, config, **kwargs) -> None:
        n_jobs = config.hydra.launcher.get("n_jobs")
        if n_jobs is None:
            return
        swept = [_override_key(o)[1] for o in config.hydra.overrides.task if _override_key(o)[0] == "threads"]
        threads = [int(t) for v in swept for t in v.split(",") if t not in ("null", "")] or [config.get("threads")]
        cores = machine_cores()
        problem = oversubscription(
            int(n_jobs), max(t or 0 for t in threads) or None, cores, os.environ.get("OMP_NUM_THREADS")
        )
        if problem:
            sys.exit(f"config error: {problem}")
        rollout = str(config.get("rollout", {}).get("_target_", ""))
        if rollout.endswith("VLLMEngine") and config.trainer.get("accelerator") == "cpu" and n_jobs != 1:
            log.warning(
                "vLLM on CPU in parallel jobs: each job allocates its own KV cache (rollout.kv_cache_gib=%s GiB) "
                "and threads; prefer hydra.launcher.n_jobs=1 or rollout=hf for CPU sweeps",
                config.rollout.get("kv_cache_gib"),
            )

    def on_job_start(self, config, **kwargs) -> None:
        if multiprocessing.get_start_method(allow_none=True) in ("loky", "loky_init_main"):
            multiprocessing.set_start_method(None, force=True)
