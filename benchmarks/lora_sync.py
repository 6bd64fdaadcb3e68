"""Benchmark: how a LoRA policy should reach vLLM -- merged weights (what the project does) or vLLM's own
LoRA adapters -- measured per weight update and per rollout batch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/lora_sync.py [--prompts 16 --samples 8 --max-new-tokens 64]

For the toy policy and a ~25M-parameter one of the same family, with LoRA r=16 on every linear layer:
- merged: `VLLMEngine.sync(peft_policy)` (merged weights computed per layer, safetensors bytes, the
  worker's reload) then one rollout batch from the plain engine;
- adapter: `save_pretrained` of the adapter to a new folder, then one rollout batch with a new
  `LoRARequest` (vLLM loads the adapter on first use) from an engine started with `enable_lora`.
Both engines decode the same prompts x samples rows greedily (so they should emit the same tokens); the
rounds alternate and the median of `--repeats` (3) is reported, with the ratio adapter / merged.
JSON: benchmarks/results/lora_sync.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from results_io import write_json  # noqa: E402

from lightning_prerl.data.prompts import render_prompt, toy_prompts  # noqa: E402
from lightning_prerl.data.toyworld import build_model, build_tokenizer  # noqa: E402
from lightning_prerl.rollout.engine import SamplingConfig  # noqa: E402
from lightning_prerl.scale.lora import LoraSettings, apply_lora  # noqa: E402
from lightning_prerl.scale.models import load_policy, load_tokenizer, resolve_model_path  # noqa: E402

SIZES = [("toy", None), ("25M", (512, 8, 8, 1536))]


def make_policy(shape, folder: Path) -> str:
    if shape is None:
        return "toy"
    torch.manual_seed(0)
    tok = build_tokenizer()
    hidden, layers, heads, ffn = shape
    model = build_model(tok, hidden=hidden, layers=layers, heads=heads, ffn=ffn)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def perturb(policy) -> None:
    """Stand-in for an optimizer step: new adapter values (B starts at zero)."""
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if ".lora_" in name:
                p.add_(torch.randn_like(p) * 0.01)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from lightning_prerl.rollout.vllm import VLLMEngine

    rows = []
    for label, shape in SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            path = make_policy(shape, Path(tmp) / "base")
            tok = load_tokenizer(path)
            policy = apply_lora(load_policy(path), LoraSettings(r=16, alpha=32))
            prompts = [render_prompt(tok, p) for p in toy_prompts("heldout", args.prompts, seed=1)]
            greedy = SamplingConfig(temperature=0.0, max_new_tokens=args.max_new_tokens)
            merged = VLLMEngine(tok, model_path=path, max_model_len=512)
            local = str(resolve_model_path(path))
            adapter_llm = LLM(
                model=local, tokenizer=local, dtype="float32", max_model_len=512, enforce_eager=True,
                enable_lora=True, max_lora_rank=16, max_loras=1, generation_config="vllm",
            )  # fmt: skip
            params = SamplingParams(n=1, temperature=0.0, max_tokens=args.max_new_tokens, detokenize=False)
            rows_ids = [p for p in prompts for _ in range(args.samples)]  # greedy: samples as repeated rows
            batch = [TokensPrompt(prompt_token_ids=p) for p in rows_ids]
            times = {"merged_sync": [], "merged_generate": [], "adapter_save": [], "adapter_generate": []}
            for i in range(args.repeats + 1):  # round 0 warms both engines up and is dropped
                perturb(policy)
                t0 = time.perf_counter()
                merged.sync(policy)
                t1 = time.perf_counter()
                out_merged = merged.generate(rows_ids, 1, greedy).completions
                t2 = time.perf_counter()
                folder = Path(tmp) / f"adapter-{i}"
                policy.save_pretrained(folder)
                t3 = time.perf_counter()
                request = LoRARequest(f"a{i}", i + 1, str(folder))
                outs = adapter_llm.generate(batch, params, lora_request=request, use_tqdm=False)
                t4 = time.perf_counter()
                same = sum(list(o.outputs[0].token_ids)[: len(m)] == m for o, m in zip(outs, out_merged, strict=True))
                if i:
                    for key, value in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                        times[key].append(value)
            merged.close()
            del adapter_llm
            med = {k: statistics.median(v) for k, v in times.items()}
            merged_total = med["merged_sync"] + med["merged_generate"]
            adapter_total = med["adapter_save"] + med["adapter_generate"]
            params_n = sum(p.numel() for n, p in policy.named_parameters() if ".lora_" not in n)
            rows.append({
                "policy": label, "params": params_n, **{k: round(v, 4) for k, v in med.items()},
                "merged_total_s": round(merged_total, 4), "adapter_total_s": round(adapter_total, 4),
                "ratio_adapter_over_merged": round(adapter_total / merged_total, 3),
                "same_greedy_tokens": f"{same}/{len(batch)}",
            })  # fmt: skip
    print(f"{'policy':>6} {'params':>10} {'merged: sync + generate':>24} {'adapter: save + generate':>25} ratio same")
    for r in rows:
        print(
            f"{r['policy']:>6} {r['params']:>10,} {r['merged_sync']:>9.3f} + {r['merged_generate']:>7.3f} s    "
            f"{r['adapter_save']:>9.3f} + {r['adapter_generate']:>7.3f} s {r['ratio_adapter_over_merged']:>6.2f} "
            f"{r['same_greedy_tokens']}"
        )
    write_json("lora_sync", args=vars(args), rows=rows)


if __name__ == "__main__":
    main()
