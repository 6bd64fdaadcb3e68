"""The `experiment=smollm2_learns` table: held-out pass@1 before -> after per objective, paired over problems.

    python experiments/smollm2_learns.py multirun/<date>/<time>     # the sweep dir; prints the table and
                                                                    # writes smollm2_learns.md / .json there

Each job's `logs/passk_problems.csv` (`evaluation.passk.PassAtKCurve`) holds the base policy's and the trained
policy's correct samples per held-out problem; the intervals are `reproduction.stats`'s: 95 % bootstrap over
problems, the change paired on the same problems, and the last row the two trained policies paired.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lightning_prerl.reproduction import stats

METRIC = "pass@1"


def jobs(sweep: Path) -> dict[str, dict]:
    """objective name -> {"base": rows, "final": rows} of every finished job of the sweep."""
    out = {}
    for cfg in sorted(sweep.glob("*/config.yaml")):
        rows = stats.read_problems(cfg.parent)
        if "final" in rows:
            out[OmegaConf.load(cfg).objective.name] = rows
    return out


def table(found: dict[str, dict]) -> tuple[str, dict]:
    lines = [
        f"| objective | base {METRIC} | trained {METRIC} | change (paired) | problems |",
        "|---|---|---|---|---|",
    ]
    result = {}
    for name, rows in found.items():
        level = stats.heldout([rows["base"]], [METRIC])[METRIC], stats.heldout([rows["final"]], [METRIC])[METRIC]
        change = stats.compare([rows["base"]], [rows["final"]], METRIC)
        result[name] = {"base": level[0], "final": level[1], "change": change}
        shown = [stats.ci_text(x) for x in level]
        lines.append(f"| {name} | {shown[0]} | {shown[1]} | {stats.ci_text(change, sign='+')} | {change['problems']} |")
    if {"grpo", "dsrl"} <= set(found):
        diff = stats.compare([found["grpo"]["final"]], [found["dsrl"]["final"]], METRIC)
        result["dsrl_minus_grpo"] = diff
        lines.append(f"| DSRL − GRPO (trained) | | | {stats.ci_text(diff, sign='+')} | {diff['problems']} |")
    return "\n".join(lines) + "\n", result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sweep", type=Path, help="the experiment=smollm2_learns multirun directory")
    args = parser.parse_args(argv)
    found = jobs(args.sweep)
    if not found:
        sys.exit(f"smollm2_learns: no job under {args.sweep} measured pass@k before and after training")
    text, result = table(found)
    (args.sweep / "smollm2_learns.md").write_text(text)
    (args.sweep / "smollm2_learns.json").write_text(json.dumps(result, indent=2) + "\n")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
