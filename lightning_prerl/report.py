"""PNG reports: one run's curves from its metrics CSV (sweep reports come with the sweep tooling)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from hydra.experimental.callback import Callback

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


def read_metrics(path: Path) -> dict[str, list[tuple[float, float]]]:
    """{metric: [(step, value), ...]} from a Lightning CSVLogger `metrics.csv`."""
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                v = float(value)
                if math.isfinite(v):
                    series.setdefault(key, []).append((float(step), v))
    return series


def _phase_switches(series) -> list[float]:
    phase = series.get("objective/phase", [])
    return [s for (s, v), (_, prev) in zip(phase[1:], phase[:-1], strict=False) if v != prev]


def plot_run(metrics_csv: Path, out_png: Path, title: str = "") -> Path:
    """Six panels over optimizer steps, with the DSRL phase switch drawn as a vertical line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _job_label(job_dir: Path) -> str:
    overrides = job_dir / ".hydra" / "overrides.yaml"
    if not overrides.is_file():
        return job_dir.name
    import yaml

    chosen = [o for o in (yaml.safe_load(overrides.read_text()) or []) if not o.startswith("hydra.")]
    return " ".join(chosen) or "defaults"


def plot_sweep(sweep_dir: Path, out_png: Path | None = None, metric: str = "val/accuracy") -> Path | None:
    """Every job of a Hydra multirun: `metric` over steps, and its first and last values side by side.

    Also writes `sweep_summary.csv` (job, overrides, first, last, best) next to the PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jobs = sorted(
        (d for d in sweep_dir.iterdir() if (d / "logs" / "metrics.csv").is_file()), key=lambda d: (len(d.name), d.name)
    )
    if not jobs:
        return None
    out_png = out_png or sweep_dir / "sweep_report.png"
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(15, 5.5), constrained_layout=True)
    summary = []
    for job in jobs:
        points = read_metrics(job / "logs" / "metrics.csv").get(metric, [])
        label = _job_label(job)
        if points:
            xs, ys = zip(*points, strict=True)
            curves.plot(xs, ys, marker="o", ms=3, label=label)
            summary.append((job.name, label, ys[0], ys[-1], max(ys)))
    curves.set_title(f"{metric} over optimizer steps")
    curves.set_xlabel("optimizer step")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=7)
    names = [s[1] for s in summary]
    y = range(len(summary))
    bars.barh([i + 0.2 for i in y], [s[2] for s in summary], height=0.4, label="first", color="lightgrey")
    bars.barh([i - 0.2 for i in y], [s[3] for s in summary], height=0.4, label="last")
    bars.set_yticks(list(y), names, fontsize=7)
    bars.invert_yaxis()
    bars.set_title(f"{metric}: first vs last evaluation")
    bars.legend()
    fig.suptitle(f"sweep {sweep_dir}")
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    with open(out_png.with_name("sweep_summary.csv"), "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["job", "overrides", f"first {metric}", f"last {metric}", f"best {metric}"])
        writer.writerows(summary)
    return out_png


class SweepReport(Callback):
    """Hydra callback: draws the sweep report when a multirun ends (`hydra.callbacks.sweep_report`)."""

    def __init__(self, metric: str = "val/accuracy"):
        self.metric = metric

    def on_multirun_end(self, config, **kwargs) -> None:
        out = plot_sweep(Path(config.hydra.sweep.dir), metric=self.metric)
        if out is not None:
            print(f"sweep report: {out}")
