"""Benchmark: math-verify reward scoring, completions/s in-process, with 1 worker process and with all cores.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reward_scoring.py [--completions 1000 --repeats 3]

Completions are built from MATH train problems (math_train/ under the default data_root): a
short solution ending in `\\boxed{}` holding the gold answer for half of them and another problem's
answer for the other half, so math-verify parses and compares both ways. Scored through the project's
`RewardScorer` + `MathVerifyReward`: in-process (`data.reward_timeout_s: null`, the default) and in its
pebble process pool (`reward_timeout_s` set) with 1 worker and with every core. Pools are warmed up
first; the median of `--repeats` alternated rounds is reported. JSON: benchmarks/results/reward_scoring.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from results_io import write_json  # noqa: E402

from lightning_prerl.data.prompts import load_prompts  # noqa: E402
from lightning_prerl.data.rewards import MathVerifyReward, RewardScorer, available_cores  # noqa: E402
from lightning_prerl.data.sources import default_data_root  # noqa: E402

DATA = Path(default_data_root())


def completions(n: int):
    prompts = load_prompts(DATA / "math_train" / "train.parquet", question_key="prompt", answer_key="reward_model")
    prompts = prompts[:n]
    texts = []
    for i, p in enumerate(prompts):
        answer = p.answer if i % 2 == 0 else prompts[(i + 1) % len(prompts)].answer
        texts.append(f"Let me work through it step by step.\n\nSo the result is \\boxed{{{answer}}}.")
    return prompts, texts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--completions", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    prompts, texts = completions(args.completions)
    cores = available_cores()
    scorers = {
        "in-process": RewardScorer(MathVerifyReward()),
        "1 worker": RewardScorer(MathVerifyReward(), timeout_s=30, workers=1),
        f"{cores} workers": RewardScorer(MathVerifyReward(), timeout_s=30, workers=cores),
    }
    for scorer in scorers.values():
        scorer.score(prompts[:8], texts[:8])  # start the pools
    times = {name: [] for name in scorers}
    accuracy = {}
    for _ in range(args.repeats):
        for name, scorer in scorers.items():
            t0 = time.perf_counter()
            result = scorer.score(prompts, texts)
            times[name].append(time.perf_counter() - t0)
            accuracy[name] = sum(result.rewards) / len(texts)
    for scorer in scorers.values():
        scorer.close()
    base = statistics.median(times["in-process"])
    rows = []
    print(f"{len(texts)} completions (half gold answers), {cores} cores, median of {args.repeats}")
    print(f"{'scoring':>12} {'seconds':>8} {'completions/s':>14} {'vs in-process':>14} {'mean reward':>12}")
    for name, runs in times.items():
        med = statistics.median(runs)
        row = {"scoring": name, "seconds": round(med, 3), "per_s": round(len(texts) / med, 1)}
        row["speedup"], row["mean_reward"] = round(base / med, 2), round(accuracy[name], 3)
        rows.append(row)
        print(f"{name:>12} {med:>8.2f} {row['per_s']:>14.1f} {row['speedup']:>14.2f} {row['mean_reward']:>12.3f}")
    write_json("reward_scoring", args=vars(args), cores=cores, rows=rows)


if __name__ == "__main__":
    main()
