"""Reading what a run logged: Lightning CSVLogger's `metrics.csv` as one series per metric."""

from __future__ import annotations

import csv
import math
from pathlib import Path


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
