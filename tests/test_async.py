"""Asynchronous rollouts (`async_rollout`): the worker process, the schedule, the exact DSRL switch, the exact
resume from in-flight batches, 1 process and 2 DDP processes, and the one-line refusals."""

from __future__ import annotations

import json
import os
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


@pytest.mark.slow
def test_fsdp2_two_processes_k0_is_the_synchronous_fsdp2_run_and_k1_switches_dsrl_exactly(tmp_path):
    """FSDP2 on 2 gloo processes: each rank's worker gets the full weights all-gathered from the shards after
    every optimizer step. k = 0 trains the synchronous FSDP2 run's weights bit for bit (the same prompts,
    seeds and full weights; the worker samples from a plain copy what the sharded policy samples in the
    trainer); k = 1 keeps the global batch and switches DSRL at step 1 exactly."""
    # 120 new tokens: the toy answers in full, rewards vary, every step trains
    run = ["trainer=fsdp", *RUN, "trainer.max_steps=3", "objective.switch_step=1", "eval_before_training=false",
           "callbacks.checkpoint.every_n_train_steps=3", "data.sampling.max_new_tokens=120"]  # fmt: skip
    sync, through, stale = tmp_path / "sync", tmp_path / "async0", tmp_path / "async1"
    run_experiment(sync, *run, timeout=500)
    run_experiment(through, *run, "async_rollout.enabled=true", "async_rollout.max_staleness=0", timeout=500)
    assert weights(through) == weights(sync)
    plain = [{k: v for k, v in r.items() if not k.startswith(ASYNC_COLUMNS)} for r in metrics(through)]
    assert plain == metrics(sync)
    run_experiment(stale, *run, "async_rollout.enabled=true", "async_rollout.max_staleness=1", timeout=500)
    assert all(g > 0 for g in column(read_rows(through), "train/grad_norm"))
    rows = read_rows(stale)
    assert column(rows, "rollout/staleness_max") == [0.0, 1.0, 1.0]
    assert column(rows, "objective/phase") == [0.0, 1.0, 1.0]
    assert 1.0 not in column(rows, "rollout_corr/is_weight_mean")  # stale: engine and trainer log-probs differ
    assert recorded_versions(stale, 0) == recorded_versions(stale, 1) == [0, 0, 1]
    for step in range(3):  # each rank its own half of the global batch
        ranks = [pq.read_table(stale / "rollouts" / f"step{step:06d}-rank{r}.parquet") for r in (0, 1)]
        assert len(ranks[0]) == len(ranks[1]) == 2 * 4
        assert ranks[0]["seeds"].to_pylist() != ranks[1]["seeds"].to_pylist()
    assert weights(stale) != weights(through)


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.dynamic_sampling=true", r"^async_rollout.enabled=true with data.dynamic_sampling=true: extra rounds"),
        ("trainer=deepspeed_zero2", r"^async_rollout.enabled=true with trainer.strategy=DeepSpeedStrategy: untested "),
        (
            "trainer=ddp trainer.strategy=fsdp",
            r"^async_rollout.enabled=true with trainer.strategy=fsdp: supported: auto, ",
        ),
        ("async_rollout.placement=disaggregated", r"^async_rollout.placement=disaggregated on CPU: engine devices are"),
        ("async_rollout.engine_devices=[1]", r"^async_rollout.engine_devices=\[1\] with async_rollout.placement=colo"),
        ("trainer=gpu async_rollout.placement=disaggregated", r"^async_rollout.engine_devices=None with async_rollo"),
        (
            "trainer=gpu trainer.devices=2 async_rollout.placement=disaggregated async_rollout.engine_devices=[1,2]",
            r"^async_rollout.engine_devices=\[1, 2\] overlaps the trainer's GPUs \[0, 1\]: disaggregated",
        ),
        (
            "trainer=gpu trainer.devices=4 async_rollout.placement=disaggregated async_rollout.engine_devices=[4,5,6]",
            r"^async_rollout.engine_devices=\[4, 5, 6\]: 3 engine GPUs do not divide the 4 ranks of a node",
        ),
        ("model.lora.r=4", r"^async_rollout.enabled=true with model.lora.r=4: "),
        ("module.mini_batches=2", r"^async_rollout.max_staleness=1 is not a multiple of module.ppo_epochs x module"),
        ("async_rollout.max_staleness=-1", r"^async_rollout.max_staleness=-1: must be >= 0$"),
    ],
)
def test_unsupported_combinations_are_refused_in_one_line(override, message, tiny_model_dir):
    cfg = compose_cfg("async_rollout.enabled=true", *override.split(), model_dir=tiny_model_dir)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_gpu_runs_with_one_gpu_per_worker_validate(tiny_model_dir):
    """The lifted refusals: async on GPUs, colocated (DDP or FSDP2) or disaggregated on GPUs of its own."""
    for overrides in (
        ["trainer=gpu"],
        ["trainer=fsdp", "trainer.accelerator=gpu", "trainer.devices=2", "rollout=vllm"],
        ["trainer=gpu", "trainer.devices=4", "async_rollout.placement=disaggregated",
         "async_rollout.engine_devices=[4,5]"],
    ):  # fmt: skip
        validate_config(compose_cfg("async_rollout.enabled=true", *overrides, model_dir=tiny_model_dir))


