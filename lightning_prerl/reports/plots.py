"""PNG reports: one run's curves from its metrics CSV; a sweep's heatmap, curves and behaviour over seeds.

`write_sweep_report` is what the `SweepReport` Hydra callback runs when a multirun ends, and what
`experiments/report.py <sweep dir>` reruns; the jobs and their summaries come from `sweep.py`.
"""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path

from hydra.experimental.callback import Callback

from lightning_prerl.evaluation import intervals
from lightning_prerl.reports.logs import read_metrics
from lightning_prerl.reports.sweep import (
    SEED_KEY,
    Configuration,
    Job,
    find_jobs,
    group_configurations,
    mean_std,
    ordered_values,
    short_names,
    summary_metrics,
    swept_keys,
    write_failures,
    write_summary,
)

PANELS = [
    ("Reward (rollouts)", ["rollout/reward_mean", "rollout/mixed_groups"]),
    ("Held-out accuracy", ["val/accuracy", "val/pass@1", "val/pass@2", "val/pass@4", "val/pass@8"]),
    ("Format validity", ["rollout/format_valid", "val/format_valid"]),
    ("Response length (tokens)", ["rollout/response_length", "val/response_length"]),
    (
        "Behaviour: share of responses",
        ["rollout/reflection_rate", "rollout/transition_rate", "val/reflection_rate", "val/transition_rate"],
    ),
    ("Seconds per step", ["time/generate", "time/score", "time/train", "time/sync"]),
]


def _phase_switches(series) -> list[float]:
    phase = series.get("objective/phase", [])
    return [s for (s, v), (_, prev) in zip(phase[1:], phase[:-1], strict=False) if v != prev]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(metrics_csv: Path, out_png: Path, title: str = "") -> Path:
    """Six panels over optimizer steps, with the DSRL phase switch drawn as a vertical line."""
    plt = _pyplot()
    series = read_metrics(metrics_csv)
    switches = _phase_switches(series)
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    for ax, (name, keys) in zip(axes.flat, PANELS, strict=True):
        for key in keys:
            points = series.get(key)
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=key)
        for s in switches:
            ax.axvline(s, color="k", ls="--", lw=1, label="objective switch")
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.suptitle(title)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


# -- sweeps --------------------------------------------------------------------------------------------

DPI = 100
HEATMAP_PANEL = (5.5, 4.5)  # inches per heatmap panel (grows with the number of values)
BARS_SIZE = (6.0, 4.5)
CURVE_PANEL = (3.5, 2.75)  # inches per configuration's curves
BEHAVIOR_SIZE = (8.0, 7.0)
BEHAVIOR = [
    ("Thoughts per response", ["val/reflection_thoughts", "val/transition_thoughts"]),
    ("Share of responses with a keyword", ["val/reflection_rate", "val/transition_rate"]),
]


def write_sweep_report(sweep_dir: Path, metric: str = "val/accuracy", jobs: list[Job] | None = None) -> list[Path]:
    """Summary CSV and PNGs of a Hydra multirun, over the swept keys other than `seed`.

    Writes into `sweep_dir`: `sweep_summary.csv` (mean, std and 95 % interval over seeds of every final held-out
    metric per configuration), `sweep_heatmap.png` (final `metric` over the first two swept keys, one
    panel per value of any further keys; `sweep_bars.png`, a bar chart, for one key or none),
    `sweep_curves.png` (`metric` over steps per configuration, mean ± std band over seeds) and
    `sweep_behavior.png` (final reflection / transition thoughts and rates per configuration).
    `jobs`: the sweep's jobs when the caller has read them already (`find_jobs(sweep_dir)`).

    Returns:
        The files written (none when no job has a metrics CSV yet).
    """
    sweep_dir = Path(sweep_dir)
    everything = find_jobs(sweep_dir) if jobs is None else jobs
    jobs = [job for job in everything if job.failed is None]  # a failed job's last values are not finals
    if not any(job.series for job in jobs):
        return []
    keys = [k for k in swept_keys(jobs, sweep_dir) if k != SEED_KEY]
    configs = group_configurations(jobs, keys)
    failed = len(everything) - len(jobs)
    title = f"sweep {sweep_dir.name}: {len(jobs)} jobs, {len(configs)} configurations" + (
        f" ({failed} failed jobs left out)" if failed else ""
    )
    summary = sweep_dir / "sweep_summary.csv"
    written = [write_summary(summary, configs, keys, summary_metrics(jobs, metric), metric)]
    if len(keys) >= 2:
        written.append(plot_heatmaps(configs, keys, jobs, sweep_dir / "sweep_heatmap.png", metric, title))
    else:
        written.append(plot_bars(configs, keys, sweep_dir / "sweep_bars.png", metric, title))
    written.append(plot_curves(configs, keys, jobs, sweep_dir / "sweep_curves.png", metric, title))
    written.append(plot_behavior(configs, keys, sweep_dir / "sweep_behavior.png", title))
    return written


