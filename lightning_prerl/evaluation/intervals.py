"""Confidence intervals for every comparison the project prints: over problems, over seeds, paired.

- `over_problems`: avg@k / pass@k of one policy on one benchmark. The problems are the sample; the
  percentile bootstrap (scipy.stats.bootstrap) resamples them. Per-problem values are what the metric
  averages: c/k for avg@k, the unbiased pass@j estimate for pass@j.
- `over_seeds_and_problems`: the same with several training seeds: a two-level bootstrap (seeds with
  replacement, then problems with replacement; Davison & Hinkley 1997, sec. 3.8), because seeds and
  problems both vary.
- `paired_difference`: policy B minus policy A on the same problems (and seeds): the bootstrap of the
  per-problem differences, which is far tighter than two separate intervals when the policies agree on
  most problems. An interval that excludes 0 is the "different" verdict.
- `over_seeds`: a final metric per seed (a sweep's configuration): Student's t interval of the mean.

Every function is deterministic (seeded resampling) and returns an `Interval`; a single value or a
constant sample gives a zero-width interval, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
RESAMPLES = 4000


@dataclass(frozen=True)
class Interval:
    """`estimate` with its `level` confidence interval [low, high] from `n` units (problems or seeds)."""

    estimate: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def text(self, digits: int = 3) -> str:
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_ci_low": self.low, f"{prefix}_ci_high": self.high}


def _constant(x: np.ndarray) -> bool:
    return x.size < 2 or bool(np.all(x == x.flat[0]))


def over_problems(values: Sequence[float], level: float = LEVEL, seed: int = 0) -> Interval:
    """Mean of per-problem `values` (P,) with a percentile-bootstrap interval over problems."""
    x = np.asarray(values, dtype=np.float64)  # (P,)
    mean = float(x.mean())
    if _constant(x):
        return Interval(mean, mean, mean, x.size, level)
    res = stats.bootstrap(
        (x,), np.mean, confidence_level=level, n_resamples=RESAMPLES, method="percentile", rng=seed, vectorized=True
    )
    return Interval(mean, float(res.confidence_interval.low), float(res.confidence_interval.high), x.size, level)


def over_seeds_and_problems(values: Sequence[Sequence[float]], level: float = LEVEL, seed: int = 0) -> Interval:
    """Mean of `values` (S seeds, P problems) with a two-level bootstrap: seeds, then problems."""
    v = np.asarray(values, dtype=np.float64)  # (S, P)
    s, p = v.shape
    mean = float(v.mean())
    if s == 1:
        return over_problems(v[0], level, seed)
    if _constant(v):
        return Interval(mean, mean, mean, v.size, level)
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(s, np.full(s, 1 / s), size=RESAMPLES)  # (R, S): seeds drawn with replacement
    problem_counts = rng.multinomial(p, np.full(p, 1 / p), size=RESAMPLES)  # (R, P): problems, likewise
    means = np.einsum("rs,sp,rp->r", seed_counts, v, problem_counts) / (s * p)  # (R,)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(mean, float(low), float(high), v.size, level)


def paired_difference(
    a: Sequence[float] | Sequence[Sequence[float]], b: Sequence[float] | Sequence[Sequence[float]], **kw
) -> Interval:
    """Mean of b - a over the same problems (P,) or seeds x problems (S, P), with its interval."""
    diff = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    return over_seeds_and_problems(diff, **kw) if diff.ndim == 2 else over_problems(diff, **kw)


def over_seeds(values: Sequence[float], level: float = LEVEL) -> Interval:
    """Mean of one final value per seed (S,) with Student's t interval (zero width for one seed)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0, level)
    mean = float(x.mean())
    if _constant(x):
        return Interval(mean, mean, mean, x.size, level)
    half = float(stats.t.ppf((1 + level) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, x.size, level)
