"""What policies of the "thoughts" toy world do after a slip: the reproduction report's test of finding (b).

Per-response thought counts (SEAL's statistic) mix two things in this world: how often a policy slips
(every repair follows a slip) and how often it repairs a slip. A policy that slips less writes fewer
reflection thoughts even when it repairs more of its slips. This module samples held-out answers from
policies (the base and each run's exported `policy/`), with the same seeds for every policy, and
separates the two with `toyworld.slip_counts`:

| key | meaning |
|---|---|
| `slips_per_answer` | wrong computation thoughts per answer |
| `repair_share` | slips followed by a reflection or transition thought (repair attempts) / slips |
| `fixed_share` | slips repaired successfully (the repair states the right value and the answer carries it on) / slips |
| `fix_rate` | successful repairs / repair attempts |
| `reflect_share`, `switch_share` | the same, reflection / transition only |
| `check_share` | correct computations followed by a reflection or transition thought / correct ones |
| `thoughts_per_step` | reflection and transition thoughts (after slips and after correct steps) / computations |
| `fixed_per_step` | slips repaired successfully / computations: what repairs add per step of reasoning |

Each is a ratio of sums over answers; `slip_intervals` gives it a 95 % interval by resampling seeds and
answers (`intervals.ratio`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import lightning_prerl.reproduction.stats as stats
from lightning_prerl.data.prompts import render_prompt, toy_prompts
from lightning_prerl.data.rewards import Prompt
from lightning_prerl.data.toyworld import slip_counts
from lightning_prerl.evaluation import intervals
from lightning_prerl.rollout.engine import SamplingConfig, derive_seed
from lightning_prerl.rollout.hf import HFEngine
from lightning_prerl.scale.models import load_policy, load_tokenizer, stop_token_ids

RATIOS = {  # field: (numerator, denominator) of one answer's SlipCounts, summed over answers
    "slips_per_answer": (lambda c: c.slips, lambda c: 1),
    "repair_share": (lambda c: c.reflected + c.switched, lambda c: c.slips),
    "fixed_share": (lambda c: c.fixed, lambda c: c.slips),
    "fix_rate": (lambda c: c.fixed, lambda c: c.reflected + c.switched),
    "reflect_share": (lambda c: c.reflected, lambda c: c.slips),
    "switch_share": (lambda c: c.switched, lambda c: c.slips),
    "check_share": (lambda c: c.checks, lambda c: c.steps - c.slips),
    "thoughts_per_step": (lambda c: c.reflected + c.switched + c.checks, lambda c: c.steps),
    "fixed_per_step": (lambda c: c.fixed, lambda c: c.steps),
}
FIELDS = list(RATIOS)


def sample(policy: str, prompts: list[Prompt], samples: int, max_new_tokens: int, seed: int = 0, purpose="repairs"):
    """(tokenizer, model, prompt ids, Generation): `samples` answers at temperature 1 to each of `prompts`;
    the sampling seeds depend only on (`purpose`, `seed`, prompt position), so every policy sees the same
    random numbers."""
    tokenizer, model = load_tokenizer(policy), load_policy(policy)
    engine = HFEngine(tokenizer, stop_token_ids=stop_token_ids(tokenizer, policy))
    engine.sync(model)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=max_new_tokens)
    seeds = [derive_seed(purpose, seed, i) for i in range(len(prompts))]
    ids = [render_prompt(tokenizer, p) for p in prompts]
    with torch.no_grad():
        out = engine.generate(ids, samples, sampling, seeds=seeds)
    return tokenizer, model, ids, out


def sample_answers(policy: str, prompts: list[Prompt], samples: int, max_new_tokens: int, seed: int = 0) -> list[str]:
    """The decoded answers of `sample`."""
    tokenizer, _, _, out = sample(policy, prompts, samples, max_new_tokens, seed)
    return tokenizer.batch_decode(out.completions, skip_special_tokens=True)


def slip_stats(answers: list[str]) -> dict:
    """FIELDS over `answers` (a share is None when its denominator is 0), and `per_answer`: each answer's
    (numerator, denominator) of every field, what `slip_intervals` resamples."""
    counts = [slip_counts(a) for a in answers]
    per_answer = {f: [(num(c), den(c)) for c in counts] for f, (num, den) in RATIOS.items()}

    def share(pairs: list[tuple[int, int]]) -> float | None:
        d = sum(x for _, x in pairs)
        return sum(n for n, _ in pairs) / d if d else None

    return {"answers": len(answers), **{f: share(pairs) for f, pairs in per_answer.items()}, "per_answer": per_answer}


def slip_intervals(per_seed: list[dict]) -> dict[str, dict | None]:
    """Every field of the `slip_stats` of S policies (seeds, same prompts and sampling seeds) as a ratio of
    sums with its two-level bootstrap interval over seeds and answers (`intervals.ratio`)."""
    out = {}
    for f in FIELDS:  # one policy: S = 1, the bootstrap over answers
        pairs = np.array([s["per_answer"][f] for s in per_seed], dtype=np.float64)  # (S, A, 2)
        ci = intervals.ratio(pairs[..., 0], pairs[..., 1])
        out[f] = None if math.isnan(ci.estimate) else stats.as_dict(ci)
    return out


def sweep_slip_stats(job_dirs: list[Path], problems: int, samples: int) -> tuple[dict, dict[Path, dict]]:
    """(`slip_stats` of the base policy of the first job, {job dir: that of its exported `policy/`}) for every
    job that exported one: `samples` answers to each of the first `problems` problems of the sweep's held-out
    split with its completion budget (read from the first job's saved `.hydra/config.yaml`)."""
    import yaml

    config = yaml.safe_load((Path(job_dirs[0]) / ".hydra" / "config.yaml").read_text())
    held_out, budget = config["data"]["eval_prompts"], config["data"]["sampling"]["max_new_tokens"]
    num_ops = tuple(held_out.get("num_ops", (2, 3)))  # the "recheck" world asks 3-4 operations
    prompts = toy_prompts(split=held_out["split"], count=problems, seed=held_out["seed"], num_ops=num_ops)

    def stats(policy: str | Path) -> dict:
        return slip_stats(sample_answers(str(policy), prompts, samples, budget))

    trained = {d: stats(d / "policy") for d in job_dirs if (d / "policy").is_dir()}
    return stats(config["model"]["path"]), trained
