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


def test_verdicts_follow_the_side_of_the_interval():
    """A paired gain of 0.1 +- 0.01 on 100 problems: yes when the paper expects a gain, no when it expects a
    loss; differences +0.3 and -0.28 alternately (mean 0.01, sd 0.29, interval about +- 1.96 x 0.029): the
    interval holds 0, inconclusive either way."""
    rng = np.random.default_rng(3)
    gain = intervals.over_problems(0.1 + 0.01 * rng.standard_normal(100))
    noisy = intervals.over_problems(np.tile([0.3, -0.28], 50))
    assert intervals.verdict(gain, +1) == "yes" and intervals.verdict(gain, -1) == "no"
    assert intervals.verdict(intervals.Interval(-0.1, -0.12, -0.08, 100), +1) == "no"
    assert intervals.verdict(intervals.Interval(-0.1, -0.12, -0.08, 100), -1) == "yes"
    assert noisy.low < 0 < noisy.high
    assert intervals.verdict(noisy, +1) == intervals.verdict(noisy, -1) == "inconclusive"
    ratio = intervals.Interval(1.5, 1.1, 2.0, 8)  # a ratio: no effect is 1, not 0
    assert intervals.verdict(ratio, +1, null=1.0) == "yes" and intervals.verdict(ratio, -1, null=2.5) == "yes"
    assert intervals.verdict(intervals.Interval(math.nan, math.nan, math.nan, 0), +1) == "inconclusive"


def test_minimum_detectable_effect_is_the_hand_computed_one():
    """Seeds x problems differences [[0, 0.5], [0.5, 1]]: seed means 0.25, 0.75 (var 0.125), problem means
    0.25, 0.75 (var 0.125); SE = sqrt(0.125 / 2 + 0.125 / 2) = 0.353553; z_0.975 + z_0.8 = 1.959964 + 0.841621
    = 2.801585; MDE = 0.990509. One seed of problems [0, 0.5, 1]: var 0.25, SE = sqrt(0.25 / 3) = 0.288675,
    MDE = 0.808748."""
    assert intervals.minimum_detectable_effect([[0, 0.5], [0.5, 1]]) == pytest.approx(0.990509, abs=1e-6)
    assert intervals.minimum_detectable_effect([0, 0.5, 1]) == pytest.approx(0.808748, abs=1e-6)
    assert intervals.minimum_detectable_effect([[0, 0.5, 1]]) == pytest.approx(0.808748, abs=1e-6)
    # over 3 seeds' means, Student's t: (t(0.975, 2) + t(0.8, 2)) x 0.288675 = (4.302653 + 1.060660) x 0.288675
    assert intervals.minimum_detectable_effect([0, 0.5, 1], df=2) == pytest.approx(1.548255, abs=1e-5)
    # 4x the problems halves it: the design's power, from the observed variance
    assert intervals.minimum_detectable_effect([0, 0.5, 1] * 4) == pytest.approx(
        2.801585 * math.sqrt(np.var([0, 0.5, 1] * 4, ddof=1) / 12), abs=1e-6
    )


def test_ratio_of_means_with_its_two_level_interval():
    """Thoughts after / before: 3 per problem after against 1 before on every problem and seed: exactly 3 (a
    zero-width interval); after 0 or 2 alternately (mean 1) against 1: 1, the interval holds 1."""
    before = np.ones((2, 40))  # (S, P)
    assert intervals.ratio(3 * before, before) == intervals.Interval(3.0, 3.0, 3.0, 80)
    noisy = intervals.ratio(np.tile([0.0, 2.0], (2, 20)), before)
    assert noisy.estimate == pytest.approx(1.0) and noisy.low < 1 < noisy.high
    assert 0.2 < noisy.high - noisy.low < 1.0  # about 2 x 1.96 x 1 / sqrt(40) = 0.62
    assert math.isnan(intervals.ratio(before, 0 * before).estimate)
