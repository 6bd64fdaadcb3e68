"""The reproduction report's intervals and verdicts (`report.py` gathers the logs, `text.py` writes them).

Units of resampling: seeds and held-out problems. Each job's `logs/passk_problems.csv`
(`evaluation.passk.PassAtKCurve`) holds, per problem, the correct samples and the SEAL thoughts of the
base policy (step 0) and of the trained one (the last step); from it:

- `heldout`: pass@k (pass@1 = avg@k, the accuracy per sample) and thoughts per response of a policy over
  seeds x problems, with the two-level bootstrap interval (`intervals.over_seeds_and_problems`);
- `compare`: a paired difference b - a on the same seeds and problems (`intervals.paired_difference`)
  with the minimum detectable effect of that design (`intervals.minimum_detectable_effect`);
- `thought_ratio`: thoughts per response after training / before, with the two-level interval
  (`intervals.ratio`).

Runs that wrote no per-problem record (older sweeps) fall back to the logged per-seed means: Student's t
over seeds (`intervals.over_seeds`) of the final values, of their paired per-seed differences and of the
per-seed ratios. Every interval is a dict {estimate, low, high, n}, JSON-ready.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from lightning_prerl.evaluation import intervals
from lightning_prerl.evaluation.metrics import pass_at_k
from lightning_prerl.evaluation.passk import PROBLEMS_FILE

THOUGHT_KEYS = ["transition_thoughts", "reflection_thoughts"]
Rows = dict[int, dict[str, int]]  # held-out problem position: its row of passk_problems.csv


def read_problems(job_dir: Path) -> dict[str, Rows]:
    """{"base": step-0 rows, "final": last-step rows} of a job's `logs/passk_problems.csv` ({} without one;
    "final" is absent when only step 0 was measured)."""
    path = Path(job_dir) / "logs" / PROBLEMS_FILE
    if not path.is_file():
        return {}
    by_step: dict[int, Rows] = {}
    with open(path, newline="") as fh:
        for r in csv.DictReader(fh):
            row = {k: int(v) for k, v in r.items()}
            by_step.setdefault(row["step"], {})[row["problem"]] = row
    out = {"base": by_step[0]} if 0 in by_step else {}
    last = max(by_step, default=0)
    return out | ({"final": by_step[last]} if last > 0 else {})


def value(row: dict[str, int], metric: str) -> float:
    """A problem's `metric`: "pass@k" (unbiased, pass@1 = correct / samples) or thoughts per response."""
    if metric.startswith("pass@"):
        return pass_at_k(row["samples"], row["correct"], int(metric.split("@")[1]))
    return row[metric] / row["samples"]


def matrix(records: list[Rows], metric: str) -> np.ndarray:
    """(S, P) `metric` of S records (seeds) on the P problems they all measured, in held-out order."""
    common = sorted(set.intersection(*(set(r) for r in records)))
    return np.array([[value(r[p], metric) for p in common] for r in records], dtype=np.float64)  # (S, P)


def as_dict(interval: intervals.Interval) -> dict[str, float | int | None]:
    def number(x: float) -> float | None:
        return None if math.isnan(x) else x

    return {"estimate": number(interval.estimate), "low": number(interval.low), "high": number(interval.high)} | {
        "n": interval.n
    }


def ci_text(interval: dict | None, digits: int = 3, sign: str = "") -> str:
    """`estimate [low, high]` of an interval dict (`as_dict`), "–" without one; `sign="+"` signs every number."""
    if not interval or interval["estimate"] is None:
        return "–"
    e, lo, hi = interval["estimate"], interval["low"], interval["high"]
    if lo is None or lo == hi == e:
        return f"{e:{sign}.{digits}f}"
    return f"{e:{sign}.{digits}f} [{lo:{sign}.{digits}f}, {hi:{sign}.{digits}f}]"


def heldout(records: list[Rows], metrics: list[str]) -> dict[str, dict]:
    """Every metric's mean over seeds x problems with its two-level interval ({} without records)."""
    if not records or not all(records):
        return {}
    return {m: as_dict(intervals.over_seeds_and_problems(matrix(records, m))) for m in metrics}


def paired(a: np.ndarray, b: np.ndarray, seeds: int, problems: int) -> dict:
    """b - a (each (S, P), or (S,) per-seed means) with its interval and minimum detectable effect."""
    if a.ndim == 2:  # seeds x problems: the two-level bootstrap, normal quantiles
        diff, mde = intervals.paired_difference(a, b), intervals.minimum_detectable_effect(b - a)
    else:  # per-seed means: Student's t, for the interval and the power alike
        diff = intervals.over_seeds(list(b - a))
        mde = intervals.minimum_detectable_effect(b - a, df=max(1, len(a) - 1))
    return as_dict(diff) | {"seeds": seeds, "problems": problems, "mde": mde}


def compare(a: list[Rows], b: list[Rows], metric: str) -> dict | None:
    """b - a on the same seeds (records paired by position) and problems, for `metric`; None without records."""
    if not a or not all(a) or not all(b):
        return None
    both = [*a, *b]
    common = sorted(set.intersection(*(set(r) for r in both)))
    pick = [{p: r[p] for p in common} for r in both]
    m = matrix(pick, metric)  # (2S, P)
    return paired(m[: len(a)], m[len(a) :], len(a), len(common))


def compare_seed_means(a: list[float | None], b: list[float | None]) -> dict | None:
    """b - a from per-seed final means paired by position (the fallback without per-problem records)."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not pairs:
        return None
    x, y = (np.array(v, dtype=np.float64) for v in zip(*pairs, strict=True))  # (S,) each
    return paired(x, y, len(pairs), 0)


def thought_ratio(base: list[Rows], final: list[Rows], metric: str) -> dict | None:
    """Thoughts per response after / before training over seeds x problems, two-level interval."""
    if not base or not all(base) or not all(final):
        return None
    common = sorted(set.intersection(*(set(r) for r in [*base, *final])))
    pick = [{p: r[p] for p in common} for r in [*base, *final]]
    m = matrix(pick, metric)  # (2S, P)
    return as_dict(intervals.ratio(m[len(base) :], m[: len(base)]))


def seed_ratio(ratios: list[float | None]) -> dict | None:
    """Student's t over seeds of per-seed ratios (the fallback without per-problem records)."""
    kept = [r for r in ratios if r is not None]
    return as_dict(intervals.over_seeds(kept)) if kept else None


def alignment_intervals(rows: list[dict[str, float]]) -> dict[str, dict | None]:
    """Share of negative inner products and mean cosine with percentile-bootstrap intervals over rollouts."""
    if not rows:
        return {"negative_share": None, "cosine_mean": None}
    negative = [float(r["inner"] < 0) for r in rows]
    return {
        "negative_share": as_dict(intervals.over_problems(negative)),
        "cosine_mean": as_dict(intervals.over_problems([r["cosine"] for r in rows])),
    }


def verdict(result: dict | None, direction: int, null: float = 0.0) -> str:
    """`intervals.verdict` of an interval dict (inconclusive without one)."""
    if result is None or result["low"] is None:
        return "inconclusive"
    return intervals.verdict(
        intervals.Interval(result["estimate"], result["low"], result["high"], result["n"]), direction, null
    )
