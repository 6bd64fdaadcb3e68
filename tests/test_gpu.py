"""CUDA-only checks: bf16 compute over float32 master weights, FSDP2 on one GPU, log-prob head memory.

Every test is marked `gpu` and skipped without CUDA (`pytest -m gpu` selects them on a GPU machine).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_policy import make_batch

from lightning_prerl.data.batch import RolloutBatch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# FSDP2 gathers bf16 parameters and computes every op in bf16 (norms included), the reference is
# float32 throughout: bf16 keeps 8 mantissa bits (relative step 2^-8 ~ 0.4 %), so logits over two
# tiny layers drift by about a hundredth (the same check on CPU/gloo: max 0.016 at |logp| <= 5).
# Bound on |logp_fsdp - logp_fp32| per scored token, ~6x that:
BF16_ATOL, BF16_RTOL = 0.05, 0.01
# Head memory at T = 8192, V = 151,936, H = 1024 in bf16: the weight's gradient is V*H*2 bytes
# (0.29 GiB), the input's gradient 16 MiB, one float32 weight-gradient accumulator (0.58 GiB) and one
# chunk's float32 logits and their gradient (the default chunk holds 512 MiB of logits: ~0.55 GiB
# measured on CPU), about 1.4 GiB in all. One full (T, V) bf16 logits tensor alone is 2.32 GiB, and its
# float32 softmax twice that, so the unchunked path cannot pass.
HEAD_EXTRA_BOUND_GIB = 1.75


def to_device(batch: RolloutBatch, device) -> RolloutBatch:
    moved = {f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch) if f.type == "torch.Tensor"}
    return dataclasses.replace(batch, **moved)


def test_bf16_step_keeps_float32_master_weights_and_moves_them(tiny_model_dir, tokenizer):
    from lightning_prerl.training.policy import CondRL
    from lightning_prerl.training.update import backward_objective

    module = CondRL(model_path=str(tiny_model_dir), dtype="bfloat16", lr=1e-6)
    module.configure_model()
    policy = module.policy.cuda()
    opt = module.configure_optimizers()["optimizer"]  # the module's own AdamW, lr 1e-6
    before = [p.detach().clone() for p in policy.parameters()]
    batch = to_device(make_batch(tokenizer), "cuda")

    with torch.autocast("cuda", dtype=torch.bfloat16):
        result = backward_objective(module.objective, policy, batch, module.start_token_id)
    opt.step()
    torch.cuda.synchronize()

    assert torch.isfinite(result.loss)
    assert all(p.dtype == torch.float32 for p in policy.parameters())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in policy.parameters())
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(policy.parameters(), before, strict=True))
    total = sum(b.numel() for b in before)
    # an lr 1e-6 step is ~1e-6 per weight: visible in float32, it would round away in bf16
    assert changed / total >= 0.99, f"only {changed}/{total} weights changed"


def _fsdp_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=rank, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        from lightning_prerl.scale.models import load_policy, load_tokenizer, shard_policy
        from lightning_prerl.training.logprobs import sequence_logprobs

        batch = to_device(make_batch(load_tokenizer(model_dir)), "cuda")
        with torch.no_grad():
            reference, _ = sequence_logprobs(load_policy(model_dir).cuda(), batch, "conditional", 0)  # (N, T)
        model = shard_policy(load_policy(model_dir).cuda(), init_device_mesh("cuda", (1,)), torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
        logp, _ = sequence_logprobs(model, batch, "conditional", 0)  # (N, T)
        mask = batch.response_mask.float()  # (N, T)
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        opt.step()
        torch.cuda.synchronize()
        params = list(model.parameters())
        torch.save(
            {
                "loss": loss.item(),
                "all_dtensor": all(isinstance(p, DTensor) for p in params),
                "dtypes": sorted({str(p.to_local().dtype) for p in params}),
                "grads_finite": all(bool(torch.isfinite(p.grad.to_local()).all()) for p in params),
                "logp": logp.detach().float().cpu(),
                "reference": reference.cpu(),
                "mask": batch.response_mask.bool().cpu(),
            },
            out,
        )
    finally:
        dist.destroy_process_group()


def test_fsdp2_on_one_gpu_trains_in_bf16_over_float32_shards(tiny_model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "fsdp.pt"
    mp.spawn(_fsdp_worker, args=(port, str(tiny_model_dir), str(out)), nprocs=1, join=True)
    r = torch.load(out, weights_only=True)
    assert math.isfinite(r["loss"])
    assert r["all_dtensor"] and r["dtypes"] == ["torch.float32"] and r["grads_finite"]
    logp, reference, mask = r["logp"][r["mask"]], r["reference"][r["mask"]], r["mask"]
    assert mask.any()
    err = (logp - reference).abs()
    assert bool((err <= BF16_ATOL + BF16_RTOL * reference.abs()).all()), f"max |dlogp| {err.max():.4f}"
    assert err.max() > 0  # the comparison really ran in bf16


def test_head_logprobs_peak_memory_at_8192_tokens():
    from lightning_prerl.objectives.ops import head_logprobs

    torch.manual_seed(0)
    t, v, h = 8192, 151_936, 1024
    weight = (torch.randn(v, h, device="cuda") * h**-0.5).to(torch.bfloat16).requires_grad_()  # (V, H)
    hidden = torch.randn(1, t, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # (1, T, H)
    targets = torch.randint(0, v, (1, t), device="cuda")  # (1, T)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()

    logp, _ = head_logprobs(hidden, weight, targets)  # (1, T)
    logp.sum().backward()
    torch.cuda.synchronize()

    extra_gib = (torch.cuda.max_memory_allocated() - baseline) / 2**30
    assert torch.isfinite(logp).all() and weight.grad is not None and hidden.grad is not None
    assert extra_gib < HEAD_EXTRA_BOUND_GIB, f"head log-probs + backward took {extra_gib:.2f} GiB above the inputs"


@pytest.mark.parametrize("stage", [2, 3])
def test_lightning_deepspeed_runs_dsrl_across_the_switch_exports_and_resumes(stage, tmp_path):
    """Lightning's DeepSpeedStrategy end to end (bf16 over float32 master weights): the held-out evaluation
    at step 0 (eval_before_training, the default), a reference built in configure_model and reset at the
    switch, several micro-batches per step, export, directory resume."""
    from test_run import read_rows, run_experiment, steps_with
    from transformers import AutoModelForCausalLM

    run = [
        f"trainer=deepspeed_zero{stage}", "trainer.devices=1", "model.dtype=bfloat16", "objective=dsrl",
        "objective.switch_step=1", "objective.main.kl_coef=0.05", "trainer.max_steps=2", "eval_before_training=true",
        "trainer.check_val_every_n_epoch=100", "data.prompts_per_step=4", "data.samples_per_prompt=4",
        "data.sampling.max_new_tokens=48", "module.micro_batch_size=4", "callbacks.checkpoint.every_n_train_steps=1",
    ]  # fmt: skip
    run_dir = tmp_path / "run"
    run_experiment(run_dir, *run, timeout=600)
    rows = read_rows(run_dir)
    assert steps_with(rows, "train/loss") == [0, 1]
    assert steps_with(rows, "val/accuracy") == [0]  # the default evaluation at step 0, inside fit
    assert [float(r["objective/phase"]) for r in rows if r.get("objective/phase")] == [0.0, 1.0]
    assert all(math.isfinite(float(r["train/grad_norm"])) for r in rows if r.get("train/grad_norm"))
    assert (run_dir / "checkpoints" / "step000002.ckpt" / "latest").is_file()
    assert AutoModelForCausalLM.from_pretrained(run_dir / "policy") is not None
    run_experiment(run_dir, *run, "trainer.max_steps=3", "ckpt_path=auto", timeout=600)
    assert steps_with(read_rows(run_dir), "train/loss") == [0, 1, 2]


@pytest.mark.parametrize(
    "rollout",
    ["hf", pytest.param("vllm", marks=pytest.mark.skipif(not importlib.util.find_spec("vllm"), reason="no vLLM"))],
)
def test_async_rollouts_colocated_on_one_gpu(rollout, tmp_path):
    """Asynchronous rollouts on one GPU (async_rollout.placement=colocated): the worker process starts with
    the trainer's GPU as its only visible one and generates there (vLLM: sleeping between generations),
    k = 1 keeps its schedule and DSRL switches at its step. The CPU side of the placement is pinned by
    tests/test_async.py (the device list of 1, 2 and 8 ranks, the worker's environment)."""
    from test_run import read_rows, run_experiment

    run = [
        "trainer=gpu", "trainer.devices=1", f"rollout={rollout}", "async_rollout.enabled=true",
        "async_rollout.max_staleness=1", "objective=dsrl", "objective.switch_step=1", "trainer.max_steps=3",
        "eval_before_training=false", "trainer.check_val_every_n_epoch=100", "data.prompts_per_step=4",
        "data.samples_per_prompt=4", "callbacks.checkpoint.every_n_train_steps=100",
    ]  # fmt: skip
    proc = run_experiment(tmp_path / "run", *run, timeout=300)
    rows = read_rows(tmp_path / "run")
    assert [float(r["rollout/staleness_max"]) for r in rows if r.get("rollout/staleness_max")] == [0.0, 1.0, 1.0]
    assert [float(r["objective/phase"]) for r in rows if r.get("objective/phase")] == [0.0, 1.0, 1.0]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[torch.cuda.current_device()]
    where = f"rollout worker of rank 0: {torch.cuda.get_device_name()}, CUDA_VISIBLE_DEVICES={visible}"
    assert where in proc.stdout + proc.stderr
