"""Run reports are drawn from the metrics CSVs that Lightning's CSVLogger writes."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning_prerl.report import plot_run, read_metrics


def write_metrics(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, keys)
        writer.writeheader()
        writer.writerows(rows)


def test_run_report_marks_the_phase_switch(tmp_path):
    rows = [{"step": s, "objective/phase": int(s >= 3), "rollout/reward_mean": 0.1 * s} for s in range(6)]
    rows += [{"step": 0, "val/accuracy": 0.4}, {"step": 6, "val/accuracy": 0.5}]
    write_metrics(tmp_path / "metrics.csv", rows)
    series = read_metrics(tmp_path / "metrics.csv")
    assert series["val/accuracy"] == [(0.0, 0.4), (6.0, 0.5)]
    out = plot_run(tmp_path / "metrics.csv", tmp_path / "report.png", "test")
    assert out.read_bytes().startswith(b"\x89PNG")


# sweep reports: tests/test_sweep.py
