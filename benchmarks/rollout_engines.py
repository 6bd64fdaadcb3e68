"""Benchmark: rollout tokens/s of the transformers and vLLM engines, and vLLM weight-sync time vs size.

    .venv/bin/python benchmarks/rollout_engines.py [--prompts 64 --samples 8 --max-new-tokens 64 --repeats 3]

Both engines generate the same batch (toy policy, temperature 1, true sampling) in alternation,
`--repeats` times each; the median is reported with the ratio vLLM / transformers, so the noise of
a shared machine hits both alike. Peak memory is the process's max RSS after each engine's rounds.
Then, for policies of growing size (same architecture family as the toy), the median time of
`VLLMEngine.sync` (state dict -> safetensors bytes -> worker reload_weights -> prefix-cache reset),
as GB/s against a plain memory copy of the same tensors (`clone` of every state tensor) timed in the
same run, alternated with the syncs. `--only-sync` skips the generation part. JSON of the sync table:
benchmarks/results/weight_sync.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from lightning_prerl.data.prompts import render_prompt, toy_prompts  # noqa: E402
from lightning_prerl.data.toyworld import build_model, build_tokenizer  # noqa: E402
from lightning_prerl.rollout.engine import SamplingConfig  # noqa: E402
from lightning_prerl.rollout.hf import HFEngine  # noqa: E402
from lightning_prerl.scale.models import load_policy, load_tokenizer  # noqa: E402

SIZES = [("toy", 128, 2, 2, 384), ("2.6M", 256, 3, 4, 768), ("7M", 384, 4, 6, 1024), ("25M", 512, 8, 8, 1536)]


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_generation(engine, prompts, n: int, sampling: SamplingConfig) -> tuple[float, int]:
    start = time.perf_counter()
    gen = engine.generate(prompts, n, sampling)
    return time.perf_counter() - start, sum(len(c) for c in gen.completions)


def engines_throughput(args) -> None:
    from lightning_prerl.rollout.vllm import VLLMEngine

    tok, policy = load_tokenizer("toy"), load_policy("toy")
    prompts = [render_prompt(tok, p) for p in toy_prompts("heldout", args.prompts, seed=11)]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=args.max_new_tokens)
    hf = HFEngine(tok)
    hf.sync(policy)
    time_generation(hf, prompts[:4], 2, sampling)  # warm-up
    rss_before_vllm = max_rss_mib()
    start = time.perf_counter()
    vllm = VLLMEngine(tok, model_path="toy", max_model_len=256)
    init_s = time.perf_counter() - start
    vllm.sync(policy)
    time_generation(vllm, prompts[:4], 2, sampling)
    results = {"transformers": [], "vllm": []}
    for _ in range(args.repeats):
        for name, engine in (("transformers", hf), ("vllm", vllm)):
            seconds, tokens = time_generation(engine, prompts, args.samples, sampling)
            results[name].append((seconds, tokens))
    print(
        f"\nrollout: {args.prompts} prompts x {args.samples} samples, <= {args.max_new_tokens} new tokens, "
        f"T=1, torch threads {torch.get_num_threads()}, median of {args.repeats} alternated rounds"
    )
    print(f"{'engine':<14}{'seconds':>9}{'tokens':>9}{'tokens/s':>11}")
    rate = {}
    for name, runs in results.items():
        seconds = statistics.median(s for s, _ in runs)
        tokens = statistics.median(t for _, t in runs)
        rate[name] = tokens / seconds
        print(f"{name:<14}{seconds:>9.2f}{tokens:>9.0f}{rate[name]:>11.0f}")
    print(f"ratio vllm / transformers tokens/s: {rate['vllm'] / rate['transformers']:.2f}")
    print(
        f"vLLM engine start: {init_s:.1f} s; max RSS before vLLM {rss_before_vllm:.0f} MiB, "
        f"after {max_rss_mib():.0f} MiB"
    )
    vllm.close()


def sync_vs_size(args) -> None:
    from lightning_prerl.rollout.vllm import VLLMEngine

    tok = build_tokenizer()
    print(f"\nweight sync (median of {args.repeats * 2}, alternated with a plain copy of the same tensors):")
    print(f"{'model':<7}{'params':>12}{'MiB':>8}{'sync s':>9}{'sync GB/s':>10}{'copy GB/s':>10}{'ratio':>7}")
    rows = []
    for name, hidden, layers, heads, ffn in SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            policy = (
                load_policy("toy")
                if name == "toy"
                else build_model(tok, hidden=hidden, layers=layers, heads=heads, ffn=ffn)
            )
            policy.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            engine = VLLMEngine(tok, model_path=tmp, max_model_len=256)
            state = [t.detach() for t in policy.state_dict().values()]
            times, copies = [], []
            for _ in range(args.repeats * 2):
                start = time.perf_counter()
                engine.sync(policy)
                times.append(time.perf_counter() - start)
                start = time.perf_counter()
                copied = [t.clone() for t in state]
                copies.append(time.perf_counter() - start)
                del copied
            gb = engine.last_sync_bytes / 1e9
            seconds, copy_s = statistics.median(times), statistics.median(copies)
            copy_gb = sum(t.numel() * t.element_size() for t in state) / 1e9
            params = sum(p.numel() for p in policy.parameters())
            row = {
                "model": name, "params": params, "sync_bytes": engine.last_sync_bytes, "sync_s": round(seconds, 4),
                "sync_gb_s": round(gb / seconds, 3), "copy_gb_s": round(copy_gb / copy_s, 3),
            }  # fmt: skip
            row["ratio"] = round(row["sync_gb_s"] / row["copy_gb_s"], 3)
            rows.append(row)
            print(
                f"{name:<7}{params:>12,}{gb * 1e9 / 2**20:>8.1f}{seconds:>9.3f}{row['sync_gb_s']:>10.2f}"
                f"{row['copy_gb_s']:>10.2f}{row['ratio']:>7.2f}"
            )
            engine.close()
    out = Path(__file__).parent / "results" / "weight_sync.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-sync", action="store_true")
    ap.add_argument("--only-sync", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    if not args.only_sync:
        engines_throughput(args)
    if not args.skip_sync:
        sync_vs_size(args)


if __name__ == "__main__":
    main()
