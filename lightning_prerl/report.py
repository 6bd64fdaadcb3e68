"""PNG reports: one run's curves from its metrics CSV (sweep reports come with the sweep tooling)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

PANELS = [
    ("Reward (rollouts)", ["rollout/reward_mean", "rollout/mixed_groups"]),
    ("Held-out accuracy", ["val/accuracy", "val/pass@1", "val/pass@2", "val/pass@4", "val/pass@8"]),
    ("Format validity", ["rollout/format_valid", "val/format_valid"]),
    ("Response length (tokens)", ["rollout/response_length", "val/response_length"]),
    ("Behaviour: share of responses", ["rollout/reflection_rate", "rollout/transition_rate",
                                       "val/reflection_rate", "val/transition_rate"]),
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
