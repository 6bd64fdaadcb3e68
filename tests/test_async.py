"""Asynchronous rollouts (`async_rollout`): the worker process, the schedule, the exact DSRL switch, the exact
resume from in-flight batches, 1 process and 2 DDP processes, and the one-line refusals."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch
from test_config import compose_cfg
from test_resume import kill_after_step, metrics, weights
from test_run import read_rows, run_experiment

from lightning_prerl.config.checks import validate_config
from lightning_prerl.errors import ConfigError
from lightning_prerl.rollout.engine import SamplingConfig
from lightning_prerl.rollout.hf import HFEngine
from lightning_prerl.training.record import META_KEY

RUN = [
    "objective=dsrl",
    "objective.switch_step=2",
    "objective.main.kl_coef=0.05",  # a reference, reset at the switch, in every checkpoint
    "trainer.check_val_every_n_epoch=2",
    "data.eval_prompts.count=8",
    "data.prompts_per_step=4",
    "data.samples_per_prompt=4",
    "data.sampling.max_new_tokens=40",
    "data.record_rollouts=true",
    "callbacks.checkpoint.every_n_train_steps=1",
    "trainer.max_steps=5",
]
ASYNC_COLUMNS = ("rollout/staleness", "rollout/stale_regenerated", "rollout_corr/")


def column(rows, key) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def recorded_versions(run_dir, rank: int = 0) -> list[int]:
    files = sorted((run_dir / "rollouts").glob(f"step*-rank{rank}.parquet"))
    return [json.loads(pq.read_schema(f).metadata[META_KEY])["policy_version"] for f in files]


def test_worker_generates_what_the_trainer_would_and_answers_with_the_last_pushed_version(policy, tokenizer):
    """The worker's copy, after a push, samples the in-process engine's completions bit for bit; a request
    is answered with the weights of the last push queued before it, even when a later push is queued
    before the answer is read."""
    from functools import partial

    from lightning_prerl.rollout.worker import RolloutWorker

    prompts = [tokenizer("1+2=")["input_ids"], tokenizer("3+4=")["input_ids"]]
    sampling, seeds = SamplingConfig(max_new_tokens=12), [5, 6]
    local = HFEngine(tokenizer)
    local.sync(policy)
    expected = local.generate(prompts, 3, sampling, True, seeds)
    worker = RolloutWorker(partial(HFEngine), tokenizer, policy)
    try:
        worker.push(policy, 0)
        worker.submit("a", prompts, 3, sampling, True, seeds)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(torch.randn_like(p) * 0.5)
        worker.push(policy, 1)  # queued while "a" may still be generating
        worker.submit("b", prompts, 3, sampling, True, seeds)
        b, a = worker.result("b"), worker.result("a")  # read out of order
        assert (a.version, b.version) == (0, 1)
        assert a.generation.completions == expected.completions
        assert a.generation.logprobs == expected.logprobs
        local.sync(policy)
        assert b.generation.completions == local.generate(prompts, 3, sampling, True, seeds).completions
        assert worker.stop_token_ids == local.stop_token_ids
    finally:
        worker.close()
    assert not worker.process.is_alive()


@pytest.mark.vllm
def test_vllm_in_the_worker_takes_every_push_and_matches_transformers_greedy(vllm):
    """vLLM lives in the worker process: greedy completions equal the transformers engine's on the pushed
    weights, before and after real optimizer steps, each answer tagged with its version."""
    from functools import partial

    from test_vllm import GREEDY, hf_greedy, teach_a_wrong_answer

    from lightning_prerl.data.prompts import render_prompt, toy_prompts
    from lightning_prerl.rollout.vllm import VLLMEngine
    from lightning_prerl.rollout.worker import RolloutWorker
    from lightning_prerl.scale.models import load_policy, load_tokenizer

    tok, policy = load_tokenizer("toy"), load_policy("toy")
    prompts = [render_prompt(tok, p) for p in toy_prompts("heldout", 6, seed=7)]
    factory = partial(VLLMEngine, model_path="toy", max_model_len=256, kv_cache_gib=1)
    worker = RolloutWorker(factory, tok, policy, threads=1)
    try:
        worker.push(policy, 0)
        worker.submit("before", prompts, 1, GREEDY, False, [0] * len(prompts))
        before = hf_greedy(tok, policy, prompts)
        teach_a_wrong_answer(tok, policy, prompts, lr=3e-3)
        worker.push(policy, 1)
        worker.submit("after", prompts, 1, GREEDY, False, [0] * len(prompts))
        first, second = worker.result("before"), worker.result("after")
        assert (first.version, second.version) == (0, 1)
        assert first.generation.completions == before
        assert second.generation.completions == hf_greedy(tok, policy, prompts) != before
    finally:
        worker.close()


@pytest.mark.slow
def test_staleness_zero_is_the_synchronous_run_bit_for_bit(tmp_path):
    """k = 0 runs the synchronous schedule through the worker: same rollouts, metrics and final weights."""
    sync, through = tmp_path / "sync", tmp_path / "async0"
    run_experiment(sync, *RUN, "callbacks.checkpoint.every_n_train_steps=5")
    run_experiment(through, *RUN, "callbacks.checkpoint.every_n_train_steps=5", "async_rollout.enabled=true",
                   "async_rollout.max_staleness=0")  # fmt: skip
    assert weights(through) == weights(sync)
    plain = [{k: v for k, v in r.items() if not k.startswith(ASYNC_COLUMNS)} for r in metrics(through)]
    assert plain == metrics(sync)
    assert column(read_rows(through), "rollout/staleness_max") == [0.0] * 5
    assert recorded_versions(through) == recorded_versions(sync) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_k1_switches_dsrl_exactly_and_resumes_bit_exact_from_in_flight_batches(tmp_path):
    """k = 1: batch t comes from version max(0, t - 1), the objective changes at step 2 exactly (batch 2,
    generated in the warm-up, trains with GRPO), a run killed with a batch in flight resumes to the same
    metrics and weights; resumed under k = 0 the in-flight batch is too old and is generated again."""
    run = [*RUN, "async_rollout.enabled=true", "async_rollout.max_staleness=1"]
    full = tmp_path / "uninterrupted"
    run_experiment(full, *run)
    rows = read_rows(full)
    assert column(rows, "rollout/staleness_max") == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert column(rows, "objective/phase") == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert recorded_versions(full) == [0, 0, 1, 2, 3]
    assert column(rows, "rollout_corr/is_weight_mean")  # stale GRPO batches are corrected (TIS) by default
    killed = tmp_path / "killed"
    kill_after_step(killed, 2, *run)  # step 2's batch (version 1, pre-switch) is in flight in the checkpoint
    state = torch.load(killed / "checkpoints" / "step000002.ckpt", weights_only=True)["AsyncRolloutDataModule"]
    assert [[a["version"] for a in rank] for rank in state["in_flight"]] == [[1]]
    shutil.copytree(killed, tmp_path / "smaller-k")
    run_experiment(killed, *run, "ckpt_path=auto")
    assert metrics(killed) == metrics(full)
    assert weights(killed) == weights(full)
    smaller = tmp_path / "smaller-k"
    run_experiment(smaller, *run, "ckpt_path=auto", "async_rollout.max_staleness=0")
    after = [r for r in read_rows(smaller) if r.get("rollout/staleness_max") and int(r["step"]) >= 2]
    assert [float(r["rollout/staleness_max"]) for r in after] == [0.0, 0.0, 0.0]
    assert float(after[0]["rollout/stale_regenerated"]) == 1.0


@pytest.mark.slow
def test_ddp_two_processes_with_k1_each_rank_its_own_worker_and_resume_exactly(tmp_path):
    """2 DDP processes, each with its own worker: the schedule of 1 process (staleness, versions), each rank
    its own slice of the global batch; a kill with both ranks' batches in flight resumes bit-exact."""
    run = ["trainer=ddp", *RUN, "trainer.max_steps=3", "objective.switch_step=1", "eval_before_training=false",
           "async_rollout.enabled=true"]  # fmt: skip
    full = tmp_path / "ddp"
    run_experiment(full, *run, timeout=500)
    rows = read_rows(full)
    assert column(rows, "rollout/staleness_max") == [0.0, 1.0, 1.0]
    assert column(rows, "objective/phase") == [0.0, 1.0, 1.0]
    assert recorded_versions(full, 0) == recorded_versions(full, 1) == [0, 0, 1]
    for step in range(3):
        ranks = [pq.read_table(full / "rollouts" / f"step{step:06d}-rank{r}.parquet") for r in (0, 1)]
        assert ranks[0]["seeds"].to_pylist() != ranks[1]["seeds"].to_pylist()
    killed = tmp_path / "killed"
    kill_after_step(killed, 1, *run)
    state = torch.load(killed / "checkpoints" / "step000001.ckpt", weights_only=True)["AsyncRolloutDataModule"]
    assert [[a["version"] for a in rank] for rank in state["in_flight"]] == [[0], [0]]  # both ranks', gathered
    run_experiment(killed, *run, "ckpt_path=auto", timeout=500)
    assert metrics(killed) == metrics(full)
    assert weights(killed) == weights(full)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.dynamic_sampling=true", r"^async_rollout.enabled=true with data.dynamic_sampling=true: asynchronous"),
        ("trainer=fsdp", r"^async_rollout.enabled=true with trainer.strategy=ModelParallelStrategy: "),
        ("model.lora.r=4", r"^async_rollout.enabled=true with model.lora.r=4: "),
        ("module.mini_batches=2", r"^async_rollout.max_staleness=1 is not a multiple of module.ppo_epochs x module"),
        ("async_rollout.max_staleness=-1", r"^async_rollout.max_staleness=-1: must be >= 0$"),
    ],
)
def test_unsupported_combinations_are_refused_in_one_line(override, message, tiny_model_dir):
    cfg = compose_cfg("async_rollout.enabled=true", override, model_dir=tiny_model_dir)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
