"""A toy world's base policy before any RL: can the paper's mechanisms act on it?

`profile_base` samples held-out answers of a shipped toy policy at temperature 1 (seeded, so the same
policy always gives the same figures) and measures what the "recheck" world is designed for:

| key | meaning |
|---|---|
| `accuracy` (+ `_ci_low`, `_ci_high`) | mean reward, 95 % bootstrap interval over problems |
| `slips_per_step` | wrong computation thoughts / computation thoughts (`toyworld.slip_counts`) |
| `reflection_per_step`, `transition_per_step` | SEAL reflection / transition thoughts / computations |
| `reflect_after_slip` | slipped computations followed by a recheck or a switch / slipped ones |
| `reflect_after_correct` | the same for correct computations: equal to the above when checking is blind |
| `align/*` | the gradient-alignment statistics (`reports.alignment`) over `align_rollouts` answers |

A positive inner product <grad log P(y), grad log P(y|x)> is what makes PreRL a surrogate for conditional
RL (arXiv 2604.14142, Sec. 2): the gate of a world whose prompt-free space is trained.
"""

from __future__ import annotations

import torch

from lightning_prerl.data.batch import RolloutBatch, pad_left, pad_right
from lightning_prerl.data.prompts import toy_prompts
from lightning_prerl.data.rewards import BoxedExactMatch
from lightning_prerl.data.toyworld import SlipCounts, slip_counts
from lightning_prerl.evaluation.intervals import over_problems
from lightning_prerl.evaluation.metrics import SEAL_REFLECTION, SEAL_TRANSITION, ThoughtCounts
from lightning_prerl.reports.alignment import alignment_samples, summarize
from lightning_prerl.reproduction.repairs import sample
from lightning_prerl.scale.models import resolve_start_token_id


def profile_base(
    policy: str,
    num_ops: tuple[int, int],
    max_new_tokens: int,
    problems: int = 200,
    samples: int = 2,
    align_rollouts: int = 48,
    seed: int = 0,
) -> dict[str, float]:
    """The table above for `policy` on the first `problems` held-out problems (`samples` answers each);
    the alignment is measured on the first `align_rollouts` answers."""
    prompts = toy_prompts("heldout", problems, seed=1234, num_ops=num_ops)  # the RL runs' held-out set
    tokenizer, model, ids, gen = sample(policy, prompts, samples, max_new_tokens, seed, purpose="base-profile")
    texts = tokenizer.batch_decode(gen.completions, skip_special_tokens=True)
    reward, repeated = BoxedExactMatch(), [p for p in prompts for _ in range(samples)]
    rewards = torch.tensor([reward(p, t) for p, t in zip(repeated, texts, strict=True)])  # (N,)
    accuracy = over_problems(rewards.view(len(prompts), samples).mean(1).tolist())  # N = problems x samples

    c = sum((slip_counts(t) for t in texts), SlipCounts())
    thoughts = ThoughtCounts(SEAL_TRANSITION, SEAL_REFLECTION)
    thoughts.update(texts)
    per_response = {k: v.item() for k, v in thoughts.compute().items()}
    out = {
        "accuracy": accuracy.estimate,
        **accuracy.as_dict("accuracy"),
        "answers": float(len(texts)),
        "steps_per_answer": c.steps / len(texts),
        "slips_per_step": c.slips / max(1, c.steps),
        "reflection_per_step": per_response["reflection"] * len(texts) / max(1, c.steps),
        "transition_per_step": per_response["transition"] * len(texts) / max(1, c.steps),
        "reflect_after_slip": (c.reflected + c.switched) / max(1, c.slips),
        "reflect_after_correct": c.checks / max(1, c.steps - c.slips),
    }

    n = min(align_rollouts, len(texts))
    prompt_ids, prompt_mask = pad_left([x for x in ids for _ in range(samples)][:n], tokenizer.pad_token_id)
    response_ids, response_mask = pad_right(gen.completions[:n], tokenizer.pad_token_id)
    batch = RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        response_ids=response_ids,
        response_mask=response_mask,
        rewards=rewards[:n].float(),
        group_size=samples,
        texts=texts[:n],
    )
    rows = alignment_samples(model, batch, resolve_start_token_id(tokenizer), max_samples=n)
    return out | summarize(rows)
