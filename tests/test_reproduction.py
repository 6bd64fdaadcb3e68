"""The "thoughts" toy world, pass@k curves and the reproduction report (`experiment=reproduce_toy`)."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_prerl.data.toyworld import (
    THOUGHTS_MODEL_DIR,
    SlipCounts,
    ToyProblem,
    generate_problems,
    slip_counts,
    thought_trace,
)
from lightning_prerl.evaluation.metrics import ThoughtCounts
from lightning_prerl.evaluation.passk import PROBLEM_FIELDS, PROBLEMS_FILE, pass_at_ks
from lightning_prerl.reports.logs import read_metrics
from lightning_prerl.reproduction import stats
from lightning_prerl.reproduction.repairs import slip_intervals, slip_stats
from lightning_prerl.reproduction.report import read_alignment, write_reproduction_report

ROOT = Path(__file__).resolve().parents[1]
SEAL = ThoughtCounts(
    ["^alternatively", "another way"], ["^wait", "let me check"]
)  # the SEAL keywords these traces use (conf/behavior/seal.yaml)


def test_thought_trace_writes_one_thought_per_step_and_repairs_slips():
    problem = ToyProblem((23, 45, 17), ("+", "-"))
    clean = thought_trace(problem, random.Random(0), p_slip=0.0, p_vacuous=0.0)
    assert clean == "23+45=68.\n\n68-17=51.\n\nThe answer is \\boxed{51}."
    assert SEAL.classify(clean) == ["execution", "execution"]  # the first thought is no thought (SEAL)
    reflect = thought_trace(problem, random.Random(0), p_slip=1.0, p_repair=1.0, p_reflect=1.0, p_vacuous=0.0)
    assert reflect.endswith("\\boxed{51}.") and reflect.count("Wait, let me check: ") == 2
    assert SEAL.classify(reflect).count("reflection") == 2
    switch = thought_trace(problem, random.Random(0), p_slip=1.0, p_repair=1.0, p_reflect=0.0, p_vacuous=0.0)
    assert "Alternatively, 23+40=63 and 63+5=68." in switch and "Alternatively, 68-10=58 and 58-7=51." in switch
    assert SEAL.classify(switch).count("transition") == 2 and switch.endswith("\\boxed{51}.")
    unrepaired = thought_trace(problem, random.Random(0), p_slip=1.0, p_repair=0.0, p_vacuous=0.0)
    assert not unrepaired.endswith("\\boxed{51}.") and "Wait" not in unrepaired
    # inverse check when the operand has no tens or no units: 51+20 -> "71-20=51, so 51+20=71"
    inverse = thought_trace(ToyProblem((51, 20), ("+",)), random.Random(0), p_slip=1.0, p_repair=1.0, p_reflect=0.0)
    assert "Alternatively, 71-20=51, so 51+20=71." in inverse


def test_thought_corpus_rates_are_the_documented_ones():
    """A perfect imitator of the corpus solves ~79 %: the 2-3 steps each slip unrepaired with p 0.2 x 0.5."""
    rng = random.Random(0)
    problems = generate_problems(4000, split="train", seed=0)
    traces = [thought_trace(p, rng) for p in problems]
    correct = sum(t.endswith(f"\\boxed{{{p.answer}}}.") for p, t in zip(problems, traces, strict=True)) / len(traces)
    steps = sum(len(p.ops) for p in problems) / len(problems)
    assert correct == pytest.approx(0.9**steps, abs=0.02)  # ~0.9^2.5 = 0.77
    kinds = [k for t in traces for k in SEAL.classify(t)]
    # per step: 0.2 x 0.5 x 0.5 repairs of each kind + 0.8 x 0.05 vacuous ones = 0.09
    assert kinds.count("reflection") / len(traces) == pytest.approx(0.09 * steps, rel=0.1)
    assert kinds.count("transition") / len(traces) == pytest.approx(0.09 * steps, rel=0.1)


def test_shipped_thoughts_policy_is_in_the_rl_band():
    record = json.loads((THOUGHTS_MODEL_DIR / "pretraining.json").read_text())
    assert "--world thoughts" in record["command"]
    assert 0.2 <= record["history"][-1]["pass1_t1"] <= 0.6
    assert sum(f.stat().st_size for f in THOUGHTS_MODEL_DIR.iterdir()) < 3_000_000


def test_slip_counts_follow_what_comes_after_each_wrong_step():
    answer = "\n\n".join(
        [
            "23+45=69.",  # slip (68), a reflection states 68 and the next step starts from 68: fixed
            "Wait, let me check: 23+45=68, not 69.",
            "68-17=50.",  # slip (51), a transition ends on 51 and 51 goes on: fixed
            "Alternatively, 68-10=58 and 58-7=51.",
            "51+2=53.",  # correct, checked
            "Wait, let me check: 51+2=53.",
            "53+1=55.",  # slip (54), left alone
            "55-5=50.",  # correct
            "50+7=56.",  # slip (57), the reflection states a wrong value (58): an attempt, not fixed
            "Wait, let me check: 50+7=58, not 56.",
            "58+3=62.",  # slip (61), the transition states 61 but the answer goes on from 62: not fixed
            "Alternatively, 61-3=58, so 58+3=61.",
            "62-2=60.",  # correct
            "60-2=57.",  # slip (58), the last step: the reflection states 58 and the boxed answer is 58: fixed
            "Wait, let me check: 60-2=58, not 57.",
            "The answer is \\boxed{58}.",
        ]
    )
    counts = slip_counts(answer)
    assert counts == SlipCounts(steps=9, slips=6, reflected=3, switched=2, checks=1, fixed=3)
    stats = slip_stats([answer, "1+1=2.\n\nThe answer is \\boxed{2}."])
    assert stats["slips_per_answer"] == 3 and stats["repair_share"] == pytest.approx(5 / 6)  # attempts / slips
    assert stats["fixed_share"] == pytest.approx(3 / 6) and stats["fix_rate"] == pytest.approx(3 / 5)
    assert stats["reflect_share"] == pytest.approx(3 / 6) and stats["check_share"] == pytest.approx(1 / 4)  # 10 - 6
    # intervals over answers (ratios of sums): resampling [answer, answer], [answer, plain] or [plain, plain]
    ci = slip_intervals([stats])
    assert ci["fixed_share"] == {"estimate": 0.5, "low": 0.5, "high": 0.5, "n": 2}  # plain has no slip: dropped or 0/0
    assert (ci["slips_per_answer"]["low"], ci["slips_per_answer"]["high"]) == (0.0, 6.0)  # 0, 3 or 6 slips per answer
    assert slip_intervals([stats, stats])["repair_share"]["estimate"] == pytest.approx(5 / 6)  # two seeds


def test_pass_at_ks_is_the_unbiased_estimator():
    # 4 samples, problems with 0, 1 and 4 correct: pass@1 = 0 + 1/4 + 1; pass@2 = 0 + (1 - C(3,2)/C(4,2)) + 1
    sums = pass_at_ks([0, 1, 4], 4, [1, 2, 4])
    assert sums.tolist() == pytest.approx([1.25, 1.5, 2.0])


def _job(
    root: Path,
    number: int,
    objective: str,
    seed: int,
    curve: list[float],
    thoughts: list[tuple[float, float]],
    passk: tuple[float, float],
    problems: dict[int, list[tuple[int, int, int]]] | None = None,
) -> None:
    """A job dir as a run writes it; `problems`: {step: per-problem (correct, transition, reflection) of 4
    samples} for `logs/passk_problems.csv`."""
    d = root / str(number)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(f"- objective={objective}\n- seed={seed}\n")
    (d / "logs").mkdir()
    keys = ["val/accuracy", "val/transition_thoughts", "val/reflection_thoughts", "passk/pass@1", "passk/pass@2"]
    with open(d / "logs" / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", *keys])
        for i, (acc, (t, r)) in enumerate(zip(curve, thoughts, strict=True)):
            pk = (0.4, 0.6) if i == 0 else passk if i == len(curve) - 1 else ("", "")
            w.writerow([10 * i, acc, t, r, *pk])
    with open(d / "logs" / "alignment.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "sample", "reward", "inner", "cosine", "logp_gap"])
        for i, (inner, cos) in enumerate([(1, 0.5), (-1, -0.1), (2, 0.3), (3, 0.2)]):
            w.writerow([0, i, 1, inner, cos, 0.5])
        for i, (inner, cos) in enumerate([(1, 0.4), (-2, 0.6)]):
            w.writerow([10 * (len(curve) - 1), i, 0, inner, cos, 0.5])
    if problems:
        rows = [[step, p, 4, *row] for step, per in problems.items() for p, row in enumerate(per)]
        lines = [",".join(PROBLEM_FIELDS)] + [",".join(map(str, r)) for r in rows]
        (d / "logs" / PROBLEMS_FILE).write_text("\n".join(lines) + "\n")


def test_report_numbers_are_hand_derivable_from_logs(tmp_path):
    base_thoughts = (0.2, 0.1)
    runs = {  # objective: per seed (accuracy at steps 0, 10, 20)
        "grpo": ([0.4, 0.44, 0.50], [0.4, 0.46, 0.52]),
        "nsr_prerl": ([0.4, 0.3, 0.2], [0.4, 0.3, 0.2]),
        "psr_prerl": ([0.4, 0.42, 0.30], [0.4, 0.42, 0.30]),
        "dsrl": ([0.4, 0.50, 0.60], [0.4, 0.48, 0.56]),
    }
    n = 0
    for objective, seeds in runs.items():
        for seed, curve in enumerate(seeds):
            final = (0.4, 0.3) if objective == "nsr_prerl" else base_thoughts
            _job(tmp_path, n, objective, seed, curve, [base_thoughts, base_thoughts, final], (0.5 + n / 100, 0.7))
            n += 1
    real = tmp_path / "real_run"  # no .hydra: not a job of the sweep, only a real model's alignment rows
    (real / "logs").mkdir(parents=True)
    (real / "logs" / "alignment.csv").write_text(
        "step,sample,reward,inner,cosine,logp_gap\n0,0,0,5,0.7,0.3\n0,1,0,3,0.5,0.4\n"
    )
    write_reproduction_report(tmp_path, real)
    data = json.loads((tmp_path / "reproduction.json").read_text())
    assert data["thresholds"] == pytest.approx([0.45, 0.5, 0.55])  # base 0.4 + 0.05, 0.1, 0.15
    grpo, dsrl, nsr = (data["objective"][o] for o in ("grpo", "dsrl", "nsr_prerl"))
    t = 12.706205  # t(0.975, 1): two seeds, per-seed means without per-problem records
    assert grpo["finals"]["val/accuracy"] == pytest.approx(
        {"estimate": 0.51, "low": 0.51 - t * 0.01, "high": 0.51 + t * 0.01, "n": 2}  # s = 0.01 x sqrt(2)
    )
    assert [s["per_seed"] for s in grpo["steps_to_threshold"]] == [[20, 10], [20, 20], [None, None]]
    assert [s["mean"] for s in grpo["steps_to_threshold"]] == [15, 20, None]
    assert [s["per_seed"] for s in dsrl["steps_to_threshold"]] == [[10, 10], [10, 20], [20, 20]]
    assert nsr["thought_ratio"]["val/transition_thoughts"]["estimate"] == pytest.approx(2.0)
    assert nsr["thought_ratio"]["val/reflection_thoughts"]["low"] == pytest.approx(3.0)  # both seeds 3.0
    assert grpo["pass_at_k"]["1"]["estimate"] == pytest.approx(0.505)  # jobs 0 and 1: 0.50, 0.51
    assert grpo["pass_at_k"]["1"]["high"] == pytest.approx(0.505 + t * 0.005)
    assert data["base"]["pass_at_k"]["2"]["estimate"] == pytest.approx(0.6)
    # paired per seed: DSRL - GRPO = 0.10, 0.04 (mean 0.07, s 0.042426); PSR-PreRL - base = -0.1, -0.1
    dsrl_grpo = next(c for c in data["comparisons"] if c["comparison"] == "dsrl - grpo")
    assert dsrl_grpo["metric"] == "val/accuracy" and dsrl_grpo["estimate"] == pytest.approx(0.07)
    assert dsrl_grpo["high"] == pytest.approx(0.07 + t * 0.03)  # s / sqrt(2) = 0.03
    assert dsrl_grpo["mde"] == pytest.approx((t + 1.376382) * 0.03, abs=1e-6)  # t(0.975, 1) + t(0.8, 1)
    psr_base = next(c for c in data["comparisons"] if c["comparison"] == "psr_prerl - base")
    assert (psr_base["low"], psr_base["high"]) == pytest.approx((-0.1, -0.1))
    assert data["base"]["seeds"] == 2 and data["base"]["alignment"]["samples"] == 8  # one job per seed, not 8 jobs
    assert data["base"]["alignment"]["negative_share"] == pytest.approx(0.25)  # 2 of those 8 step-0 rows
    assert data["base"]["alignment"]["cosine_mean"] == pytest.approx(0.225)
    assert grpo["alignment_after"]["negative_share"] == pytest.approx(0.5)
    assert data["real_model"]["alignment"]["cosine_mean"] == pytest.approx(0.6)
    assert data["base"]["alignment"]["ci"]["cosine_mean"]["low"] > 0  # 6 of the 8 cosines are >= 0.2
    # speed: held-out curve means after step 0 per seed: DSRL 0.55, 0.52; GRPO 0.47, 0.49 -> 0.08, 0.03 (s 0.035355)
    speed = next(c for c in data["speed"] if c["metric"] == "val/accuracy curve mean")
    assert speed["comparison"] == "dsrl - grpo" and speed["estimate"] == pytest.approx(0.055)
    assert speed["high"] == pytest.approx(0.055 + t * 0.025)  # s / sqrt(2) = 0.025
    assert [f["verdict"] for f in data["findings"]] == [
        "thoughts: yes; real model: yes",  # a sweep of objectives runs on the "thoughts" world
        "transition: yes; reflection: yes",  # ratios 2 and 3 on both seeds: zero-width intervals
        "inconclusive",  # DSRL - GRPO 0.07 [-0.31, 0.45] over 2 seeds
        "inconclusive",  # curve means: +0.055 [-0.26, 0.37]
        "yes",  # PSR-PreRL - base -0.1 on both seeds
    ]
    md = (tmp_path / "reproduction.md").read_text()
    assert "| grpo | 0.450 (+0.05) | 20, 10 | 2/2 | 15.0 |" in md and "0.510 [0.383, 0.637]" in md
    assert "| dsrl - grpo | val/accuracy | 2 | – | +0.070 [-0.311, +0.451] | contains 0 | 0.422 |" in md
    assert "## Paired differences and power" in md and "**inconclusive** when it contains it" in md
    assert "| grpo | 0.550 (+0.15) | never, never | 0/2 | – |" in md
    for png in ("repro_accuracy", "repro_thoughts", "repro_pass_at_k", "repro_alignment"):
        assert (tmp_path / f"{png}.png").stat().st_size > 10_000


def test_findings_are_judged_from_per_problem_intervals(tmp_path):
    """Per-problem records of 2 seeds x 20 problems x 4 samples (the same on both seeds): base solves 1 and 3
    of 4 alternately (pass@1 0.5). GRPO and PSR-PreRL solve one more everywhere (+0.25 on every problem);
    DSRL two more on even problems, one more on odd (DSRL - GRPO: +0.25, 0 alternately, mean 0.125, clearly
    positive: yes). PSR-PreRL ends above base, against the paper's collapse: no. NSR-PreRL's transition
    thoughts go from 1 per response to 0 or 2 alternately (ratio 1, noisy: inconclusive), reflections from 1
    to 2.5 or 3.5 (ratio 3, interval well above 1: yes)."""
    base = [(1 + 2 * (p % 2), 4, 4) for p in range(20)]  # (correct, transition, reflection) of 4 samples
    plus = {  # objective: each problem's final (correct, transition, reflection)
        "grpo": [(c + 1, t, r) for c, t, r in base],
        "dsrl": [(min(4, c + 2), t, r) for c, t, r in base],
        "psr_prerl": [(c + 1, t, r) for c, t, r in base],
        "nsr_prerl": [(c, 8 * (p % 2), 10 + 4 * (p % 2)) for p, (c, _, _) in enumerate(base)],
    }
    n = 0
    for objective, final in plus.items():
        for seed in (0, 1):
            thoughts = [(0.2, 0.1)] * 3
            _job(tmp_path, n, objective, seed, [0.4, 0.4, 0.4], thoughts, (0.5, 0.7), {0: base, 20: final})
            n += 1
    write_reproduction_report(tmp_path)
    data = json.loads((tmp_path / "reproduction.json").read_text())
    assert data["base"]["heldout"]["pass@1"]["estimate"] == pytest.approx(0.5)
    assert data["base"]["heldout"]["pass@2"]["estimate"] == pytest.approx(0.75)  # (1 - C(3,2)/C(4,2) + 1) / 2
    dsrl = data["objective"]["dsrl"]["heldout"]["pass@1"]
    assert dsrl["estimate"] == pytest.approx(0.875) and dsrl["n"] == 40
    c = next(c for c in data["comparisons"] if c["comparison"] == "dsrl - grpo" and c["metric"] == "pass@1")
    assert (c["estimate"], c["seeds"], c["problems"]) == (pytest.approx(0.125), 2, 20)
    assert 0.05 < c["low"] < 0.1 and 0.15 < c["high"] < 0.2  # about 0.125 +- 1.96 x 0.0287
    # MDE: problem means 0.25, 0 (var 20 x 0.125^2 / 19 = 0.016447), seed means equal: 2.801585 x sqrt(0.016447 / 20)
    assert c["mde"] == pytest.approx(2.801585 * math.sqrt(0.0164474 / 20), abs=1e-5)
    nsr = data["objective"]["nsr_prerl"]["thought_ratio"]
    assert nsr["val/transition_thoughts"]["estimate"] == pytest.approx(1.0)
    assert nsr["val/transition_thoughts"]["low"] < 1 < nsr["val/transition_thoughts"]["high"]
    assert nsr["val/reflection_thoughts"]["estimate"] == pytest.approx(3.0)
    assert 2.5 < nsr["val/reflection_thoughts"]["low"] < 3 < nsr["val/reflection_thoughts"]["high"] < 3.5
    verdicts = [f["verdict"] for f in data["findings"]]
    assert verdicts[1:] == ["transition: inconclusive; reflection: yes", "yes", "inconclusive", "no"]
    md = (tmp_path / "reproduction.md").read_text()
    assert "| dsrl - grpo | pass@1 | 2 | 20 | +0.125 [" in md and "| above 0 | 0.080 |" in md
    assert "| dsrl | 0.875 [" in md  # the pass@k table from the per-problem records


@pytest.mark.slow
def test_reproduce_toy_command_with_reduced_settings(tmp_path):
    """`experiment=reproduce_toy` end to end (4 objectives x 2 seeds x 2 steps, smaller evaluations): the report
    exists, has its sections, and its numbers are the runs' own logged values."""
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable, "experiments/run.py", "experiment=reproduce_toy", f"hydra.sweep.dir={sweep}",
        "seed=0,1", "trainer.max_steps=2", "trainer.check_val_every_n_epoch=1",
        "dsrl.switch_step=1", "data.prompts_per_step=4", "data.samples_per_prompt=4", "data.eval_prompts.count=8",
        "data.sampling.max_new_tokens=96", "callbacks.pass_at_k.samples=4", "callbacks.pass_at_k.problems=4",
        "callbacks.alignment.max_samples=2", "callbacks.checkpoint.every_n_train_steps=100",
        "hydra.callbacks.reproduction_report.slip_problems=3", "hydra.callbacks.reproduction_report.slip_samples=2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md = (sweep / "reproduction.md").read_text()
    for section in (
        "## The paper's findings",
        "## Final held-out numbers",
        "## pass@k",
        "## Steps to a held-out accuracy",
        "## After a slip",
        "## Transition and reflection thoughts",
        "## Gradient alignment",
        "## Paired differences and power",
    ):
        assert section in md
    data = json.loads((sweep / "reproduction.json").read_text())
    assert data["objectives"] == ["grpo", "dsrl", "psr_prerl", "nsr_prerl"] and data["ks"] == [1, 2, 4]
    assert len(data["jobs"]) == 8 and len(data["findings"]) == 5
    for job in data["jobs"]:  # every number is the job's own last logged value
        series = read_metrics(Path(job["dir"]) / "logs" / "metrics.csv")
        assert job["final_step"] == 2
        assert job["finals"]["val/accuracy"] == series["val/accuracy"][-1][1]
        assert job["base"]["val/accuracy"] == series["val/accuracy"][0][1]
        assert [s for s, _ in series["passk/pass@4"]] == [0, 2]
        assert job["pass_at_k"]["4"] == series["passk/pass@4"][-1][1]
        rows = read_alignment(Path(job["dir"]))
        assert sorted({r["step"] for r in rows}) == [0, 2] and len(rows) == 4
        after = [r for r in rows if r["step"] == 2]
        assert job["alignment_after"]["negative_share"] == sum(r["inner"] < 0 for r in after) / 2
        assert job["slips"]["answers"] == 6  # 3 problems x 2 answers of the job's exported policy
    assert data["base"]["slips"]["answers"] == 6
    grpo = [j["finals"]["val/accuracy"] for j in data["jobs"] if j["objective"] == "grpo"]
    assert data["objective"]["grpo"]["finals"]["val/accuracy"]["estimate"] == pytest.approx(sum(grpo) / 2)
    for job in data["jobs"]:  # every job's per-problem record: the base and the trained policy on 4 problems
        problems = stats.read_problems(Path(job["dir"]))
        assert sorted(problems["base"]) == sorted(problems["final"]) == [0, 1, 2, 3]
    dsrl_grpo = [c for c in data["comparisons"] if c["comparison"] == "dsrl - grpo"]
    assert [(c["metric"], c["seeds"], c["problems"]) for c in dsrl_grpo] == [("pass@1", 2, 4), ("pass@4", 2, 4)]
    for f in data["findings"]:
        assert f["verdict"].split(": ")[-1] in ("yes", "no", "inconclusive")
    assert "fixed_share" in data["base"]["slips"]
    for png in ("repro_accuracy", "repro_thoughts", "repro_pass_at_k", "repro_alignment"):
        assert (sweep / f"{png}.png").is_file()
