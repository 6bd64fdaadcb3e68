"""Run reports are drawn from the metrics CSVs that Lightning's CSVLogger writes."""

from __future__ import annotations

import csv
from pathlib import Path

from lightning_prerl.reports.logs import read_metrics
from lightning_prerl.reports.plots import plot_run


def write_metrics(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, keys)
        writer.writeheader()
        writer.writerows(rows)


def test_run_report_marks_the_phase_switch(tmp_path, monkeypatch):
    """The figure itself: every panel has one dashed line at the step where objective/phase changed (3),
    and the reward panel draws the logged values. Catches the switch lines dropped, drawn at the wrong
    step (e.g. the last step of the warm-up), or the series misread."""
    import matplotlib.pyplot as plt

    rows = [{"step": s, "objective/phase": int(s >= 3), "rollout/reward_mean": 0.1 * s} for s in range(6)]
    rows += [{"step": 0, "val/accuracy": 0.4}, {"step": 6, "val/accuracy": 0.5}]
    write_metrics(tmp_path / "metrics.csv", rows)
    series = read_metrics(tmp_path / "metrics.csv")
    assert series["val/accuracy"] == [(0.0, 0.4), (6.0, 0.5)]
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figures.append(fig), close(fig)))
    out = plot_run(tmp_path / "metrics.csv", tmp_path / "report.png", "test")
    assert out.read_bytes().startswith(b"\x89PNG")
    (fig,) = figures
    for ax in fig.axes:
        switches = [line for line in ax.get_lines() if line.get_label() == "objective switch"]
        assert [list(line.get_xdata()) for line in switches] == [[3.0, 3.0]], ax.get_title()
    rewards = [line for ax in fig.axes for line in ax.get_lines() if line.get_label() == "rollout/reward_mean"]
    assert len(rewards) == 1 and list(rewards[0].get_ydata()) == [0.1 * s for s in range(6)]


# sweep reports: tests/test_sweep.py
