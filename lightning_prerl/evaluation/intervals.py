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
- `ratio`: mean(numerator) / mean(denominator) over seeds and problems (a thought rate after training
  over the base policy's), with the same two-level resampling.
- `verdict`: yes / no / inconclusive from an interval: it excludes the null value (0 for a difference,
  1 for a ratio) on the expected side (yes), on the other side (no), or contains it (inconclusive).
- `minimum_detectable_effect`: the smallest true mean difference a paired design of S seeds x P problems
  detects with probability `power` (two-sided test at 1 - `level`), from the observed variance:
  (z_{1-alpha/2} + z_power) * SE, SE^2 = var(seed means) / S + var(problem means) / P (the two terms the
  two-level bootstrap resamples; the seed term is 0 with one seed), the normal approximation (Student's
  t quantiles for a t test over a few seeds' means).

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
POWER = 0.8


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
    seed_counts, problem_counts = _resampled_counts(s, p, seed)
    means = np.einsum("rs,sp,rp->r", seed_counts, v, problem_counts) / (s * p)  # (R,)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Interval(mean, float(low), float(high), v.size, level)


def _resampled_counts(s: int, p: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(R, S) and (R, P) counts of each seed and problem in R two-level bootstrap resamples (one seed: all 1)."""
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(s, np.full(s, 1 / s), size=RESAMPLES)  # (R, S): seeds drawn with replacement
    problem_counts = rng.multinomial(p, np.full(p, 1 / p), size=RESAMPLES)  # (R, P): problems, likewise
    return (np.ones((RESAMPLES, 1)) if s == 1 else seed_counts), problem_counts


def ratio(
    numerator: Sequence[Sequence[float]], denominator: Sequence[Sequence[float]], level: float = LEVEL, seed: int = 0
) -> Interval:
    """mean(numerator) / mean(denominator), both (S seeds, P problems), with a two-level bootstrap interval
    (resamples whose denominator is 0 are dropped; all of them: NaN)."""
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)  # (S, P)
    if den.sum() == 0:
        return Interval(math.nan, math.nan, math.nan, num.size, level)
    seed_counts, problem_counts = _resampled_counts(*num.shape, seed)
    top = np.einsum("rs,sp,rp->r", seed_counts, num, problem_counts)  # (R,)
    bottom = np.einsum("rs,sp,rp->r", seed_counts, den, problem_counts)  # (R,)
    ratios = top[bottom > 0] / bottom[bottom > 0]
    low, high = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(num.mean() / den.mean()), float(low), float(high), num.size, level)


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


def verdict(interval: Interval, direction: int = 1, null: float = 0.0) -> str:
    """ "yes" when `interval` excludes `null` on the side of `direction` (+1: above, -1: below), "no" when it
    excludes it on the other side, "inconclusive" when it contains it (or is NaN)."""
    if interval.low > null:
        return "yes" if direction > 0 else "no"
    if interval.high < null:
        return "no" if direction > 0 else "yes"
    return "inconclusive"


def minimum_detectable_effect(
    differences: Sequence[float] | Sequence[Sequence[float]],
    level: float = LEVEL,
    power: float = POWER,
    df: int | None = None,
) -> float:
    """The smallest mean of paired `differences` ((P,) problems or (S, P) seeds x problems) that a two-sided
    test at 1 - `level` detects with probability `power`, given their observed variance (module docstring).
    `df`: Student's t quantiles with `df` degrees of freedom instead of the normal ones (a t test over a
    few seeds' means, as `over_seeds` computes its interval)."""
    d = np.atleast_2d(np.asarray(differences, dtype=np.float64))  # (S, P)
    s, p = d.shape
    seed_term = d.mean(1).var(ddof=1) / s if s > 1 else 0.0
    problem_term = d.mean(0).var(ddof=1) / p if p > 1 else 0.0
    dist = stats.norm if df is None else stats.t(df)
    z = dist.ppf((1 + level) / 2) + dist.ppf(power)
    return float(z * math.sqrt(seed_term + problem_term))