def _cell_text(finals: list[float]) -> str:
    """Mean over seeds, its 95 % t interval (two seeds or more) and the number of seeds."""
    if not finals:
        return "no data"
    ci = intervals.over_seeds(finals)
    return f"{ci.estimate:.3f}\n[{ci.low:.3f}, {ci.high:.3f}]\nn={ci.n}" if ci.n > 1 else f"{ci.estimate:.3f}\nn=1"


def plot_heatmaps(
    configs: list[Configuration], keys: list[str], jobs: list[Job], out_png: Path, metric: str, title: str = ""
) -> Path:
    """Final `metric` (mean over seeds, 95 % interval and seed count in each cell): rows are the first swept key,
    columns the second, one panel per combination of the values of the others, one colour scale."""
    import numpy as np

    plt = _pyplot()
    names = short_names(keys)
    rows, cols = ordered_values(jobs, keys[0]), ordered_values(jobs, keys[1])
    extra = keys[2:]
    cells = {}
    for config in configs:
        finals = config.finals(metric)
        cells[tuple(config.values.values())] = (mean_std(finals)[0], finals)
    panels = [p for p in itertools.product(*(ordered_values(jobs, k) for k in extra)) if any(c[2:] == p for c in cells)]
    means = [m for m, _ in cells.values() if m is not None] or [0.0, 1.0]
    vmin, vmax = min(means), max(means) if max(means) > min(means) else min(means) + 1e-6
    width = max(HEATMAP_PANEL[0], 0.9 * len(cols) + 2.5)
    height = max(HEATMAP_PANEL[1], 0.6 * len(rows) + 2.0)
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
    for ax, panel in zip(axes.flat, panels, strict=False):
        grid = np.full((len(rows), len(cols)), np.nan)
        for (i, r), (j, c) in itertools.product(enumerate(rows), enumerate(cols)):
            mean, finals = cells.get((r, c, *panel), (None, []))
            if mean is not None:
                grid[i, j] = mean
            dark = mean is not None and (mean - vmin) / (vmax - vmin) < 0.55
            ax.text(j, i, _cell_text(finals), ha="center", va="center", fontsize=8, color="w" if dark else "k")
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel(keys[1])
        ax.set_ylabel(keys[0])
        ax.set_title(", ".join(f"{names[k]}={v}" for k, v in zip(extra, panel, strict=True)) or f"final {metric}")
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, label=f"final {metric}, mean over seeds")
    fig.suptitle(title)
    return _save(fig, out_png)


def plot_bars(configs: list[Configuration], keys: list[str], out_png: Path, metric: str, title: str = "") -> Path:
    """One swept key (or none): final `metric` per value, mean and 95 % interval over seeds, each seed a dot."""
    plt = _pyplot()
    n = len(configs)
    fig, ax = plt.subplots(figsize=(max(BARS_SIZE[0], 1.1 * n + 2.0), BARS_SIZE[1]), layout="constrained")
    for i, config in enumerate(configs):
        finals = config.finals(metric)
        mean = mean_std(finals)[0]
        if mean is None:
            ax.text(i, 0, "no data", ha="center", va="bottom", color="grey")
            continue
        ci = intervals.over_seeds(finals)  # error bar: the 95 % interval of the mean
        ax.bar(i, mean, yerr=[[mean - ci.low], [ci.high - mean]], capsize=5, color="C0", alpha=0.8)
        ax.plot([i] * len(finals), finals, "k.", ms=5)
        ax.annotate(
            _cell_text(finals).replace("\n", " "),
            (i, mean),
            ha="center",
            va="bottom",
            xytext=(0, 4),
            textcoords="offset points",
            fontsize=8,
        )
    labels = [config.values[keys[0]] if keys else "all jobs" for config in configs]
    ax.set_xticks(range(n), labels)
    ax.set_xlabel(keys[0] if keys else "no swept key besides seed")
    ax.set_ylabel(f"final {metric}")
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, out_png)


def _seed_band(ax, runs: list[list[tuple[float, float]]], label: bool) -> None:
    """Each seed as a thin line, their mean and a ± std band at every step some seed logged."""
    import numpy as np

    for k, points in enumerate(p for p in runs if p):
        ax.plot(
            *zip(*points, strict=True), color="C0", lw=0.8, alpha=0.35, label="one seed" if label and not k else None
        )
    by_step: dict[float, list[float]] = {}
    for points in runs:
        for step, value in points:
            by_step.setdefault(step, []).append(value)
    if not by_step:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        return
    steps = sorted(by_step)
    mean = np.array([statistics.fmean(by_step[s]) for s in steps])
    std = np.array([statistics.stdev(by_step[s]) if len(by_step[s]) > 1 else 0.0 for s in steps])
    ax.fill_between(steps, mean - std, mean + std, color="C0", alpha=0.2, label="± std" if label else None)
    ax.plot(steps, mean, color="C0", marker="o" if len(steps) < 30 else None, ms=3, label="mean" if label else None)


