"""Benchmark (CPU): achieved FLOP/s of one float32 training step against this machine's float32 matmul peak.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train_flops.py [--threads 1 --repeats 3 --micro-batch-tokens 4096 0]

One step = `backward_objective` (GRPO: the conditional forward with chunked head log-probs, loss,
backward) + an AdamW step, on a random-token batch of the policy's vocabulary: the shipped toy policy
(0.44M parameters) with 128 samples x (40 prompt + 80 response) tokens, and a ~25M-parameter policy of
the same family with 32 x (40 + 120). Model FLOPs as in benchmarks/gpu_step.py (6 x body params x
tokens + 6 x V x H x response tokens + attention; recomputation not counted). The peak is the median
FLOP/s of a 2048^3 float32 matmul timed in the same run with the same thread count. Median of
`--repeats` steps after one warm-up, at each `--micro-batch-tokens` budget (the project's default 4,096
padded tokens per forward/backward; 0: one whole-batch pass); every prompt is forwarded with its own
row (random prompts: nothing to share). JSON: benchmarks/results/train_flops.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from gpu_step import model_flops  # noqa: E402
from results_io import write_json  # noqa: E402

from lightning_prerl.data.batch import RolloutBatch  # noqa: E402
from lightning_prerl.data.toyworld import build_model, build_tokenizer  # noqa: E402
from lightning_prerl.objectives import PolicyGradientObjective  # noqa: E402
from lightning_prerl.scale.models import load_policy  # noqa: E402
from lightning_prerl.training.update import MicroBatching, backward_objective  # noqa: E402

# name: (hidden, layers, heads, ffn) or None for the shipped toy policy, samples, prompt and response tokens
SIZES = [("toy", None, 128, 40, 80), ("25M", (512, 8, 8, 1536), 32, 40, 120)]


def matmul_peak_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)  # (S, S) float32
    c = torch.empty_like(a)
    times = []
    for i in range(2 + repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=c)
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def step_seconds(model, n: int, p: int, t: int, repeats: int, micro: MicroBatching) -> float:
    vocab = model.config.vocab_size
    batch = RolloutBatch(
        torch.randint(0, vocab, (n, p)), torch.ones(n, p, dtype=torch.long),
        torch.randint(0, vocab, (n, t)), torch.ones(n, t, dtype=torch.long),
        torch.tensor([1.0, 0.0] * (n // 2)), group_size=2,
    )  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    objective = PolicyGradientObjective(name="grpo")
    times = []
    for i in range(1 + repeats):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        backward_objective(objective, model, batch, start_token_id=0, micro=micro)
        opt.step()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--micro-batch-tokens", type=int, nargs="+", default=[4096, 0], help="0: one whole-batch pass")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for name, shape, n, p, t in SIZES:
        if shape is None:
            model = load_policy("toy")
        else:
            hidden, layers, heads, ffn = shape
            model = build_model(build_tokenizer(), hidden=hidden, layers=layers, heads=heads, ffn=ffn)
        for budget in args.micro_batch_tokens:
            peak = matmul_peak_gflops()
            micro = MicroBatching(max_tokens=budget or None, share_prompts=False)
            seconds = step_seconds(model, n, p, t, args.repeats, micro)
            achieved = model_flops(model, n, p, t) / seconds / 1e9
            rows.append({
                "policy": name, "params": sum(q.numel() for q in model.parameters()), "samples": n,
                "tokens": n * (p + t), "micro_batch_tokens": budget, "step_s": round(seconds, 3),
                "gflops": round(achieved, 2), "matmul_peak_gflops": round(peak, 2),
                "fraction_of_peak": round(achieved / peak, 3),
            })  # fmt: skip
    print(f"float32, {args.threads} thread(s), median of {args.repeats} steps; peak = 2048^3 matmul, same run")
    head = ("policy", 6), ("params", 11), ("tokens", 7), ("budget", 7), ("step s", 7), ("GFLOP/s", 8), ("peak", 7)
    print(" ".join(f"{name:>{width}}" for name, width in head), f"{'of peak':>8}")
    for r in rows:
        print(
            f"{r['policy']:>6} {r['params']:>11,} {r['tokens']:>7} {r['micro_batch_tokens'] or 'off':>7} "
            f"{r['step_s']:>7.2f} {r['gflops']:>8.2f} "
            f"{r['matmul_peak_gflops']:>7.1f} {r['fraction_of_peak']:>8.1%}"
        )
    write_json("train_flops", args=vars(args), rows=rows)


if __name__ == "__main__":
    main()