def test_each_ranks_worker_gets_one_gpu_for_1_2_and_8_ranks():
    """`gpu_placement`: the CUDA_VISIBLE_DEVICES each local rank's worker starts with, a lone process's
    RANK / LOCAL_RANK / WORLD_SIZE (vLLM's uni-process executor then runs on its one visible GPU), and vLLM
    sleep mode for colocated engines only. Indices are into the trainer's visible GPUs, as vLLM's device_ids."""
    from lightning_prerl.rollout.worker import gpu_placement

    def devices(placement, world, engines=None, visible=None, trainer=None):
        trainer = trainer or list(range(world))
        return [
            gpu_placement(placement, r, world, trainer[r], engines, visible, 16).env["CUDA_VISIBLE_DEVICES"]
            for r in range(world)
        ]

    assert devices("colocated", 1) == ["0"]
    assert devices("colocated", 2) == ["0", "1"]
    assert devices("colocated", 8) == [str(r) for r in range(8)]
    assert devices("colocated", 2, visible="4,6") == ["4", "6"]
    assert devices("colocated", 2, trainer=[2, 3]) == ["2", "3"]  # trainer.devices=[2,3]
    assert devices("disaggregated", 1, [1]) == ["1"]
    assert devices("disaggregated", 2, [2, 3]) == ["2", "3"]
    assert devices("disaggregated", 2, [2, 3], visible="4,5,6,7") == ["6", "7"]
    assert devices("disaggregated", 8, [8, 9, 10, 11]) == ["8", "8", "9", "9", "10", "10", "11", "11"]
    assert devices("disaggregated", 8, [8]) == ["8"] * 8
    colocated, apart = gpu_placement("colocated", 0, 1, 0), gpu_placement("disaggregated", 0, 1, 0, [1])
    assert colocated.sleep and not apart.sleep
    assert colocated.device == apart.device == "cuda"
    assert {k: apart.env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")} == {"RANK": "0", "LOCAL_RANK": "0",
                                                                               "WORLD_SIZE": "1"}  # fmt: skip
    with pytest.raises(ValueError, match=r"^async_rollout.engine_devices=\[9\]: device 9 is not visible \(8 GPUs\)$"):
        gpu_placement("disaggregated", 0, 1, 0, [9], None, 8)


class RecordingEngine:
    """Stands in for a rollout engine in the worker process: writes the arguments and environment it is
    built with to `record` (the GPU facts a CPU run can check)."""

    def __init__(self, tokenizer, record: str, sleep_between_rollouts: bool = False):
        keys = ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
        seen = {"env": {k: os.environ.get(k) for k in keys}, "sleep_between_rollouts": sleep_between_rollouts}
        with open(record, "w") as fh:
            json.dump(seen, fh)
        self.stop_token_ids = [tokenizer.eos_token_id]

    def close(self) -> None:
        pass


def test_the_worker_starts_its_engine_with_the_placements_environment(policy, tokenizer, tmp_path, monkeypatch):
    """A `Placement` reaches the worker process: its CUDA_VISIBLE_DEVICES and lone-process ranks, its thread
    count, and sleep_between_rollouts=true for a colocated engine that has the option (the transformers
    engine has none and gets nothing); the trainer's own environment is left as it was."""
    from functools import partial

    from lightning_prerl.rollout.worker import Placement, RolloutWorker

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    monkeypatch.setenv("RANK", "1")
    before = dict(os.environ)
    record = tmp_path / "engine.json"
    env = {"CUDA_VISIBLE_DEVICES": "3", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
    worker = RolloutWorker(
        partial(RecordingEngine, record=str(record)), tokenizer, policy, 1, Placement(env, "cpu", True)
    )
    try:
        assert worker.where == "cpu, CUDA_VISIBLE_DEVICES=3"
    finally:
        worker.close()
    assert dict(os.environ) == before
    seen = json.loads(record.read_text())
    assert seen == {"env": {**env, "OMP_NUM_THREADS": "1"}, "sleep_between_rollouts": True}
    hf = RolloutWorker(partial(HFEngine), tokenizer, policy, 1, Placement(env, "cpu", True))
    hf.close()
    assert "sleep_between_rollouts" not in hf.engine_factory.keywords
