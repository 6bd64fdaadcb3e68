"""End to end: the real `experiments/run.py` on the shipped toy policy, checked by its artefacts."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "trainer.max_steps=3",
    "objective.switch_step=2",  # the default DSRL switches within the 3 steps
    "trainer.check_val_every_n_epoch=3",
    "data.prompts_per_step=4",
    "data.samples_per_prompt=4",
    "data.eval_prompts.count=16",
    "data.eval_prompts_per_batch=8",
    "data.sampling.max_new_tokens=64",
    "callbacks.checkpoint.every_n_train_steps=2",
]


def run_experiment(run_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "experiments/run.py", f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def start_run(run_dir: Path, *overrides: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    """`experiments/run.py` started in its own process group (`os.killpg` kills it and its workers);
    stderr kept for the failure message unless told otherwise."""
    return subprocess.Popen(
        [sys.executable, "experiments/run.py", f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )


def read_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def steps_with(rows, key) -> list[int]:
    return [int(r["step"]) for r in rows if r.get(key)]


@pytest.mark.slow
def test_default_experiment_runs_and_writes_every_artefact(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_experiment(run_dir, *FAST)
    rows = read_rows(run_dir)
    assert steps_with(rows, "train/loss") == [0, 1, 2]
    assert steps_with(rows, "val/accuracy") == [0, 3]  # before training and after the last step
    # step 0's evaluation runs inside fit: Trainer.validate (which prints this table) would build
    # DeepSpeed's separate inference engine under ZeRO-3 (heldout.HeldOutEvaluation.on_train_start)
    assert "Validate metric" not in proc.stdout
    # the first five minutes: nothing printed that the user did not ask for (compose.quiet_libraries)
    output = proc.stdout + proc.stderr
    for noise in ("Setting accelerator to CPU", "LeafSpec", "Loading weights", "Writing model shards", "Warning"):
        assert noise not in output, noise
    after_summary = proc.stdout.split("Run summary")[1]
    assert "Epoch" not in after_summary, "the progress bar was drawn again after the summary"
    assert "_thoughts" not in after_summary  # the toy world has no thoughts: 0 -> 0 rows are not shown
    for key in ("rollout/reward_mean", "rollout/format_valid", "time/generate", "val/pass@2"):
        assert steps_with(rows, key), key
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} >= {"last.ckpt", "step000002.ckpt"}
    assert (run_dir / "config.yaml").read_text().count("_target_") > 3
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert list((run_dir / "logs").glob("events.out.tfevents.*"))
    png = (run_dir / "report.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000

    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(run_dir / "policy")
    tok = AutoTokenizer.from_pretrained(run_dir / "policy")
    assert policy.config.vocab_size == len(tok)
    shipped = AutoModelForCausalLM.from_pretrained(ROOT / "lightning_prerl" / "assets" / "toy-base")
    moved = [n for n, p in policy.named_parameters() if not p.data.equal(shipped.get_parameter(n).data)]
    assert moved, "three optimizer steps left the exported policy identical to the base"


@pytest.mark.slow
def test_ddp_two_processes_train_and_agree(tmp_path, monkeypatch):
    """Lightning DDP (gloo) with 2 CPU processes: each rank draws its own prompts, and both end on the
    same weights, bit for bit (tests/rank_probe.py writes each rank's prompts and weight digest). Catches
    ranks that train on the same slice, and replicas that drift apart (an update outside DDP's sync).
    Rank 1 runs out of memory in step 1's forward: both ranks retry the pass with half the tokens
    (training/oom.py), in lockstep, and still agree. The pass@k callback's per-problem record gathers both
    ranks' problems (3 problems: rank 0 draws 0 and 2, rank 1 draws 1 and a padding one, never written)."""
    import json

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")])))
    run_dir = tmp_path / "ddp"
    run_experiment(
        run_dir,
        "+callbacks.probe._target_=rank_probe.RankProbe",
        f"+callbacks.probe.out_dir={run_dir}",
        "+callbacks.probe.oom_rank=1",
        "+callbacks.probe.oom_step=1",
        "trainer=ddp",
        "objective=grpo",
        "trainer.max_steps=2",
        "trainer.check_val_every_n_epoch=2",
        "data.prompts_per_step=2",
        "data.samples_per_prompt=4",
        "data.eval_prompts.count=8",
        "data.sampling.max_new_tokens=48",
        "+callbacks.pass_at_k._target_=lightning_prerl.evaluation.passk.PassAtKCurve",
        "+callbacks.pass_at_k.samples=2",
        "+callbacks.pass_at_k.problems=3",
        timeout=400,
    )
    rows = read_rows(run_dir)
    with open(run_dir / "logs" / "passk_problems.csv", newline="") as fh:
        problems = [{k: int(v) for k, v in r.items()} for r in csv.DictReader(fh)]
    assert [(r["step"], r["problem"], r["samples"]) for r in problems] == [(s, p, 2) for s in (0, 2) for p in range(3)]
    for step in (0, 2):  # the logged pass@1 is the per-problem record's mean
        pass1 = next(float(r["passk/pass@1"]) for r in rows if r.get("passk/pass@1") and int(r["step"]) == step)
        assert pass1 == pytest.approx(sum(r["correct"] for r in problems if r["step"] == step) / 6)
    assert steps_with(rows, "train/loss") == [0, 1]
    assert steps_with(rows, "val/accuracy") == [0, 2]
    ranks = [json.loads((run_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["prompts"]) for r in ranks] == [2, 2]  # one rollout batch per step on each rank
    for step in (0, 1):
        assert ranks[0]["prompts"][step] != ranks[1]["prompts"][step]  # each rank its own slice
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert [float(r["train/oom_retries"]) for r in rows if r.get("train/oom_retries")] == [0, 1]  # both ranks halved
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "policy") is not None


@pytest.mark.slow
def test_evaluate_script_writes_avg_and_pass_at_k(tmp_path):
    import json

    run_dir = tmp_path / "eval"
    proc = subprocess.run(
        [
            sys.executable,
            "experiments/evaluate.py",
            f"hydra.run.dir={run_dir}",
            "eval.benchmarks=[heldout]",  # the data config's own held-out set and reward (toy)
            "eval.samples=4",
            "data.eval_prompts.count=12",
            "data.sampling.max_new_tokens=100",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "evaluation.json").read_text())
    (result,) = report["results"]
    m = result["metrics"]
    assert result["problems"] == 12 and result["samples"] == 4
    assert 0 <= m["pass@1"] <= m["pass@2"] <= m["pass@4"] <= 1
    assert m["pass@1"] == pytest.approx(m["avg@4"])  # unbiased pass@1 is the mean accuracy
    assert m["avg@4"] > 0.1  # the shipped policy solves a good share of its own world


@pytest.mark.slow
def test_pretrain_script_rebuilds_a_loadable_toy_policy(tmp_path):
    out = tmp_path / "toy"
    proc = subprocess.run(
        [sys.executable, "experiments/pretrain_toy.py", "--steps", "3", "--eval-every", "3", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.head_dim >= 32 and len(AutoTokenizer.from_pretrained(out)) == model.config.vocab_size
    assert '"step": 3' in (out / "pretraining.json").read_text()
