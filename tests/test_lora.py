"""LoRA through peft: merged weights without in-place merging, the adapter-switching reference, and a
DSRL run across the switch that trains adapters only, exports (merged and as an adapter) and resumes
exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from test_resume import kill_after_step, metrics, weights
from test_run import run_experiment

from lightning_prerl.scale.lora import BASE, SNAPSHOT, AdapterView, LoraSettings, apply_lora, snapshot_adapter
from lightning_prerl.scale.models import full_weights, load_policy

IDS = torch.tensor([[1, 5, 9, 20, 30, 40, 50], [2, 6, 10, 21, 31, 41, 51]])


def _trained_lora(r: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    model = apply_lora(load_policy("toy"), LoraSettings(r=r, alpha=8))
    with torch.no_grad():  # B starts at zero: give the adapter something to merge
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def test_only_adapters_train_and_bad_settings_are_one_line():
    model = _trained_lora()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any("lm_head" in n or "embed" in n for n in trainable)  # all-linear skips the output head
    with pytest.raises(ValueError, match=r"model.lora.r=-1"):
        LoraSettings(r=-1)
    with pytest.raises(ValueError, match=r"model.lora.target_modules=\['nope'\]"):
        apply_lora(load_policy("toy"), LoraSettings(r=2, target_modules=("nope",)))


def test_merged_weights_equal_peft_merge_and_leave_the_policy_unmerged():
    model = _trained_lora()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = dict(full_weights(model))
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(reference) <= set(merged) and set(merged) - set(reference) <= {"lm_head.weight"}  # tied head
    for name, tensor in reference.items():
        assert torch.equal(merged[name], tensor), name  # the same float32 ops as peft's merge
    assert not any(".lora_" in n or "base_layer" in n for n in merged)
    adapted = [n for n in merged if "q_proj" in n]
    assert adapted and not torch.equal(merged[adapted[0]], load_policy("toy").state_dict()[adapted[0]])
    for name, tensor in model.state_dict().items():  # nothing merged in place
        assert torch.equal(tensor, before[name]), name
    with torch.no_grad():  # the merged model computes what the adapted one does
        plain = load_policy("toy")
        plain.load_state_dict({k: v for k, v in merged.items() if k in plain.state_dict()})
        assert torch.allclose(plain(IDS).logits, model(IDS).logits, atol=1e-4, rtol=0)  # W x + B A x in another order


@torch.no_grad()
def test_reference_views_score_the_base_and_a_frozen_snapshot():
    model = _trained_lora()
    base = load_policy("toy")
    assert torch.allclose(AdapterView(model, BASE)(input_ids=IDS).logits, base(IDS).logits, atol=1e-6, rtol=0)
    model.train()
    now = model(input_ids=IDS).logits
    snapshot_adapter(model)
    assert model.training
    assert sorted({n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad}) == ["default"]
    for name, p in model.named_parameters():  # train on: the snapshot must not follow
        if "lora_B.default" in name:
            p.add_(0.1)
    view = AdapterView(model, SNAPSHOT)
    assert torch.allclose(view(input_ids=IDS).logits, now, atol=1e-6, rtol=0)
    assert not torch.allclose(model(input_ids=IDS).logits, now, atol=1e-3)


LORA_RUN = [
    "objective=dsrl",
    "model.lora.r=4",
    "module.lr=3e-3",
    "objective.switch_step=2",
    "objective.main.kl_coef=0.05",  # KL against a snapshot adapter reset at the switch
    "trainer.check_val_every_n_epoch=2",
    "data.eval_prompts.count=12",
    "data.prompts_per_step=4",
    "data.samples_per_prompt=4",
    "data.sampling.max_new_tokens=48",
    "callbacks.checkpoint.every_n_train_steps=1",
    "trainer.max_steps=4",
]


@pytest.mark.slow
def test_lora_dsrl_trains_adapters_only_exports_both_ways_and_resumes_exactly(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    full = tmp_path / "uninterrupted"
    run_experiment(full, *LORA_RUN)
    ckpt = torch.load(full / "checkpoints" / "step000004.ckpt", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all(".lora_" in k for k in keys)  # the base is the model on disk
    assert any(f".{SNAPSHOT}." in k for k in keys) and ckpt["lora"]["reference_adapter"] == SNAPSHOT
    base_file = load_policy("toy").state_dict()
    merged = AutoModelForCausalLM.from_pretrained(full / "policy")  # plain transformers
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base_file[k])]
    assert changed and all(k.endswith("_proj.weight") for k in changed)  # only adapted layers moved
    adapted = PeftModel.from_pretrained(load_policy("toy"), full / "policy" / "adapter")
    with torch.no_grad():
        assert torch.allclose(adapted(IDS).logits, merged(IDS).logits, atol=1e-4, rtol=0)

    run_dir = tmp_path / "killed-after-3"  # after the switch: the snapshot adapter must come back
    kill_after_step(run_dir, 3, *LORA_RUN)
    run_experiment(run_dir, *LORA_RUN, "ckpt_path=auto")
    assert metrics(run_dir) == metrics(full)
    assert weights(run_dir) == weights(full)


@pytest.mark.slow
def test_lora_trains_the_same_policy_on_one_process_ddp_and_fsdp(tmp_path):
    from test_scale import SAME_RUN, TOLERANCE, _final_weights

    runs = {}
    for trainer in ("cpu", "ddp", "fsdp"):
        run_experiment(tmp_path / trainer, f"trainer={trainer}", *SAME_RUN, "model.lora.r=4", "module.lr=3e-3")
        runs[trainer] = _final_weights(tmp_path / trainer)
    base = load_policy("toy").state_dict()
    assert any(not torch.equal(w, base[k]) for k, w in runs["cpu"].items() if k in base)
    for trainer in ("ddp", "fsdp"):
        for name, tensor in runs["cpu"].items():
            assert torch.allclose(runs[trainer][name], tensor, atol=TOLERANCE, rtol=0), (trainer, name)
