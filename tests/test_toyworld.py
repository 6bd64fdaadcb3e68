"""The embedded toy world: deterministic splits, correct traces, the shipped checkpoint."""

from __future__ import annotations

import random
import re

import pytest

from lightning_prerl.data.prompts import toy_prompts
from lightning_prerl.data.rewards import BoxedExactMatch, Prompt
from lightning_prerl.data.toyworld import SHIPPED_MODEL_DIR, build_tokenizer, generate_problems, solution_trace


def test_splits_are_deterministic_and_disjoint():
    train = generate_problems(500, split="train", seed=0)
    held = generate_problems(100, split="heldout", seed=0)
    assert train == generate_problems(500, split="train", seed=0)
    assert not {p.question for p in train} & {p.question for p in held}
    assert all(min(p.partials()) >= 0 and 2 <= len(p.ops) <= 3 for p in train)


def test_one_operation_prompts_carry_the_system_prompt_and_a_too_large_count_stops():
    prompts = toy_prompts("heldout", 5, seed=1234, num_ops=(1, 1), max_operand=50, system="Be exact.")
    assert all(p.messages()[0] == {"role": "system", "content": "Be exact."} for p in prompts)
    assert all(re.fullmatch(r"Compute \d+[+-]\d+", p.question) for p in prompts)
    # two problems (1+1 and 1-1) exist with max_operand=1; asking for more must stop, not draw forever
    with pytest.raises(ValueError, match=r"count=3: the train split .* gave only 2 distinct problems"):
        generate_problems(3, split="train", seed=0, num_ops=(1, 1), max_operand=1, held_out_percent=0)


def test_trace_mix_has_correct_slipped_and_corrected_answers():
    rng, reward = random.Random(0), BoxedExactMatch()
    kinds = {"correct": 0, "wrong": 0, "corrected": 0}
    for p in generate_problems(400, split="train", seed=1):
        trace = solution_trace(p, rng)
        ok = reward(Prompt(p.question, str(p.answer)), trace) == 1.0
        kinds["corrected" if "Wait, let me check" in trace else "correct" if ok else "wrong"] += 1
        if "Wait, let me check" in trace:
            assert ok  # a self-correction always lands on the right answer
    # designed mix 65 / 20 / 15 %
    assert 0.55 < kinds["correct"] / 400 < 0.75
    assert 0.12 < kinds["wrong"] / 400 < 0.28
    assert 0.08 < kinds["corrected"] / 400 < 0.22


def test_tokenizer_round_trips_and_has_no_bos():
    tok = build_tokenizer()
    text = "Compute 23+45-17\n\\boxed{51}"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.bos_token_id is None and tok.eos_token == "<|im_end|>"
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_shipped_checkpoint_is_small_loadable_and_vllm_compatible():
    from transformers import AutoConfig

    size = sum(f.stat().st_size for f in SHIPPED_MODEL_DIR.iterdir())
    assert size < 20 * 2**20
    cfg = AutoConfig.from_pretrained(SHIPPED_MODEL_DIR)
    assert cfg.hidden_size // cfg.num_attention_heads >= 32  # vLLM CPU attention needs head_dim >= 32
    assert re.search(r'"pass1_t1"', (SHIPPED_MODEL_DIR / "pretraining.json").read_text())


def test_auto_tokenizer_loads_the_shipped_character_tokenizer_unchanged():
    """AutoTokenizer must not swap in a model-type tokenizer (transformers 5 does so for qwen2 dirs)."""
    from transformers import AutoTokenizer

    text = "<|im_start|>user\nCompute 1 + 2<|im_end|>\n"
    loaded = AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR)
    assert (
        loaded(text, add_special_tokens=False)["input_ids"]
        == build_tokenizer()(text, add_special_tokens=False)["input_ids"]
    )
