"""Checkpoints: keep-last-N, `ckpt_path=auto`, and one line for a checkpoint this run cannot resume from,
before any model is loaded."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from test_run import ROOT, run_experiment

from lightning_prerl.scale.models import resolve_model_path
from lightning_prerl.training.checkpoints import CheckpointError, check_checkpoint, newest_checkpoint

SHORT = [
    "objective=grpo",
    "trainer.max_steps=4",
    "eval_before_training=false",
    "trainer.check_val_every_n_epoch=100",
    "data.prompts_per_step=2",
    "data.samples_per_prompt=2",
    "data.sampling.max_new_tokens=16",
    "callbacks.checkpoint.every_n_train_steps=1",
    "callbacks.checkpoint.save_top_k=2",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpts") / "run"
    run_experiment(out, *SHORT)
    return out


def _objective(run_dir) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["objective"]


@pytest.mark.slow
def test_only_the_newest_n_are_kept_and_auto_finds_the_newest_complete(run_dir, tmp_path):
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["last.ckpt", "step000003.ckpt", "step000004.ckpt"]
    assert newest_checkpoint(run_dir) == run_dir / "checkpoints" / "step000004.ckpt"
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "checkpoints", copy / "checkpoints")
    (copy / "checkpoints" / "step000005.ckpt").write_bytes(b"PK\x03\x04 half a zip")  # an interrupted write
    (copy / "checkpoints" / "step000006.ckpt").mkdir()  # a sharded save that never wrote meta.pt
    assert newest_checkpoint(copy) == copy / "checkpoints" / "step000004.ckpt"
    shutil.copy(run_dir / "checkpoints" / "step000004.ckpt", copy / "checkpoints" / "fault-step000007.ckpt")
    assert newest_checkpoint(copy) == copy / "checkpoints" / "step000004.ckpt"  # complete, but a fault's: never auto
    assert newest_checkpoint(tmp_path / "nothing-here") is None


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "cannot be read"),
        ("foreign", "not a Lightning checkpoint (no global_step)"),
        ("other-program", "written by another program (no run_identity)"),
        ("other-objective", "written for another objective config (objective.eps_high: checkpoint 0.2, now 0.3)"),
        ("other-model", "written for another model (embedding [100, 128], model.path has [100, 64])"),
        ("missing", "does not exist"),
        ("sharded-without-metadata", "sharded directory without .metadata"),
    ],
)
def test_a_checkpoint_that_cannot_resume_this_run_fails_in_one_line(run_dir, tmp_path, tiny_model_dir, damage, message):
    good = run_dir / "checkpoints" / "step000004.ckpt"
    path, model, objective = tmp_path / "bad.ckpt", resolve_model_path("toy"), _objective(run_dir)
    if damage == "truncate":
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "foreign":
        torch.save({"weights": torch.zeros(2)}, path)
    elif damage == "other-program":
        state = torch.load(good, weights_only=True)
        del state["run_identity"]
        torch.save(state, path)
    elif damage == "other-objective":
        path, objective = good, {**objective, "eps_high": 0.3}
    elif damage == "other-model":
        path, model = good, tiny_model_dir  # same vocabulary, hidden 64 instead of the toy's 128
    elif damage == "sharded-without-metadata":
        path.mkdir()
    with pytest.raises(CheckpointError) as exc:
        check_checkpoint(path, model, objective)
    assert str(exc.value).startswith(f"checkpoint {path}: {message}") and "\n" not in str(exc.value)


@pytest.mark.slow
def test_run_script_names_a_truncated_checkpoint_before_loading_any_model(run_dir, tmp_path):
    good = run_dir / "checkpoints" / "step000004.ckpt"
    bad = tmp_path / "step000004.ckpt"
    bad.write_bytes(good.read_bytes()[:1000])
    proc = subprocess.run(
        [sys.executable, "experiments/run.py", *SHORT, f"ckpt_path={bad}", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"config error: checkpoint {bad}: cannot be read") and "truncated" in last
    assert "Loading weights" not in proc.stderr  # failed before any model was loaded
