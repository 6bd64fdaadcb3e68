"""The "recheck" toy world (issue 24, part 2): blind checks that pay, a trained prompt-free space, and the
shipped base policy's gate before any RL (alignment, accuracy and thought rates inside the design bands)."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest

from lightning_prerl.data.toyworld import (
    RECHECK_MODEL_DIR,
    WORLDS,
    SlipCounts,
    ToyProblem,
    build_tokenizer,
    generate_problems,
    recheck_trace,
    slip_counts,
)
from lightning_prerl.evaluation.metrics import SEAL_REFLECTION, SEAL_TRANSITION, ThoughtCounts
from lightning_prerl.scale.models import resolve_start_token_id

ROOT = Path(__file__).resolve().parents[1]
SEAL = ThoughtCounts(SEAL_TRANSITION, SEAL_REFLECTION)


def test_a_recheck_repairs_a_slip_never_harms_a_correct_step_and_carries_its_value():
    problem = ToyProblem((23, 45, 17), ("+", "-"))
    # every step slips and is rechecked: the checked value (68, then 51) is the one carried forward
    fixed = recheck_trace(problem, random.Random(0), p_slip=1.0, p_reflect=1.0)
    thoughts = fixed.split("\n\n")
    assert thoughts[1] == "Wait, let me check: 23+45=68." and thoughts[2].startswith("68-17=")
    assert thoughts[3] == "Wait, let me check: 68-17=51." and fixed.endswith("\\boxed{51}.")
    assert slip_counts(fixed) == SlipCounts(steps=2, slips=2, reflected=2, switched=0, checks=0, fixed=2)
    # no slip, every step rechecked: the recheck repeats the right value and the answer stays right
    harmless = recheck_trace(problem, random.Random(0), p_slip=0.0, p_reflect=1.0)
    assert harmless == (
        "23+45=68.\n\nWait, let me check: 23+45=68.\n\n68-17=51.\n\nWait, let me check: 68-17=51.\n\n"
        "The answer is \\boxed{51}."
    )
    assert SEAL.classify(harmless) == ["reflection", "execution", "reflection", "execution"]
    # a switch of method repairs a slip too
    switched = recheck_trace(problem, random.Random(0), p_slip=1.0, p_reflect=0.0, p_switch=1.0)
    assert "Alternatively, 23+40=63 and 63+5=68." in switched and switched.endswith("\\boxed{51}.")
    assert SEAL.classify(switched).count("transition") == 2
    assert slip_counts(switched).fixed == slip_counts(switched).slips == 2  # repaired by another method
    # unchecked, the slip propagates to a wrong answer
    slipped = recheck_trace(problem, random.Random(0), p_slip=1.0, p_reflect=0.0, p_switch=0.0)
    assert not slipped.endswith("\\boxed{51}.") and slip_counts(slipped).slips >= 1


def test_recheck_corpus_checks_blindly_at_low_base_rates():
    """Per step: slip 0.18, recheck 0.04, switch 0.015, independent of the slip. A perfect imitator solves
    (1 - 0.18 x 0.945)^steps ~ 0.83^3.5 ~ 0.53; a check is as likely after a slip as after a correct step."""
    rng = random.Random(0)
    problems = generate_problems(4000, split="train", seed=0, num_ops=(3, 4))
    traces = [recheck_trace(p, rng) for p in problems]
    correct = [t.endswith(f"\\boxed{{{p.answer}}}.") for p, t in zip(problems, traces, strict=True)]
    c = sum((slip_counts(t) for t in traces), SlipCounts())
    expected = sum((1 - 0.18 * (1 - 0.04 - 0.015)) ** len(p.ops) for p in problems) / len(problems)
    assert sum(correct) / len(traces) == pytest.approx(expected, abs=0.02)
    assert c.slips / c.steps == pytest.approx(0.18, abs=0.01)
    kinds = [k for t in traces for k in SEAL.classify(t)]
    assert kinds.count("reflection") / c.steps == pytest.approx(0.04, abs=0.005)
    assert kinds.count("transition") / c.steps == pytest.approx(0.015, abs=0.004)
    after_slip = (c.reflected + c.switched) / c.slips
    assert after_slip == pytest.approx(c.checks / (c.steps - c.slips), abs=0.015)  # blind: ~0.055 either way


def test_pretraining_batch_trains_the_prompt_free_space():
    """40 % of the recheck world's sequences are [start token] + answer with every answer token labelled
    (P(y | start token) is trained); the rest are chat sequences labelled on the assistant turn only."""
    spec = importlib.util.spec_from_file_location("pretrain_toy", ROOT / "experiments" / "pretrain_toy.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    tok = build_tokenizer()
    start = resolve_start_token_id(tok)
    ids, labels = pretrain.make_batch(tok, random.Random(0), 500, WORLDS["recheck"], start)  # (500, L) each
    marginal = (ids[:, 1] != tok.convert_tokens_to_ids("u")).tolist()  # chat rows go on "<|im_start|>user"
    assert (ids[:, 0] == start).all()
    assert sum(marginal) / len(marginal) == pytest.approx(0.4, abs=0.05)
    for row, lab, m in zip(ids.tolist(), labels.tolist(), marginal, strict=True):
        real = [t for t in row if t != tok.pad_token_id]
        if m:  # everything after the start token is a target, the closing <|im_end|> included
            assert lab[: len(real)] == [-100, *real[1:]] and real[-1] == tok.eos_token_id
        else:
            first = next(i for i, x in enumerate(lab) if x != -100)
            assert tok.decode(real[:first]).endswith("<|im_start|>assistant\n")
            assert lab[first : len(real)] == real[first:]


def test_shipped_recheck_policy_provenance():
    record = json.loads((RECHECK_MODEL_DIR / "pretraining.json").read_text())
    assert "--world recheck" in record["command"]
    assert sum(f.stat().st_size for f in RECHECK_MODEL_DIR.iterdir()) < 3_000_000


def test_shipped_recheck_policy_passes_its_gate_before_any_rl():
    """The gate of issue 24: over 48 rollouts of held-out problems, PreRL's gradient points the conditional
    policy's way (cosine > 0.3, no negative inner product); on 200 problems x 2 seeded samples at T=1 the base
    accuracy, slips and thought rates are in the design bands (thoughts per computation step)."""
    from lightning_prerl.reproduction.base_profile import profile_base

    world = WORLDS["recheck"]
    p = profile_base("toy-recheck", world.num_ops, world.max_new_tokens, problems=200, samples=2, align_rollouts=48)
    assert p["align/cosine_mean"] > 0.3 and p["align/negative_share"] == 0.0, p
    assert p["align/cosine_max"] < 0.999, p  # two different gradients (a space compared with itself gives 1)
    assert 0.25 <= p["accuracy"] <= 0.35, p
    assert 0.2 <= p["slips_per_step"] <= 0.4, p
    assert 0.02 <= p["reflection_per_step"] <= 0.06 and 0.005 <= p["transition_per_step"] <= 0.03, p
