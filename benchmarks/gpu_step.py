"""Benchmark (GPU): one policy training step, bf16 compute over float32 master weights, tokens/s and MFU.

    .venv/bin/python benchmarks/gpu_step.py [--sizes tiny 0.5b --batch 8 --prompt-len 256 --response-len 2048
        --repeats 3 --warmup 1 --out benchmarks/results/gpu_step.json]

One step = what `PolicyModule.training_step` does for a GRPO rollout batch: `backward_objective`
(`sequence_logprobs` -> `final_hidden_states` + chunked `head_logprobs`, loss, backward) under
`torch.autocast(bfloat16)` over float32 parameters, then an AdamW step at lr 1e-6. Activation
checkpointing is on (`gradient_checkpointing_enable(use_reentrant=False)`). Models are random-init
Qwen3 (`transformers.Qwen3Config`, vocabulary 151,936, tied embeddings): "tiny" (hidden 256,
2 layers), "0.5b" (hidden 1024, 24 layers, 16 heads, 8 kv heads, head_dim 128, ffn 3072) and "4b"
(Qwen3-4B's shape: hidden 2560, 36 layers, 32 heads, 8 kv heads, head_dim 128, ffn 9728).
`--fsdp2` wraps the model as `trainer=fsdp` does (`models.shard_policy` on a one-rank mesh: bf16
compute through FSDP2's MixedPrecisionPolicy, float32 shards, no autocast) instead of bf16 autocast.

Model FLOPs per step (forward + backward, recomputation by checkpointing not counted):
    6 * body_params * N * (P + T)       every prompt and response token through the blocks
  + 6 * V * H * N * T                   the output head, on response tokens only
  + 6 * layers * heads * head_dim * N * (P + T)^2   attention scores and values (causal: half of 12 L d S^2)
with body_params = all parameters except the (tied) embedding matrix. MFU = achieved FLOP/s over the
bf16 dense matmul peak measured in the same run (median time of an 8192^3 bf16 matmul). The time is
the median of `--repeats` steps after `--warmup` steps; memory is `torch.cuda.max_memory_allocated`
over the measured steps (weights, grads, AdamW state and activations).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from lightning_prerl.data.batch import RolloutBatch
from lightning_prerl.objectives import PolicyGradientObjective
from lightning_prerl.training.logprobs import final_hidden_states
from lightning_prerl.training.update import MicroBatching, backward_objective

ROOT = Path(__file__).resolve().parent.parent

VOCAB = 151_936
WIDTHS = (6, 14, 9, 11, 9, 7, 10, 10)  # table columns
# name: hidden, layers, heads, kv heads, head_dim, ffn
SIZES = {"tiny": (256, 2, 4, 2, 64, 768), "0.5b": (1024, 24, 16, 8, 128, 3072), "4b": (2560, 36, 32, 8, 128, 9728)}


def build(name: str, max_positions: int, device: torch.device) -> torch.nn.Module:
    """A random-init Qwen3 with float32 parameters on `device`."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hidden, layers, heads, kv, head_dim, ffn = SIZES[name]
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def random_batch(n: int, p: int, t: int, device: torch.device) -> RolloutBatch:
    """n samples in groups of 2 with rewards 1, 0 (every group mixed: every advantage non-zero)."""
    prompt_ids = torch.randint(0, VOCAB, (n, p), device=device)  # (N, P)
    response_ids = torch.randint(0, VOCAB, (n, t), device=device)  # (N, T)
    rewards = torch.tensor([1.0, 0.0] * (n // 2), device=device)  # (N,)
    return RolloutBatch(
        prompt_ids, torch.ones_like(prompt_ids), response_ids, torch.ones_like(response_ids), rewards, group_size=2
    )


def model_flops(model: torch.nn.Module, n: int, p: int, t: int) -> float:
    cfg = model.config
    head = cfg.vocab_size * cfg.hidden_size
    body = sum(q.numel() for q in model.parameters()) - head  # tied: the embedding matrix is counted once
    attention = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * n * (p + t) ** 2
    return 6 * body * n * (p + t) + 6 * head * n * t + attention


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, size: int, repeats: int = 10) -> float:
    """bf16 dense matmul FLOP/s (median of `repeats` timed products after 3 warm-ups), in TFLOP/s."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)  # (S, S)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)  # (S, S)
    c = torch.empty_like(a)  # (S, S)
    times = []
    for i in range(3 + repeats):
        sync(device)
        start = time.perf_counter()
        torch.matmul(a, b, out=c)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


def head_input_dtype(model: torch.nn.Module, device: torch.device) -> str:
    """Dtype of the hidden states `head_logprobs` receives under bf16 autocast (a 1 x 8 probe)."""
    ids = torch.zeros(1, 8, dtype=torch.long, device=device)  # (1, 8)
    pos = torch.arange(8, device=device)[None]  # (1, 8)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        hidden = final_hidden_states(model, ids, torch.ones_like(ids), pos, 8)  # (1, 8, H)
    return str(hidden.dtype).removeprefix("torch.")


def fsdp2(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2 on a one-rank mesh, as `trainer=fsdp` shards the policy (`models.shard_policy`)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_prerl.scale.models import shard_policy

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    return shard_policy(model, init_device_mesh(device.type, (1,)), torch.bfloat16)


def bench_size(name: str, args, device: torch.device) -> dict:
    n, p, t = args.batch, args.prompt_len, args.response_len
    model = build(name, p + t + 1, device)
    params = sum(q.numel() for q in model.parameters())
    if args.fsdp2:
        model = fsdp2(model, device)
    autocast = contextlib.nullcontext() if args.fsdp2 else torch.autocast(device.type, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    objective = PolicyGradientObjective(name="grpo")
    batch = random_batch(n, p, t, device)
    micro = MicroBatching(size=args.micro_batch)
    times = []
    for i in range(args.warmup + args.repeats):
        if i == args.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast:
            result = backward_objective(objective, model, batch, start_token_id=0, micro=micro)
        opt.step()
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        if not torch.isfinite(result.loss):
            raise RuntimeError(f"{name}: non-finite loss {result.loss.item()} at step {i}")
    seconds = statistics.median(times)
    flops = model_flops(model, n, p, t)
    return {
        "size": name,
        "params": params,
        "dtypes": {"params": str(next(model.parameters()).dtype).removeprefix("torch."), "compute": "bfloat16"},
        "wrapping": "fsdp2" if args.fsdp2 else "autocast",
        "head_input_dtype": None if args.fsdp2 else head_input_dtype(model, device),
        "batch": {"samples": n, "prompt_tokens": p, "response_tokens": t, "micro_batch": args.micro_batch},
        "step_s": seconds,
        "step_s_all": times,
        "tokens_per_s": n * (p + t) / seconds,
        "response_tokens_per_s": n * t / seconds,
        "model_tflop_per_step": flops / 1e12,
        "tflops": flops / seconds / 1e12,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss": result.loss.item(),
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--batch", type=int, default=8, help="samples per step (even: groups of 2)")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--response-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=None, help="samples per forward/backward (None: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--matmul-size", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_step.json")
    ap.add_argument("--fsdp2", action="store_true", help="wrap as trainer=fsdp does (one rank) instead of autocast")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": debug the script, tiny sizes
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    if args.batch < 2 or args.batch % 2:
        ap.error(f"--batch {args.batch}: must be even (groups of 2 samples)")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpu_step: CUDA is not available (torch {torch.__version__}); this benchmark needs a GPU")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (debug run)"
    print(f"device: {gpu}; torch {torch.__version__}", flush=True)
    peak = matmul_peak_tflops(device, args.matmul_size)
    print(f"bf16 dense matmul {args.matmul_size}^3: {peak:.1f} TFLOP/s (median of 10)", flush=True)

    rows = []
    for name in args.sizes:
        row = bench_size(name, args, device)
        row["mfu"] = row["tflops"] / peak
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    n, p, t = args.batch, args.prompt_len, args.response_len
    print(
        f"\none step: {n} x ({p} prompt + {t} response) tokens, "
        f"bf16 {'FSDP2 compute' if args.fsdp2 else 'autocast'} over float32 params, "
        f"activation checkpointing, AdamW; median of {args.repeats} after {args.warmup} warm-up"
    )
    header = ("size", "params", "step s", "tokens/s", "TFLOP/s", "MFU", "peak GiB", "head in")
    print(f"{header[0]:<{WIDTHS[0]}}" + "".join(f"{h:>{w}}" for h, w in zip(header[1:], WIDTHS[1:], strict=True)))
    for r in rows:
        mem = f"{r['peak_mem_gib']:.2f}" if r["peak_mem_gib"] is not None else "n/a"
        head_in = r["head_input_dtype"] or "n/a"
        print(
            f"{r['size']:<6}{r['params']:>14,}{r['step_s']:>9.3f}{r['tokens_per_s']:>11.0f}"
            f"{r['tflops']:>9.1f}{r['mfu']:>7.1%}{mem:>10}{head_in:>10}"
        )
    print("FLOPs = 6*body_params*N*(P+T) + 6*V*H*N*T + 6*layers*heads*head_dim*N*(P+T)^2 (no recompute counted)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "gpu_step",
        "device": gpu,
        "torch": torch.__version__,
        "bf16_matmul_peak_tflops": peak,
        "matmul_size": args.matmul_size,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "results": rows,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
