"""The `experiment=smollm2_learns` table: held-out pass@1 before -> after per objective, paired over problems.

    python experiments/smollm2_learns.py multirun/<date>/<time>     # the sweep dir; prints the table and writes
                                                                    # smollm2_learns.md / .json / .png there

Each job's `logs/passk_problems.csv` (`evaluation.passk.PassAtKCurve`) holds the base policy's and the trained
policy's correct samples per held-out problem; the intervals are `reproduction.stats`'s: 95 % bootstrap over
seeds and problems (a sweep over `seed=` too pools its seeds), the change paired on the same seeds and
problems, and the last row the two trained policies paired by seed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lightning_prerl.reports.logs import read_metrics
from lightning_prerl.reports.plots import _pyplot, _save
from lightning_prerl.reports.sweep import Job
from lightning_prerl.reproduction import stats
from lightning_prerl.reproduction.plots import SMOOTH, _smoothed, switch_steps

METRIC = "pass@1"
CURVES = ["rollout/reward_mean", "rollout/truncated"]


def jobs(sweep: Path) -> dict[str, dict[int, Path]]:
    """objective name -> {seed: directory} of its finished jobs (pass@k measured before and after), seeds in
    ascending order."""
    found: dict[str, dict[int, Path]] = {}
    for cfg in sorted(sweep.glob("*/config.yaml")):
        if "final" in stats.read_problems(cfg.parent):
            conf = OmegaConf.load(cfg)
            found.setdefault(conf.objective.name, {})[int(conf.seed)] = cfg.parent
    return {name: dict(sorted(by_seed.items())) for name, by_seed in found.items()}


def records(found: dict[str, dict[int, Path]]) -> dict[str, dict[int, dict]]:
    """objective name -> {seed: {"base": rows, "final": rows}}."""
    return {name: {seed: stats.read_problems(d) for seed, d in dirs.items()} for name, dirs in found.items()}


def plot(found: dict[str, dict[int, Path]], out_png: Path) -> Path:
    """Training reward and truncated share per step (trailing mean of SMOOTH steps): every objective's seeds as
    thin lines and their mean as a thick one (with 2 seeds a t band would span the whole axis); DSRL's switch
    dashed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(6 * len(CURVES), 4), squeeze=False, layout="constrained")
    groups = {
        name: [Job(d, {}, read_metrics(d / "logs" / "metrics.csv")) for d in dirs.values()]
        for name, dirs in found.items()
    }
    for ax, metric in zip(axes[0], CURVES, strict=True):
        for i, (name, jobs) in enumerate(groups.items()):
            runs = [_smoothed(j.series[metric]) for j in jobs if j.series.get(metric)]
            for points in runs:
                ax.plot(*zip(*points, strict=True), color=f"C{i}", lw=0.8, alpha=0.4)
            steps = sorted({s for points in runs for s, _ in points})
            values = [[v for points in runs for s, v in points if s == step] for step in steps]
            ax.plot(steps, [sum(v) / len(v) for v in values], color=f"C{i}", lw=2, label=f"{name} ({len(runs)} seeds)")
            for step in switch_steps(jobs) if name.startswith("dsrl") else ():
                ax.axvline(step, color=f"C{i}", ls="--", lw=1, label="DSRL switch")
        ax.set_xlabel("optimizer step")
        ax.set_title(f"{metric} (training rollouts, mean of {SMOOTH} steps; thin: seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, out_png)


def shape(d: dict) -> str:
    return f"{d['seeds']} × {d['problems']}"


def table(found: dict[str, dict[int, dict]]) -> tuple[str, dict]:
    lines = [
        f"| objective | base {METRIC} | trained {METRIC} | change (paired) | seeds × problems |",
        "|---|---|---|---|---|",
    ]
    result = {}
    for name, by_seed in found.items():
        base, final = [r["base"] for r in by_seed.values()], [r["final"] for r in by_seed.values()]
        level = stats.heldout(base, [METRIC])[METRIC], stats.heldout(final, [METRIC])[METRIC]
        change = stats.compare(base, final, METRIC)
        result[name] = {"seed_list": list(by_seed), "base": level[0], "final": level[1], "change": change}
        shown = [stats.ci_text(x) for x in level]
        lines.append(f"| {name} | {shown[0]} | {shown[1]} | {stats.ci_text(change, sign='+')} | {shape(change)} |")
    common = sorted(set(found.get("grpo", {})) & set(found.get("dsrl", {})))
    if common:  # the trained policies, paired on the seeds both objectives ran
        diff = stats.compare(*([found[n][s]["final"] for s in common] for n in ("grpo", "dsrl")), METRIC)
        result["dsrl_minus_grpo"] = diff | {"seed_list": common}
        lines.append(f"| DSRL − GRPO (trained) | | | {stats.ci_text(diff, sign='+')} | {shape(diff)} |")
    return "\n".join(lines) + "\n", result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="the experiment=smollm2_learns multirun directory")
    args = parser.parse_args(argv)
    found = jobs(args.sweep)
    if not found:
        sys.exit(f"smollm2_learns: no job under {args.sweep} measured pass@k before and after training")
    text, result = table(records(found))
    plot(found, args.sweep / "smollm2_learns.png")
    (args.sweep / "smollm2_learns.md").write_text(text)
    (args.sweep / "smollm2_learns.json").write_text(json.dumps(result, indent=2) + "\n")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
