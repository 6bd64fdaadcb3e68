"""Exact resume: a run killed with SIGKILL and resumed (`ckpt_path=auto`, same directory) ends with the
same metrics.csv (wall-clock `time/*` columns aside) and bit-identical weights as an uninterrupted run,
for a kill before, at and right after the DSRL switch, with KL on (the reference model is saved and
restored), and under FSDP2 with sharded checkpoints."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time

import pytest
from test_run import run_experiment, start_run

RUN = [
    "objective=dsrl",
    "objective.switch_step=2",
    "objective.main.kl_coef=0.05",  # a reference model, reset at the switch, in every checkpoint
    "trainer.check_val_every_n_epoch=2",  # evaluations at checkpointed steps must survive the resume
    "data.eval_prompts.count=12",
    "data.prompts_per_step=4",
    "data.samples_per_prompt=4",
    "data.sampling.max_new_tokens=48",
    "callbacks.checkpoint.every_n_train_steps=1",
    "trainer.max_steps=5",
]


def metrics(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "logs" / "metrics.csv", newline="") as fh:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(fh)]


def weights(run_dir) -> bytes:
    return (run_dir / "policy" / "model.safetensors").read_bytes()


def kill_after_step(run_dir, k: int, *overrides: str) -> None:
    """Start the run and SIGKILL it as soon as the checkpoint of step k exists (written atomically)."""
    proc = start_run(run_dir, *overrides)
    target = run_dir / "checkpoints" / f"step{k:06d}.ckpt"
    deadline = time.time() + 300
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.exists(), proc.stderr.read().decode()[-3000:]
    assert not (run_dir / "policy").exists()  # it really died mid-run


def kill_at(run_dir, seconds: float, *overrides: str) -> list[str] | None:
    """Start (or resume) the run and SIGKILL it `seconds` later, wherever it is: the checkpoints on disk
    when it was killed, None when it ended first."""
    proc = start_run(run_dir, *overrides, "ckpt_path=auto", stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=seconds)
        return None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return sorted(p.name for p in run_dir.glob("checkpoints/*.ckpt"))


@pytest.mark.slow
def test_kill_and_resume_is_bit_exact_before_at_and_after_the_switch(tmp_path):
    """Killed right after the checkpoint of step 1, 2 (the switch) and 3; then killed at three random
    moments in a row (seeded), wherever the run is (loading, generating, writing a checkpoint), each
    time resumed in the same directory: every ending equals the uninterrupted run."""
    import random

    full = tmp_path / "uninterrupted"
    started = time.perf_counter()
    run_experiment(full, *RUN)
    duration = time.perf_counter() - started
    expected = metrics(full)
    assert [r["step"] for r in expected if r.get("val/accuracy")] == ["0", "2", "4"]
    for k in (1, 2, 3):  # the switch happens before step index 2
        run_dir = tmp_path / f"killed-after-{k}"
        kill_after_step(run_dir, k, *RUN)
        run_experiment(run_dir, *RUN, "ckpt_path=auto")
        assert metrics(run_dir) == expected, k
        assert weights(run_dir) == weights(full), k
    run_dir, draw, kills = tmp_path / "random-kills", random.Random(2604), []
    while len(kills) < 3 and not (run_dir / "policy").exists():
        kills.append(kill_at(run_dir, draw.uniform(0.4, 0.9) * duration, *RUN))
    assert any(kills), kills  # at least one kill landed mid-run, past a checkpoint
    if not (run_dir / "policy").exists():
        run_experiment(run_dir, *RUN, "ckpt_path=auto")
    assert metrics(run_dir) == expected, kills
    assert weights(run_dir) == weights(full), kills


@pytest.mark.slow
def test_fsdp2_sharded_resume_restores_the_reference_and_is_exact(tmp_path):
    sharded = ["trainer=fsdp", *RUN, "objective.switch_step=1", "trainer.max_steps=3", "eval_before_training=false"]
    full = tmp_path / "uninterrupted"
    run_experiment(full, *sharded, timeout=400)
    run_dir = tmp_path / "resumed"
    run_experiment(run_dir, *sharded, "trainer.max_steps=2", timeout=400)  # ends after step 2's checkpoint
    assert (run_dir / "checkpoints" / "step000002.ckpt" / "meta.pt").is_file()
    (run_dir / "policy").rename(tmp_path / "policy-at-2")
    run_experiment(run_dir, *sharded, "ckpt_path=auto", timeout=400)
    assert metrics(run_dir) == metrics(full)
    assert weights(run_dir) == weights(full)