def plot_curves(
    configs: list[Configuration], keys: list[str], jobs: list[Job], out_png: Path, metric: str, title: str = ""
) -> Path:
    """`metric` over optimizer steps, one panel per configuration (laid out as the heatmap when two keys
    are swept), seeds as thin lines around their mean and ± std band; DSRL switches dashed."""
    plt = _pyplot()
    names = short_names(keys)
    if len(keys) == 2:
        rows, cols = ordered_values(jobs, keys[0]), ordered_values(jobs, keys[1])
        places = [(rows.index(c.values[keys[0]]), cols.index(c.values[keys[1]])) for c in configs]
        nrows, ncols = len(rows), len(cols)
    else:
        ncols = min(len(configs), 4)
        nrows = math.ceil(len(configs) / ncols)
        places = [divmod(i, ncols) for i in range(len(configs))]
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(CURVE_PANEL[0] * ncols, CURVE_PANEL[1] * nrows),
        sharex=True,
        sharey=True,
        squeeze=False,
        layout="constrained",
    )
    used = set(places)
    for (i, j), config in zip(places, configs, strict=True):
        ax = axes[i, j]
        first = (i, j) == places[0]
        _seed_band(ax, [job.series.get(metric, []) for job in config.jobs], label=first)
        for s in _phase_switches(config.jobs[0].series):
            ax.axvline(s, color="k", ls="--", lw=1, label="objective switch" if first else None)
        seeds = len(config.finals(metric))
        ax.set_title(f"{config.label(names)} ({seeds} seed{'' if seeds == 1 else 's'})", fontsize=8)
        ax.grid(alpha=0.3)
        if first:
            ax.legend(fontsize=6)
    for (i, j), ax in ((p, axes[p]) for p in itertools.product(range(nrows), range(ncols))):
        if (i, j) not in used:
            ax.axis("off")
    fig.supxlabel("optimizer step")
    fig.supylabel(metric)
    fig.suptitle(title)
    return _save(fig, out_png)


def plot_behavior(configs: list[Configuration], keys: list[str], out_png: Path, title: str = "") -> Path:
    """Final held-out behaviour metrics per configuration (mean ± std over seeds); dotted: before training."""
    plt = _pyplot()
    names = short_names(keys)
    n = len(configs)
    fig, axes = plt.subplots(
        2, 1, figsize=(max(BEHAVIOR_SIZE[0], 0.9 * n + 3.0), BEHAVIOR_SIZE[1]), layout="constrained"
    )
    for ax, (panel, metrics) in zip(axes, BEHAVIOR, strict=True):
        present = [m for m in metrics if any(c.finals(m) for c in configs)]
        width = 0.8 / max(len(present), 1)
        top = 0.0
        for k, m in enumerate(present):
            stats = [mean_std(c.finals(m)) for c in configs]
            xs = [i + (k - (len(present) - 1) / 2) * width for i in range(n)]
            means = [math.nan if mean is None else mean for mean, _ in stats]
            ax.bar(xs, means, width, yerr=[std or 0 for _, std in stats], capsize=3, color=f"C{k}", label=m)
            before = [pts[0][1] for c in configs for j in c.jobs if (pts := j.series.get(m)) and pts[0][0] == 0]
            if before:
                ax.axhline(statistics.fmean(before), color=f"C{k}", ls=":", lw=1.2, label=f"{m} before training")
            top = max([top, *before, *((mean or 0) + (std or 0) for mean, std in stats)])
        ax.set_ylim(0, 1.15 * top if top > 0 else 1.0)  # all zero (no thoughts found): bars at 0 of a 0-1 axis
        if present:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks(range(n), [c.label(names).replace(", ", "\n") for c in configs], fontsize=7)
        ax.set_title(f"{panel}: final held-out value, mean ± std over seeds")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return _save(fig, out_png)


def _save(fig, out_png: Path) -> Path:
    import matplotlib.pyplot as plt

    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=DPI)
    plt.close(fig)
    return out_png


class SweepReport(Callback):
    """Hydra callback: writes the sweep report when a multirun ends (`hydra.callbacks.sweep_report`)."""

    def __init__(self, metric: str = "val/accuracy"):
        self.metric = metric

    def on_multirun_end(self, config, **kwargs) -> None:
        """The report of the jobs that ran; then, if some failed, one line per failure and exit status 1."""
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = find_jobs(sweep_dir)  # every job's metrics read once, for the report and the failures
        for path in write_sweep_report(sweep_dir, metric=self.metric, jobs=jobs):
            print(f"sweep report: {path}")
        failures = write_failures(sweep_dir / "sweep_failures.csv", jobs)
        if failures is not None:
            failed = [job for job in jobs if job.failed is not None]
            for job in failed:
                print(f"job {job.dir.name} failed: {job.failed}")
            raise SystemExit(f"{len(failed)} of {len(jobs)} sweep jobs failed: {failures}")
