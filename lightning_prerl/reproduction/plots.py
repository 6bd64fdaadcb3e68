"""The reproduction report's figures (`reproduction.py` gathers the numbers): curves over steps with seed
bands, pass@k against k, histograms of the gradient alignment."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from lightning_prerl.evaluation import intervals
from lightning_prerl.reports.plots import _pyplot, _save
from lightning_prerl.reports.sweep import Job

ACCURACY = "val/accuracy"
SMOOTH = 5  # per-step (training-rollout) series: trailing mean over this many steps


def _band(ax, runs: list[list[tuple[float, float]]], color: str, label: str) -> None:
    """Mean over seeds at every step some seed logged, with its 95 % t interval over seeds as a band."""
    by_step: dict[float, list[float]] = {}
    for points in runs:
        for step, value in points:
            by_step.setdefault(step, []).append(value)
    if not by_step:
        return
    steps = sorted(by_step)
    bands = [intervals.over_seeds(by_step[s]) for s in steps]
    ax.fill_between(steps, [b.low for b in bands], [b.high for b in bands], color=color, alpha=0.2)
    ax.plot(steps, [b.estimate for b in bands], color=color, marker="o", ms=3, label=label)


def _smoothed(points: list[tuple[float, float]], window: int = SMOOTH) -> list[tuple[float, float]]:
    """Trailing mean over `window` logged points (a per-step series, e.g. rollout/accuracy on 96 samples)."""
    values = [v for _, v in points]
    return [(s, statistics.fmean(values[max(0, i - window + 1) : i + 1])) for i, (s, _) in enumerate(points)]


def switch_steps(jobs: list[Job]) -> list[float]:
    for job in jobs:
        phase = job.series.get("objective/phase", [])
        switches = [s for (s, v), (_, prev) in zip(phase[1:], phase[:-1], strict=False) if v != prev]
        if switches:
            return switches
    return []


def plot_over_steps(
    groups: dict[str, list[Job]], metrics: list[str], out_png: Path, thresholds: list[float] = ()
) -> Path:
    """One panel per metric: every group's (objective's, arm's) mean over its seeds with its 95 % t band against
    the optimizer step (held-out `val/*` as evaluated; per-step training-rollout series as a trailing mean over
    SMOOTH steps)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4), squeeze=False, layout="constrained")
    for ax, metric in zip(axes[0], metrics, strict=True):
        for i, (objective, members) in enumerate(groups.items()):
            runs = [j.series.get(metric, []) for j in members]
            runs = runs if metric.startswith("val/") else [_smoothed(r) for r in runs]
            _band(ax, runs, f"C{i}", f"{objective} ({len(members)} seeds)")
            if objective.startswith("dsrl"):
                for s in switch_steps(members):
                    ax.axvline(s, color=f"C{i}", ls="--", lw=1, label="DSRL switch")
        for t in thresholds if metric == ACCURACY else ():
            ax.axhline(t, color="k", ls=":", lw=1)
            ax.annotate(f"{t:.3f}", (0, t), fontsize=7, va="bottom")
        where = "held-out" if metric.startswith("val/") else f"training rollouts, mean of {SMOOTH} steps"
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{metric} ({where}), mean, 95 % t band over seeds", fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a metric no run logged draws nothing
            ax.legend(fontsize=7)
    return _save(fig, out_png)


def plot_pass_at_k(data: dict, out_png: Path) -> Path:
    plt = _pyplot()
    ks = data["ks"]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    curves = [("base policy", data["base"], "k")] + [
        (o, data["objective"][o], f"C{i}") for i, o in enumerate(data["objectives"])
    ]
    for name, policy, color in curves:
        ci = [policy["heldout"].get(f"pass@{k}") or policy["pass_at_k"][k] for k in ks]  # per-problem, else per-seed
        mean = [c["estimate"] if c and c["estimate"] is not None else math.nan for c in ci]
        low = [m - c["low"] if c and c["low"] is not None else 0.0 for m, c in zip(mean, ci, strict=True)]
        high = [c["high"] - m if c and c["high"] is not None else 0.0 for m, c in zip(mean, ci, strict=True)]
        ax.errorbar(
            ks, mean, yerr=[low, high], color=color, marker="o", ms=3, capsize=2, ls="--" if color == "k" else "-",
            label=name,
        )  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("k (samples per problem)")
    ax.set_ylabel("pass@k (held-out)")
    ax.set_title("pass@k at the end of training, 95 % interval over seeds and problems", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, out_png)


def plot_alignment(data: dict, out_png: Path) -> Path:
    """Histograms of the inner product and the cosine: base policy, each objective after training, real model."""
    plt = _pyplot()
    panels = [("toy base (step 0)", data["base"]["alignment_rows"])]
    panels += [(f"{o} (after)", data["objective"][o]["alignment_after_rows"]) for o in data["objectives"]]
    if data["real_model"]["alignment_rows"]:
        panels.append(("real model", data["real_model"]["alignment_rows"]))
    fig, axes = plt.subplots(2, len(panels), figsize=(3.2 * len(panels), 5.5), squeeze=False, layout="constrained")
    for i, field in enumerate(("inner", "cosine")):
        # cosines share one scale; inner products scale with the model's gradient norms (own scale per panel)
        pooled = [r[field] for _, rows in panels for r in rows] if field == "cosine" else []
        low, high = min(pooled + [0.0]), max(pooled + [0.0])
        bins = [low + (high - low) * b / 24 for b in range(25)] if high > low else 20
        for j, (name, rows) in enumerate(panels):
            ax = axes[i, j]
            values = [r[field] for r in rows]
            if values:
                ax.hist(values, bins=bins, color=f"C{j}", alpha=0.8)
            ax.axvline(0, color="k", lw=1)
            negative = sum(v < 0 for v in values)
            ax.set_title(f"{name}\n{field}: {negative}/{len(values)} < 0", fontsize=8)
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("inner product: rollouts")
    axes[1, 0].set_ylabel("cosine: rollouts")
    return _save(fig, out_png)
