"""The rollout record and its replay (issue 27, part 5): `data.record_rollouts=true` writes each step's
batch per rank as parquet (readable with pyarrow alone, every tensor restored bit for bit, nothing
written when off); `experiments/replay.py` trains from it with no engine: the same config ends on
bit-identical weights, another objective trains on the identical rollouts, one step replays from its
checkpoint, and an incomplete record or a change to what the record fixes stops with one line."""

from __future__ import annotations

import csv
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from test_datamodule import LogprobEngine, recording_datamodule
from test_run import ROOT, run_experiment

from lightning_prerl.errors import ConfigError
from lightning_prerl.training.record import check_record, read_batch, read_manifest, shard_path

RECORD = [
    "data.record_rollouts=true",
    "objective=dsrl",
    "objective.switch_step=2",  # 2 NSR-PreRL steps, then GRPO: the replay re-enacts the switch
    "rollout.return_logprobs=true",  # the engine's log-probs are recorded and replayed (mismatch metrics)
    "trainer.max_steps=3",
    "data.prompts_per_step=4",
    "data.samples_per_prompt=4",
    "data.eval_prompts.count=2",
    "eval_before_training=false",
    "callbacks.checkpoint.every_n_train_steps=1",
]


def _on_trainer(dm, tmp_path):
    dm.trainer.default_root_dir, dm.trainer.is_global_zero = str(tmp_path), True
    dm.trainer.lightning_module.phase = 0
    return dm


def test_a_recorded_batch_reads_back_bit_for_bit_and_with_pyarrow_alone(tokenizer, tmp_path):
    """Dynamic sampling (batch padded to the widest round, fill groups), overlong masking (a sample mask)
    and engine log-probs: every tensor of the batch comes back with its shape, dtype and values."""
    engine = LogprobEngine(lambda call, i, j: [7] * (1 + j + call) + ([3] if j == 0 else []))  # sample 1: truncated
    dm = recording_datamodule(tokenizer, engine, overlong="mask", dynamic_sampling=True, record_rollouts=True)
    batch = _on_trainer(dm, tmp_path)._epoch_batch(0)
    path = shard_path(tmp_path / "rollouts", 0, 0)
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.json", path.name]
    back = read_batch(path.parent, 0, 0, 1)
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "rewards", "sample_mask"):
        mine, theirs = getattr(batch, name), getattr(back, name)
        assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), name
    assert torch.equal(batch.rollout_logprobs, back.rollout_logprobs)
    for name in ("texts", "has_answer", "sources", "seeds", "group_size", "padding_prompts"):
        assert getattr(batch, name) == getattr(back, name), name
    assert back.stats == {k: v for k, v in batch.stats.items() if k != "time/record"} and "time/record" in batch.stats
    rows = pq.read_table(path).to_pylist()  # no package code: lists of real tokens, one row per sample
    assert len(rows) == len(batch) and rows[0]["response_ids"] == [7, 3] and rows[1]["response_ids"] == [7, 7]
    assert rows[0]["prompt_ids"] == batch.prompt_ids[0][batch.prompt_mask[0].bool()].tolist()
    assert [r["seeds"] for r in rows] == batch.seeds and len(set(batch.seeds)) == len(batch) // 2
    assert read_manifest(path.parent)["samples_per_prompt"] == 2


def test_nothing_is_written_when_recording_is_off(tokenizer, tmp_path):
    dm = _on_trainer(recording_datamodule(tokenizer, LogprobEngine()), tmp_path)
    batch = dm._epoch_batch(0)
    assert list(tmp_path.iterdir()) == [] and "time/record" not in batch.stats


def test_padding_that_the_record_cannot_restore_is_refused(tokenizer, tmp_path):
    dm = _on_trainer(recording_datamodule(tokenizer, LogprobEngine()), tmp_path)
    batch = dm.train_batch(0)
    batch.response_mask[0, 0] = 0  # a hole in the first response
    dm.record_rollouts = True
    with pytest.raises(ValueError, match="response_ids: its mask is not one run of ones"):
        from lightning_prerl.training.record import record_batch

        record_batch(dm, batch, 0)
    assert not shard_path(tmp_path / "rollouts", 0, 0).exists()


