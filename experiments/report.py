"""Redraw reports from what runs left on disk: a sweep's summary and PNGs, or one run's report.png.

    python experiments/report.py multirun/2026-11-25/10-00-00                 # a Hydra multirun dir
    python experiments/report.py multirun/2026-11-25/10-00-00 --metric val/pass@2
    python experiments/report.py outputs/2026-11-25/10-00-00                  # one run: its report.png
    python experiments/report.py multirun/... --reproduction [--real-model outputs/<smollm2 alignment run>]
        [--probe <a real-model probe's result .json/.md>] [--gains 0.1 0.2 0.3]
    python experiments/report.py multirun/<spaces_toy sweep> --spaces          # or a run dir, --group-size 4

A sweep dir gets sweep_summary.csv, sweep_heatmap.png (sweep_bars.png for one swept key),
sweep_curves.png and sweep_behavior.png, as the multirun's own SweepReport callback writes them;
with --reproduction, an `experiment=reproduce_recheck` (or `reproduce_toy`) sweep gets reproduction.md/.json and
its PNGs (`lightning_prerl.reproduction.report`), the real-model alignment column read from --real-model's
logs/alignment.csv;
with --spaces, the conditioning-space alignment table spaces.md/.csv (`lightning_prerl.reports.spaces`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="a Hydra multirun (sweep) directory, or one run's directory")
    parser.add_argument("--metric", default="val/accuracy", help="held-out metric compared across the sweep")
    parser.add_argument("--reproduction", action="store_true", help="the reproduction report of a reproduce_toy sweep")
    parser.add_argument("--real-model", type=Path, help="--reproduction: a run dir with logs/alignment.csv")
    parser.add_argument(
        "--slip-problems", type=int, default=100, help="--reproduction: held-out problems of the slip analysis (0: off)"
    )
    parser.add_argument("--probe", type=Path, help="--reproduction: a real-model probe's result file (.json, .md)")
    parser.add_argument(
        "--gains", type=float, nargs="+", default=[0.05, 0.1, 0.15], help="--reproduction: steps to base + each gain"
    )
    parser.add_argument("--spaces", action="store_true", help="the alignment table of every pair of spaces measured")
    parser.add_argument("--group-size", type=int, default=8, help="--spaces: samples per prompt (bootstrap units)")
    args = parser.parse_args(argv)
    if args.spaces:
        from lightning_prerl.reports.spaces import write_spaces_report

        written = write_spaces_report(args.dir, args.group_size, f"python experiments/report.py {args.dir} --spaces")
        if not written:
            sys.exit(f"report: no logs/alignment*.csv under {args.dir}")
        for path in written:
            print(path)
        return 0
    if args.reproduction:
        from lightning_prerl.reproduction.report import write_reproduction_report

        if args.real_model and not (args.real_model / "logs" / "alignment.csv").is_file():
            sys.exit(f"report: --real-model {args.real_model}: no logs/alignment.csv")
        slips = {"slip_problems": args.slip_problems, "probe": args.probe}
        for path in write_reproduction_report(args.dir, args.real_model, tuple(args.gains), **slips):
            print(path)
        return 0
    from lightning_prerl.reports.plots import plot_run, write_sweep_report

    if not args.dir.is_dir():
        sys.exit(f"report: {args.dir} is not a directory")
    written = write_sweep_report(args.dir, metric=args.metric)
    run_metrics = args.dir / "logs" / "metrics.csv"
    if not written and run_metrics.is_file():
        written = [plot_run(run_metrics, args.dir / "report.png", title=args.dir.name)]
    if not written:
        sys.exit(f"report: no logs/metrics.csv under {args.dir} (a sweep's jobs or a run)")
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
