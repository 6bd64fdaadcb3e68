"""Confidence intervals (evaluation/intervals.py): hand-derived t intervals, bootstrap widths against the
normal approximation, coverage by simulation, and the paired difference in the evaluator's table."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_prerl.evaluation import intervals
from lightning_prerl.evaluation.scoring import add_paired_differences, format_table


def test_t_interval_over_seeds_is_the_textbook_one():
    """0.50, 0.60, 0.55: mean 0.55, s = 0.05, t(0.975, 2) = 4.302653 -> half-width 0.124207."""
    ci = intervals.over_seeds([0.5, 0.6, 0.55])
    assert (ci.estimate, ci.n) == (pytest.approx(0.55), 3)
    assert ci.low == pytest.approx(0.55 - 4.302653 * 0.05 / math.sqrt(3), abs=1e-6)
    assert ci.high == pytest.approx(0.55 + 0.124207, abs=1e-6)
    assert intervals.over_seeds([0.4, None, float("nan")]) == intervals.Interval(0.4, 0.4, 0.4, 1)
    assert intervals.over_seeds([]).n == 0


def test_bootstrap_over_problems_has_the_normal_width_and_is_deterministic():
    """400 Bernoulli(0.3) problems: the 95 % interval is about 2 x 1.96 x sqrt(0.3 x 0.7 / 400) = 0.0898 wide."""
    x = (np.random.default_rng(1).random(400) < 0.3).astype(float)
    ci = intervals.over_problems(x)
    assert ci.estimate == pytest.approx(x.mean())
    expected = 2 * 1.96 * math.sqrt(x.mean() * (1 - x.mean()) / 400)
    assert ci.high - ci.low == pytest.approx(expected, rel=0.1)
    assert ci.low < x.mean() < ci.high and intervals.over_problems(x) == ci  # seeded
    assert intervals.over_problems([0.5, 0.5, 0.5]) == intervals.Interval(0.5, 0.5, 0.5, 3)


def test_bootstrap_intervals_cover_the_truth_about_95_percent_of_the_time():
    """200 data sets of 60 problems with accuracy 0.4: the interval holds 0.4 in 88-99 % of them."""
    rng = np.random.default_rng(0)
    hits = [intervals.over_problems((rng.random(60) < 0.4).astype(float), seed=i) for i in range(200)]
    coverage = sum(ci.low <= 0.4 <= ci.high for ci in hits) / len(hits)
    assert 0.88 <= coverage <= 0.99, coverage


def test_seed_variation_widens_the_two_level_interval_and_pairing_narrows_the_difference():
    rng = np.random.default_rng(2)
    problems = rng.random(200)  # per-problem difficulty, shared by every seed and policy
    seeds = np.array([-0.1, 0.0, 0.1])[:, None]  # a seed effect on top
    a = np.clip(problems[None, :] + seeds, 0, 1)  # (3, 200)
    b = np.clip(a + 0.05 * (rng.random((3, 200)) < 0.5), 0, 1)  # B gains on about half the problems
    pooled = intervals.over_problems(a.ravel())
    two_level = intervals.over_seeds_and_problems(a)
    assert two_level.estimate == pytest.approx(a.mean())
    assert two_level.high - two_level.low > 1.5 * (pooled.high - pooled.low)  # seeds are a source of variance
    diff = intervals.paired_difference(a, b)
    assert diff.estimate == pytest.approx((b - a).mean()) and diff.excludes_zero()
    assert diff.high - diff.low < 0.2 * (two_level.high - two_level.low)  # both policies share problem and seed effects
    assert intervals.over_seeds_and_problems(a[:1]) == intervals.over_problems(a[0])


def _result(policy: str, correct: list[int], k: int = 4) -> dict:
    m = {f"avg@{k}": sum(correct) / (len(correct) * k)}
    m |= dict.fromkeys(["pass@1", "pass@2", "pass@4", "maj@4", "response_length", "truncated", "format_valid"], 0.5)
    m |= {"unparsable_ground_truths": 0, "transition_thoughts": 0.0, "reflection_thoughts": 0.0}
    detail = [{"correct": c} for c in correct]
    return {"policy": policy, "benchmark": "b", "problems": len(correct), "samples": k, "metrics": m,
            "problems_detail": detail}  # fmt: skip


def test_paired_differences_of_two_policies_reach_the_table():
    """B solves one more sample than A on every problem: avg@4 + 0.25 exactly, a zero-width paired
    interval, and pass@4 up by 1 - 0 on the problems A never solved."""
    a, b = _result("a", [0, 1, 2, 0]), _result("b", [1, 2, 3, 1])
    add_paired_differences([a, b])
    assert "delta_avg@4" not in a["metrics"]
    assert b["metrics"]["delta_avg@4"] == pytest.approx(0.25)
    assert (b["metrics"]["delta_avg@4_ci_low"], b["metrics"]["delta_avg@4_ci_high"]) == (0.25, 0.25)
    assert b["metrics"]["delta_pass@4"] == pytest.approx(2 / 4)  # problems 0 and 3: 0 -> 1
    table = format_table([a, b])
    assert "avg@4 - first [95% CI]" in table and "+0.250 [+0.250, +0.250]" in table
