"""Benchmark: end-to-end GRPO steps/s of this project against TRL's `GRPOTrainer` on the same workload.

    pip install -e ".[bench]"        # TRL (an optional extra: never needed to train)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_trl.py [--sizes toy 25M --steps 6 --repeats 3]
    .venv/bin/python benchmarks/vs_trl.py --sizes toy --threads 2 --async   # the whole 2-core machine each

Both train the same policy (the shipped toy policy, or a ~25M-parameter one of its family) on the same
toy-world prompts: 16 prompts x 8 samples per optimizer step, <= 120 new tokens, temperature 1 (no
top-k/top-p), float32, boxed exact-match reward, AdamW lr 1e-4, no KL, one optimizer step per rollout
batch, the same torch thread count (`--threads`: each contender gets that many cores). Four contenders
(six with `--async`), run in alternation `--repeats` times each:
- project, transformers engine (`rollout=hf`) and project, vLLM engine (`rollout=vllm`): `CondRL` +
  `RolloutDataModule` under a plain `lightning.Trainer` (as the README's Python API example);
- TRL 1.16 `GRPOTrainer` (transformers generation, `use_vllm=False`: the vLLM server mode TRL offers
  needs CUDA), once as configured by default (one training pass of all 128 samples) and once with its
  own micro-batching knob, 4 micro-batches of 32 with gradient accumulation (the same 128-sample
  generation and one optimizer step; the project cuts passes at 4,096 padded tokens by default).
  Ratios are against the faster TRL configuration.
- `--async`: project, async (transformers / vLLM engine): the same, through `AsyncRolloutDataModule`
  with staleness k = 1 (a worker process generates batch t + 1 while the trainer trains on t, stale
  batches TIS-corrected): the `--threads` cores split between trainer and worker (threads - threads // 2
  and threads // 2; one each with --threads 1, which then oversubscribes).
A step is timed from one optimizer step's end to the next's (generation, reward, log-probs, backward,
optimizer); the first step of each run is a warm-up. Per contender: the median step time over all
runs, samples/s (128 / step), generated tokens/s (counted by the shared reward function), and the
ratio to TRL. JSON: benchmarks/results/vs_trl.json. The project skips the samples of flat groups on the
toy policy (its default) and forwards every sample at 25M, where a random-init policy earns no reward
and every group would be skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from results_io import write_json  # noqa: E402

from lightning_prerl.data.prompts import toy_prompts  # noqa: E402
from lightning_prerl.data.rewards import BoxedExactMatch  # noqa: E402

PROMPTS, G, MAX_NEW, LR = 16, 8, 120, 1e-4
SHAPES = {"toy": None, "25M": (512, 8, 8, 1536)}


class CountingReward:
    """The boxed exact-match reward both sides call; counts the generated tokens it sees."""

    def __init__(self, tokenizer):
        self.tokenizer, self.reward, self.tokens = tokenizer, BoxedExactMatch(), 0

    def score(self, prompt, text: str) -> float:
        self.tokens += len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + the stop token
        return self.reward(prompt, text)


class StepClock:
    """Wall-clock time of each optimizer step's end."""

    def __init__(self):
        self.ends: list[float] = []

    def tick(self) -> None:
        self.ends.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.ends[1:], self.ends[2:], strict=False)]  # step 1 is warm-up


def policy_dir(size: str, tmp: Path) -> str:
    if SHAPES[size] is None:
        return "toy"
    from lightning_prerl.data.toyworld import build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    hidden, layers, heads, ffn = SHAPES[size]
    build_model(tok, hidden=hidden, layers=layers, heads=heads, ffn=ffn).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return str(tmp)


def run_project(path: str, engine: str, steps: int, threads: int, asynchronous: bool = False):
    """Step times and generated tokens of the project's run; `asynchronous`: k = 1 through a worker."""
    import functools

    import lightning as L

    from lightning_prerl import CondRL, HFEngine, RolloutDataModule, VLLMEngine
    from lightning_prerl.training.async_rollouts import AsyncRolloutDataModule

    # the random-init policy earns no reward, so all its groups are flat: skipping them (the project's
    # default, which TRL does not do) would skip all training, so at 25M every sample is forwarded
    module = CondRL(
        model_path=path, lr=LR, betas=(0.9, 0.99), weight_decay=0.0, skip_zero_advantage=path == "toy",
        rollout_correction={"tis": "token"} if asynchronous else None,  # as async_rollout.correction sets it
    )  # fmt: skip
    counter = CountingReward(module.tokenizer)
    if engine == "vllm":  # a partial: the worker process unpickles it
        make_engine = functools.partial(VLLMEngine, model_path=path, max_model_len=512)  # log-probs on
    else:
        make_engine = functools.partial(HFEngine, return_logprobs=asynchronous)  # engine log-probs for TIS
    build, extra = RolloutDataModule, {}
    if asynchronous:
        worker = threads // 2 or 1
        build, extra = AsyncRolloutDataModule, {"max_staleness": 1, "worker_threads": worker}
        threads = max(1, threads - worker)
    torch.set_num_threads(threads)
    prompts = toy_prompts("train", PROMPTS * (steps + 1), seed=0)
    data = build(
        module.tokenizer, make_engine, counter.score, prompts, prompts_per_step=PROMPTS, samples_per_prompt=G,
        sampling={"temperature": 1.0, "max_new_tokens": MAX_NEW}, shuffle_seed=None, **extra,
    )  # fmt: skip
    clock = StepClock()

    class Tick(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            clock.tick()

    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, max_epochs=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, inference_mode=False,
        reload_dataloaders_every_n_epochs=1, callbacks=[Tick()],
    )  # fmt: skip
    clock.tick()
    trainer.fit(module, datamodule=data)
    tokens = counter.tokens
    if engine == "vllm" and data.engine is not None:
        data.engine.close()
    return clock.step_times(), tokens


