"""Benchmark: the training part of one step for GRPO, PreRL, NSR-PreRL and PSR-PreRL on the same rollout batch.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/objective_cost.py [--prompts 16 --samples 8 --repeats 5]
        [--micro-batch-tokens 4096 0] [--unshared]

One rollout batch is generated once from the shipped toy policy (seeded transformers engine, temperature
1, boxed exact-match rewards); then each objective's training part -- `update.prepare` +
`backward_objective` + one AdamW step, what `PolicyModule.training_step` times as `time/train` --
runs on a fresh copy of the policy, the objectives in alternation, `--repeats` rounds; the median is
reported with the ratio to GRPO at the first budget. Each objective runs at every `--micro-batch-tokens`
budget (padded tokens per forward/backward, rows of similar length together; 0: the whole batch in one
pass), all in the same alternation; with `--unshared` GRPO also runs with one prompt forward per sample
(`share_prompts=False`; the prompt-free objectives have no prompt to share). Also printed: the share of
samples each objective keeps, the response tokens it forwards and the micro-batches it runs.
JSON: benchmarks/results/objective_cost.json.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from results_io import write_json  # noqa: E402

from lightning_prerl.data.prompts import toy_prompts  # noqa: E402
from lightning_prerl.data.rewards import BoxedExactMatch  # noqa: E402
from lightning_prerl.objectives import PolicyGradientObjective  # noqa: E402
from lightning_prerl.rollout.engine import SamplingConfig  # noqa: E402
from lightning_prerl.rollout.hf import HFEngine  # noqa: E402
from lightning_prerl.scale.models import load_policy, load_tokenizer  # noqa: E402
from lightning_prerl.training.datamodule import RolloutDataModule  # noqa: E402
from lightning_prerl.training.policy import CondRL, NSRPreRL, PreRL, PSRPreRL  # noqa: E402
from lightning_prerl.training.update import MicroBatching, backward_objective, prepare, rows_with_loss  # noqa: E402

OBJECTIVES = {"grpo": CondRL, "prerl": PreRL, "nsr_prerl": NSRPreRL, "psr_prerl": PSRPreRL}


def rollout_batch(prompts: int, samples: int):
    tok = load_tokenizer("toy")
    policy = load_policy("toy")
    dm = RolloutDataModule(tok, HFEngine(tok), BoxedExactMatch(), toy_prompts("train", prompts, seed=0))
    dm._policy = lambda: policy  # no trainer: generate from this policy
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=120)
    batch = dm.make_batch(dm.train_prompts[:prompts], samples, sampling, list(range(prompts)))
    return tok, policy, batch


def train_part(objective, policy, batch, start: int, micro: MicroBatching) -> float:
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    prepared, _ = prepare(objective, policy, batch, start, micro=micro)
    backward_objective(objective, policy, prepared, start, micro=micro)
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
    opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--micro-batch-tokens", type=int, nargs="+", default=[4096, 0], help="0: one whole-batch pass")
    ap.add_argument("--unshared", action="store_true", help="also GRPO with a prompt forward per sample")
    args = ap.parse_args()
    tok, policy, batch = rollout_batch(args.prompts, args.samples)
    start = CondRL(model_path="toy").start_token_id
    objectives = {name: PolicyGradientObjective(**cls.preset) for name, cls in OBJECTIVES.items()}
    runs = [(name, budget, True) for budget in args.micro_batch_tokens for name in objectives]
    runs += [("grpo", budget, False) for budget in args.micro_batch_tokens if args.unshared]
    times = {run: [] for run in runs}
    for _ in range(args.repeats + 1):  # round 0 warms up and is dropped
        for name, budget, shared in runs:
            micro = MicroBatching(max_tokens=budget or None, share_prompts=shared)
            times[name, budget, shared].append(train_part(objectives[name], copy.deepcopy(policy), batch, start, micro))
    rows = []
    for name, budget, shared in runs:
        prepared, _ = prepare(objectives[name], policy, batch, start)
        kept = prepared.loss_mask.sum(1) > 0  # (N,)
        passes = len(rows_with_loss(prepared, True).micro_batches(max_tokens=budget or None))
        rows.append({
            "objective": name, "micro_batch_tokens": budget, "shared_prompts": shared, "passes": passes,
            "seconds": round(statistics.median(times[name, budget, shared][1:]), 4),
            "kept_samples": round(float(kept.float().mean()), 3),
            "kept_tokens": int(prepared.loss_mask.sum()), "response_tokens": int(batch.response_mask.sum()),
        })  # fmt: skip
    grpo = rows[0]["seconds"]
    print(f"{args.prompts} prompts x {args.samples} samples, accuracy {float(batch.rewards.mean()):.3f}")
    print(f"{'objective':>10} {'budget':>7} {'prompts':>8} {'passes':>7} {'train s':>8} {'/ GRPO':>7}"
          f" {'kept samples':>13} {'kept / response tokens':>23}")  # fmt: skip
    for r in rows:
        r["ratio_to_grpo"] = round(r["seconds"] / grpo, 3)
        prompts = "shared" if r["shared_prompts"] else "own"
        print(
            f"{r['objective']:>10} {r['micro_batch_tokens'] or 'off':>7} {prompts:>8} "
            f"{r['passes']:>7} {r['seconds']:>8.3f} {r['ratio_to_grpo']:>7.2f} {r['kept_samples']:>13.3f} "
            f"{r['kept_tokens']:>11} / {r['response_tokens']}"
        )
    write_json("objective_cost", args=vars(args), rows=rows)


if __name__ == "__main__":
    main()
