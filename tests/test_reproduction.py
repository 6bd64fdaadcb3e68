"""The "thoughts" toy world, pass@k curves and the reproduction report (`experiment=reproduce_toy`)."""

from __future__ import annotations

import csv
import json
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
from lightning_prerl.evaluation.passk import pass_at_ks
from lightning_prerl.reports.logs import read_metrics
from lightning_prerl.reproduction.repairs import slip_stats
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
            "23+45=69.",  # slip, repaired by a reflection
            "Wait, let me check: 23+45=68, not 69.",
            "68-17=50.",  # slip, repaired by a transition
            "Alternatively, 68-10=58 and 58-7=51.",
            "51+2=53.",  # correct, checked
            "Wait, let me check: 51+2=53.",
            "53+1=55.",  # slip, left alone
            "55-5=50.",  # correct
            "The answer is \\boxed{50}.",
        ]
    )
    assert slip_counts(answer) == SlipCounts(steps=5, slips=3, reflected=1, switched=1, checks=1)
    stats = slip_stats([answer, "1+1=2.\n\nThe answer is \\boxed{2}."])
    assert stats["slips_per_answer"] == 1.5 and stats["repair_share"] == pytest.approx(2 / 3)
    assert stats["reflect_share"] == pytest.approx(1 / 3) and stats["check_share"] == pytest.approx(1 / 3)  # 1 of 3


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
) -> None:
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
    assert grpo["finals"]["val/accuracy"] == pytest.approx([0.51, 0.01 * 2**0.5])
    assert [s["per_seed"] for s in grpo["steps_to_threshold"]] == [[20, 10], [20, 20], [None, None]]
    assert [s["mean"] for s in grpo["steps_to_threshold"]] == [15, 20, None]
    assert [s["per_seed"] for s in dsrl["steps_to_threshold"]] == [[10, 10], [10, 20], [20, 20]]
    assert nsr["thought_ratio"]["val/transition_thoughts"][0] == pytest.approx(2.0)
    assert nsr["thought_ratio"]["val/reflection_thoughts"][0] == pytest.approx(3.0)
    assert grpo["pass_at_k"]["1"] == pytest.approx([0.505, 0.01 / 2**0.5])  # jobs 0 and 1: 0.50, 0.51
    assert data["base"]["pass_at_k"]["2"][0] == pytest.approx(0.6)
    assert data["base"]["seeds"] == 2 and data["base"]["alignment"]["samples"] == 8  # one job per seed, not 8 jobs
    assert data["base"]["alignment"]["negative_share"] == pytest.approx(0.25)  # 2 of those 8 step-0 rows
    assert data["base"]["alignment"]["cosine_mean"] == pytest.approx(0.225)
    assert grpo["alignment_after"]["negative_share"] == pytest.approx(0.5)
    assert data["real_model"]["alignment"]["cosine_mean"] == pytest.approx(0.6)
    assert [f["same direction"] for f in data["findings"]] == ["toy: partly; real model: yes", "yes", "yes", "yes"]
    md = (tmp_path / "reproduction.md").read_text()
    assert "| grpo | 0.450 (+0.05) | 20, 10 | 2/2 | 15.0 |" in md and "0.510 ± 0.014" in md
    assert "| grpo | 0.550 (+0.15) | never, never | 0/2 | – |" in md
    for png in ("repro_accuracy", "repro_thoughts", "repro_pass_at_k", "repro_alignment"):
        assert (tmp_path / f"{png}.png").stat().st_size > 10_000


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
    ):
        assert section in md
    data = json.loads((sweep / "reproduction.json").read_text())
    assert data["objectives"] == ["grpo", "dsrl", "psr_prerl", "nsr_prerl"] and data["ks"] == [1, 2, 4]
    assert len(data["jobs"]) == 8 and len(data["findings"]) == 4
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
    assert data["objective"]["grpo"]["finals"]["val/accuracy"][0] == pytest.approx(sum(grpo) / 2)
    for png in ("repro_accuracy", "repro_thoughts", "repro_pass_at_k", "repro_alignment"):
        assert (sweep / f"{png}.png").is_file()
