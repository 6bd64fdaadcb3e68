"""Rebuild the shipped toy base policy from scratch on CPU (about 10-13 minutes on 2 cores).

    python experiments/pretrain_toy.py                       # writes lightning_prerl/assets/toy-base
    python experiments/pretrain_toy.py --world thoughts --steps 2000   # writes lightning_prerl/assets/toy-thoughts
    python experiments/pretrain_toy.py --world recheck --init toy-thoughts --steps 450 --lr 1e-3 --warmup 30 --threads 1
                                                             # writes lightning_prerl/assets/toy-recheck
    python experiments/pretrain_toy.py --steps 300 --out /tmp/toy   # quick look

Supervised next-token training on a fresh synthetic batch every step (no repeated epochs):
correct traces, slipped traces and self-corrections of the chosen world (`--world arith`: one-paragraph
answers; `--world thoughts`: one thought per step, blank lines between, reflection and transition
thoughts repairing slips; `--world recheck`: blind rechecks that pay; see `lightning_prerl.data.toyworld`),
loss on the assistant turn only (its closing `<|im_end|>` included). A world with a `marginal_share`
(recheck: 40 %) also trains PreRL's prompt-free space: that share of the sequences is the start token
followed by the answer, with the loss on the whole answer, so P(y | start token) is a trained
distribution and not a context the policy never saw. Held-out problems never enter the corpus.
`--init` continues from a shipped policy: the recheck world starts from toy-thoughts (same tokenizer and
architecture, 13 min) and adds 450 steps (3.6 CPU-minutes on one thread; 16.7 minutes in all).
The recipe (AdamW 2e-3, betas 0.9/0.95, wd 0.1, 100 warm-up steps, cosine to 10 %, clip 1.0,
batch 64) is the one measured in shared/TOY-NOTES.md to land at 20-60 % pass@1 at temperature 1.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from lightning_prerl.data.batch import pad_right
from lightning_prerl.data.prompts import render_prompt, toy_prompts
from lightning_prerl.data.rewards import BoxedExactMatch, Prompt
from lightning_prerl.data.toyworld import (
    WORLDS,
    World,
    build_model,
    build_tokenizer,
    is_held_out,
    sample_problem,
)
from lightning_prerl.rollout.engine import SamplingConfig
from lightning_prerl.rollout.hf import HFEngine
from lightning_prerl.scale.models import resolve_model_path, resolve_start_token_id


def make_batch(
    tok, rng: random.Random, size: int, world: World = WORLDS["arith"], start_token_id: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels): chat sequences with labels = -100 outside the assistant turn, and
    `world.marginal_share` of them `[start token] + answer` labelled everywhere after the start token."""
    seqs, labels = [], []
    while len(seqs) < size:
        problem = sample_problem(rng, world.num_ops, 99)
        if is_held_out(problem.question):
            continue
        answer_ids = tok(world.trace(problem, rng), add_special_tokens=False)["input_ids"]
        answer_ids.append(tok.eos_token_id)
        if rng.random() < world.marginal_share:
            context = [start_token_id]
        else:
            context = render_prompt(tok, Prompt(problem.question, str(problem.answer)))
        seqs.append(context + answer_ids)
        labels.append([-100] * len(context) + answer_ids)
    ids, _ = pad_right(seqs, tok.pad_token_id)
    lab, _ = pad_right(labels, -100)
    return ids, lab


def evaluate(model, tok, prompts: list[Prompt], max_new_tokens: int = 120) -> dict[str, float]:
    """pass@1 at temperature 1 (true sampling: top_k off) and greedy accuracy, with the RL engine."""
    engine, reward = HFEngine(tok), BoxedExactMatch()
    engine.sync(model)
    ids = [render_prompt(tok, p) for p in prompts]
    out = {}
    for name, temperature in (("pass1_t1", 1.0), ("greedy", 0.0)):
        gen = engine.generate(ids, 1, SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens))
        completions = tok.batch_decode(gen.completions, skip_special_tokens=True)
        out[name] = sum(reward(p, c) for p, c in zip(prompts, completions, strict=True)) / len(prompts)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", choices=sorted(WORLDS), default="arith")
    ap.add_argument("--out", type=Path, default=None, help="default: the world's shipped policy directory")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", default=None, help="start from this shipped policy (toy, toy-thoughts) or directory")
    args = ap.parse_args()
    world = WORLDS[args.world]
    args.out = args.out or world.model_dir

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    tok = build_tokenizer()
    if args.init is None:
        model = build_model(tok)
    else:  # same architecture and tokenizer: continue pretraining on this world's corpus
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(args.init))
    start_token_id = resolve_start_token_id(tok)  # the token PreRL scores with: <|im_start|>
    held_out = toy_prompts("heldout", 200, seed=1234, num_ops=world.num_ops)  # the RL runs' held-out set
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start, cpu_start, history, losses = time.time(), time.process_time(), [], []
    model.train()
    bar = tqdm(range(1, args.steps + 1), desc="pretraining", unit="step")
    for step in bar:
        ids, labels = make_batch(tok, rng, args.batch, world, start_token_id)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            metrics = evaluate(model, tok, held_out, world.max_new_tokens)
            row = {
                "step": step,
                "minutes": (time.time() - start) / 60,
                # CPU minutes over the threads used: the wall minutes on an otherwise idle machine
                "cpu_minutes_per_thread": (time.process_time() - cpu_start) / 60 / args.threads,
                "loss": sum(losses) / len(losses),
                **metrics,
            }
            losses.clear()
            history.append(row)
            bar.write(json.dumps(row))

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    provenance = {
        "command": " ".join(["python experiments/pretrain_toy.py", *sys.argv[1:]]),
        "args": {k: str(v) for k, v in vars(args).items()},
        "params": sum(p.numel() for p in model.parameters()),
        "history": history,
    }
    if args.init is not None:  # the starting policy's own pretraining, for the total cost
        init_record = resolve_model_path(args.init) / "pretraining.json"
        if init_record.is_file():
            provenance["init_pretraining"] = json.loads(init_record.read_text())
    (args.out / "pretraining.json").write_text(json.dumps(provenance, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
