"""Rebuild the shipped toy base policy from scratch on CPU (about 10-13 minutes on 2 cores).

    python experiments/pretrain_toy.py                       # writes lightning_prerl/assets/toy-base
    python experiments/pretrain_toy.py --steps 300 --out /tmp/toy   # quick look

Supervised next-token training on a fresh synthetic batch every step (no repeated epochs):
correct traces, slipped traces and self-corrections (see `lightning_prerl.toyworld`), loss on the
assistant turn only (its closing `<|im_end|>` included). Held-out problems never enter the corpus.
The recipe (AdamW 2e-3, betas 0.9/0.95, wd 0.1, 100 warm-up steps, cosine to 10 %, clip 1.0,
batch 64) is the one measured in shared/TOY-NOTES.md to land at 20-60 % pass@1 at temperature 1.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lightning_prerl.batch import pad_right
from lightning_prerl.rewards import BoxedExactMatch, Prompt
from lightning_prerl.toyworld import (
    SHIPPED_MODEL_DIR,
    build_model,
    build_tokenizer,
    generate_problems,
    is_held_out,
    sample_problem,
    solution_trace,
)


def make_batch(tok, rng: random.Random, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, labels) with labels = -100 outside the assistant turn."""
    seqs, labels = [], []
    while len(seqs) < size:
        problem = sample_problem(rng, (2, 3), 99)
        if is_held_out(problem.question):
            continue
        msgs = [{"role": "user", "content": problem.question}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tok(solution_trace(problem, rng), add_special_tokens=False)["input_ids"]
        answer_ids.append(tok.eos_token_id)
        seqs.append(prompt_ids + answer_ids)
        labels.append([-100] * len(prompt_ids) + answer_ids)
    ids, _ = pad_right(seqs, tok.pad_token_id)
    lab, _ = pad_right(labels, -100)
    return ids, lab


@torch.no_grad()
def evaluate(model, tok, problems, max_new_tokens: int = 120) -> dict[str, float]:
    """pass@1 at temperature 1 (true sampling: top_k=0) and greedy accuracy."""
    reward = BoxedExactMatch()
    prompts = [Prompt(p.question, str(p.answer)) for p in problems]
    texts = [tok.apply_chat_template(p.messages(), add_generation_prompt=True, tokenize=False) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    model.eval()
    out = {}
    for name, kwargs in {
        "pass1_t1": dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0),
        "greedy": dict(do_sample=False),
    }.items():
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kwargs)
        completions = tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        out[name] = sum(reward(p, c) for p, c in zip(prompts, completions, strict=True)) / len(prompts)
    model.train()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=SHIPPED_MODEL_DIR)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    tok = build_tokenizer()
    model = build_model(tok)
    held_out = generate_problems(200, split="heldout", seed=1234)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start, history, losses = time.time(), [], []
    model.train()
    bar = tqdm(range(1, args.steps + 1), desc="pretraining", unit="step")
    for step in bar:
        ids, labels = make_batch(tok, rng, args.batch)
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % args.eval_every == 0 or step == args.steps:
            metrics = evaluate(model, tok, held_out)
            row = {"step": step, "minutes": (time.time() - start) / 60, "loss": sum(losses) / len(losses), **metrics}
            losses.clear()
            history.append(row)
            bar.write(json.dumps(row))

    args.out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    provenance = {
        "command": "python experiments/pretrain_toy.py",
        "args": {k: str(v) for k, v in vars(args).items()},
        "params": sum(p.numel() for p in model.parameters()),
        "history": history,
    }
    (args.out / "pretraining.json").write_text(json.dumps(provenance, indent=2))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