def run_trl(path: str, steps: int, micro_batches: int = 1) -> tuple[list[float], int]:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lightning_prerl.scale.models import load_policy, load_tokenizer

    tok = load_tokenizer(path)
    counter = CountingReward(tok)
    prompts = toy_prompts("train", PROMPTS * (steps + 1), seed=0)
    by_text = {p.question: p for p in prompts}
    rows = [{"prompt": p.messages(), "question": p.question} for p in prompts]  # the same chat rendering

    def reward(prompts, completions, question, **kwargs) -> list[float]:
        return [counter.score(by_text[q], c[0]["content"]) for q, c in zip(question, completions, strict=True)]

    clock = StepClock()

    class Tick(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.tick()

    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=PROMPTS * G // micro_batches, num_generations=G,
            gradient_accumulation_steps=micro_batches, max_completion_length=MAX_NEW,
            temperature=1.0, top_p=1.0, top_k=0, beta=0.0, learning_rate=LR, adam_beta2=0.99, weight_decay=0.0,
            lr_scheduler_type="constant", max_steps=steps, num_iterations=1, use_cpu=True, bf16=False,
            report_to="none", logging_steps=1000, save_strategy="no", shuffle_dataset=False, disable_dropout=True,
            dataloader_num_workers=0, seed=0,
        )  # fmt: skip
        trainer = GRPOTrainer(
            model=load_policy(path), reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
            processing_class=tok, callbacks=[Tick()],
        )  # fmt: skip
        clock.tick()
        trainer.train()
    return clock.step_times(), counter.tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", nargs="+", default=["toy", "25M"], choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each contender (its cores)")
    ap.add_argument("--async", dest="asynchronous", action="store_true", help="add the async (k = 1) contenders")
    args = ap.parse_args()

    def trl(micro_batches: int):
        torch.set_num_threads(args.threads)
        return lambda path: run_trl(path, args.steps, micro_batches)

    contenders = {
        "TRL GRPOTrainer": lambda path: trl(1)(path),
        "TRL GRPOTrainer, 4 x 32": lambda path: trl(4)(path),
        "project, transformers": lambda path: run_project(path, "hf", args.steps, args.threads),
        "project, vLLM": lambda path: run_project(path, "vllm", args.steps, args.threads),
    }
    if args.asynchronous:
        contenders["project, async k=1, transformers"] = lambda path: run_project(
            path, "hf", args.steps, args.threads, True
        )
        contenders["project, async k=1, vLLM"] = lambda path: run_project(path, "vllm", args.steps, args.threads, True)
    rows = []
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = policy_dir(size, Path(tmp))
            times = {name: [] for name in contenders}
            tokens = {name: [] for name in contenders}
            for _ in range(args.repeats):
                for name, run in contenders.items():
                    step_times, generated = run(path)
                    times[name] += step_times
                    tokens[name].append(generated / args.steps)  # generated tokens per step
            trl_step = min(statistics.median(times[name]) for name in contenders if name.startswith("TRL"))
            for name in contenders:
                step = statistics.median(times[name])
                per_step_tokens = statistics.median(tokens[name])
                rows.append({
                    "policy": size, "contender": name, "step_s": round(step, 3),
                    "samples_per_s": round(PROMPTS * G / step, 1),
                    "tokens_per_s": round(per_step_tokens / step, 1), "ratio_vs_trl": round(trl_step / step, 2),
                    "steps_timed": len(times[name]),
                })  # fmt: skip
    print(f"GRPO, {PROMPTS} prompts x {G} samples, <= {MAX_NEW} new tokens, float32, {args.threads} thread(s) each")
    print(f"{'policy':>6} {'contender':>32} {'step s':>7} {'samples/s':>10} {'tokens/s':>9} {'x TRL':>6}")
    for r in rows:
        print(
            f"{r['policy']:>6} {r['contender']:>32} {r['step_s']:>7.2f} {r['samples_per_s']:>10.1f} "
            f"{r['tokens_per_s']:>9.0f} {r['ratio_vs_trl']:>6.2f}"
        )
    write_json("vs_trl", args=vars(args), rows=rows)


if __name__ == "__main__":
    main()
