"""Stop tokens with the real Qwen3 tokenizer: every generation_config EOS id ends a completion."""

from __future__ import annotations

from lightning_prerl.data.prompts import render_prompt
from lightning_prerl.data.rewards import Prompt
from lightning_prerl.rollout.engine import SamplingConfig
from lightning_prerl.rollout.hf import HFEngine
from lightning_prerl.scale.models import load_policy, load_tokenizer, stop_token_ids


def test_stop_ids_come_from_the_tokenizer_the_generation_config_and_the_config(qwen3_mini_dir):
    tok = load_tokenizer(str(qwen3_mini_dir))
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.eos_token_id == im_end  # the tokenizer alone knows only one of Qwen3's two stop ids
    assert stop_token_ids(tok, str(qwen3_mini_dir)) == [im_end, endoftext]
    assert stop_token_ids(tok, str(qwen3_mini_dir), extra=[13]) == [im_end, endoftext, 13]
    import pytest

    with pytest.raises(ValueError, match="model.stop_token_ids: 999999 is not a token id"):
        stop_token_ids(tok, str(qwen3_mini_dir), extra=[999999])


def test_hf_engine_stops_at_every_qwen3_stop_id_and_counts_the_rest_as_truncated(qwen3_mini_dir):
    tok = load_tokenizer(str(qwen3_mini_dir))
    stops = stop_token_ids(tok, str(qwen3_mini_dir))
    engine = HFEngine(tok, stop_token_ids=stops)
    engine.sync(load_policy(str(qwen3_mini_dir)))
    prompts = [render_prompt(tok, Prompt(f"What is {i} + {i}?", str(2 * i))) for i in range(6)]
    max_new = 48
    gen = engine.generate(prompts, 4, SamplingConfig(max_new_tokens=max_new), seeds=list(range(6)))
    ended = [c[-1] for c in gen.completions if c and c[-1] in stops]
    assert set(ended) == set(stops)  # <|endoftext|> stops too, not only the tokenizer's <|im_end|>
    for c in gen.completions:
        assert not set(c[:-1]) & set(stops)  # nothing after the first stop id
        assert c[-1] in stops or len(c) == max_new  # otherwise it ran out of budget: truncated
    assert 0 < sum(c[-1] not in stops for c in gen.completions) < len(gen.completions)