def replay(record, run_dir, *overrides: str, ok: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "experiments/replay.py", str(record), f"hydra.run.dir={run_dir}", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert (proc.returncode == 0) == ok, proc.stderr[-4000:]
    return proc


def train_rows(run_dir) -> list[dict[str, str]]:
    """metrics.csv rows of training steps, without wall-clock and held-out columns."""
    with open(run_dir / "logs" / "metrics.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "val/"))} for r in rows]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("record") / "run"
    run_experiment(run_dir, *RECORD)
    return run_dir


def test_the_record_holds_a_file_per_step_and_a_manifest(recorded):
    directory = recorded / "rollouts"
    assert sorted(p.name for p in directory.iterdir()) == [
        "manifest.json",
        *(f"step{k:06d}-rank0.parquet" for k in range(3)),
    ]
    manifest = read_manifest(directory)
    assert manifest["world_size"] == 1 and manifest["config"]["objective"]["switch_step"] == 2
    meta = [pq.read_schema(shard_path(directory, k, 0)).metadata[b"lightning_prerl"] for k in range(3)]
    assert [b'"policy_version": %d' % k in m for k, m in enumerate(meta)] == [True] * 3
    rows = pq.read_table(shard_path(directory, 0, 0)).to_pylist()
    assert len(rows) == 16 and all(len(r["rollout_logprobs"]) == len(r["response_ids"]) for r in rows)


def test_replay_with_the_same_config_is_bit_identical_without_an_engine(recorded, tmp_path):
    proc = replay(recorded, tmp_path / "same")
    out = proc.stdout + proc.stderr
    assert "no rollout engine, held-out evaluation off (it needs generation)" in out
    assert "keys that differ from the recorded run: none" in out
    weights = (recorded / "policy" / "model.safetensors").read_bytes()
    assert (tmp_path / "same" / "policy" / "model.safetensors").read_bytes() == weights
    assert train_rows(tmp_path / "same") == train_rows(recorded)
    assert not (tmp_path / "same" / "rollouts").exists()


def test_replay_under_another_objective_trains_on_the_identical_rollouts(recorded, tmp_path):
    """The recorded `objective.switch_step=2` goes with the recorded objective group."""
    replay(recorded, tmp_path / "grpo", "objective=grpo")
    mine, theirs = train_rows(tmp_path / "grpo"), train_rows(recorded)
    for key in ("rollout/reward_mean", "rollout/mixed_groups", "rollout/response_length"):
        assert [r[key] for r in mine] == [r[key] for r in theirs], key
    assert [r["objective/phase"] for r in theirs] == ["0.0", "0.0", "1.0"]
    assert [r["objective/phase"] for r in mine] == ["0.0"] * 3
    weights = (recorded / "policy" / "model.safetensors").read_bytes()
    assert (tmp_path / "grpo" / "policy" / "model.safetensors").read_bytes() != weights


@pytest.mark.slow
def test_one_step_replays_from_its_checkpoint(recorded, tmp_path):
    """Reproducing a faulted step: the weights before step 2 and step 2's rollouts give step 2 again."""
    ckpt = recorded / "checkpoints" / "step000002.ckpt"
    replay(recorded, tmp_path / "step2", f"ckpt_path={ckpt}")
    weights = (recorded / "policy" / "model.safetensors").read_bytes()
    assert (tmp_path / "step2" / "policy" / "model.safetensors").read_bytes() == weights
    assert [r["step"] for r in train_rows(tmp_path / "step2")] == ["2"]


def test_an_incomplete_record_or_a_changed_rollout_key_stops_with_one_line(recorded, tmp_path):
    proc = replay(recorded, tmp_path / "more", "trainer.max_steps=5", ok=False)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"config error: rollout record {recorded / 'rollouts'} is incomplete: no step000003-rank0.parquet; the "
        "replay needs steps 0-4 of 1 rank(s), the record has 3 whole step(s): lower trainer.max_steps or record again"
    )
    proc = replay(recorded, tmp_path / "g8", "data.samples_per_prompt=8", ok=False)
    assert (
        proc.stderr.strip().splitlines()[-1].startswith("config error: data.samples_per_prompt=8: the rollout record")
    )
    assert not (tmp_path / "more" / "policy").exists() and not (tmp_path / "g8" / "policy").exists()


@pytest.mark.slow
def test_a_ddp_record_holds_a_shard_per_rank_and_replays_bit_identically(tmp_path):
    """2 gloo processes: each rank writes and reads back its own shard (the DDP launcher restarts the
    replay script with the composed command line)."""
    run_dir = tmp_path / "ddp"
    run_experiment(run_dir, *RECORD, "trainer=ddp", "trainer.max_steps=2", "objective.switch_step=1", timeout=400)
    names = sorted(p.name for p in (run_dir / "rollouts").iterdir())
    assert names == ["manifest.json", *(f"step{k:06d}-rank{r}.parquet" for k in range(2) for r in range(2))]
    shards = [pq.read_table(shard_path(run_dir / "rollouts", 0, r)) for r in range(2)]
    assert [s.num_rows for s in shards] == [8, 8] and shards[0]["seeds"] != shards[1]["seeds"]
    replay(run_dir, tmp_path / "again", timeout=400)
    weights = (run_dir / "policy" / "model.safetensors").read_bytes()
    assert (tmp_path / "again" / "policy" / "model.safetensors").read_bytes() == weights
    proc = replay(run_dir, tmp_path / "one", "trainer=cpu", ok=False)
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: trainer.devices=1: the rollout record")


def test_the_replay_command_line_and_config(recorded):
    """A replay override replaces the recorded one of its key and those below it (`objective=grpo` drops
    `objective.switch_step=2`); the DDP launcher's restart passes through; a DSRL switch on a held-out
    metric is refused (a replay does not evaluate)."""
    from test_config import compose_cfg

    from lightning_prerl.config.replay import REPLAY_DATA, replay_argv, replay_config

    argv = replay_argv([str(recorded), "-m", "objective=grpo", "module.lr=0.001"])
    assert argv[0] == "-m" and argv[-3:] == [f"+replay_from={recorded}", "objective=grpo", "module.lr=0.001"]
    assert "data.prompts_per_step=4" in argv and "rollout.return_logprobs=true" in argv
    assert not [a for a in argv if a.startswith(("objective.", "data.record_rollouts"))]
    assert (
        f"hydra.run.dir={recorded}" not in argv
        and f"hydra.run.dir={recorded}/replay/${{now:%Y-%m-%d_%H-%M-%S}}" in argv
    )
    assert replay_argv(argv[1:]) == argv[1:]
    overrides = [a for a in argv[1:] if not a.startswith("hydra.")]
    cfg = compose_cfg(*overrides)
    replay_config(cfg)
    assert cfg.data._target_ == REPLAY_DATA and cfg.data.record_dir == str(recorded / "rollouts")
    assert cfg.trainer.limit_val_batches == 0 and cfg.data.record_rollouts is False
    with pytest.raises(ConfigError, match="objective.monitor=val/accuracy: a replay has no held-out evaluation"):
        replay_config(compose_cfg(*overrides, "objective=dsrl", "objective.monitor=val/accuracy"))


def test_check_record_names_the_missing_rank_shard(tmp_path):
    (tmp_path / "manifest.json").write_text('{"format": 1, "world_size": 2}')
    shard_path(tmp_path, 0, 0).touch()
    with pytest.raises(ConfigError, match="no step000000-rank1.parquet"):
        check_record(tmp_path, 1, 2)
    with pytest.raises(ConfigError, match="holds 2 rank shard"):
        check_record(tmp_path, 1, 1)
    with pytest.raises(ConfigError, match="no rollout record"):
        check_record(tmp_path / "nothing", 1, 1)
