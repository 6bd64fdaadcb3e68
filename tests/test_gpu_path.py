"""The GPU path's library facts, checked on the CPU (issue 22): what Lightning's precision plugins and
DeepSpeed strategy do with this project's batches and loaders, and how the vLLM engine is placed.

Each test calls the library's own code (the plugin's `convert_input`, the strategy's config code, a
recording stand-in for `vllm.LLM`) and names the defect it catches.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_policy import make_batch, quiet_cpu_trainer

from lightning_prerl.data.batch import RolloutBatch, keep_rollout_dtypes


def _full_batch(tokenizer) -> RolloutBatch:
    """A rollout batch with every optional tensor set: float32 bookkeeping, bool and integer masks."""
    b = make_batch(tokenizer)
    n, t = b.response_ids.shape
    torch.manual_seed(0)
    logp = -10 * torch.rand(n, t)  # (N, T) log-probs around -10: where bf16 loses ~0.02 nats
    return dataclasses.replace(
        b,
        sample_mask=torch.ones(n, dtype=torch.bool),
        rollout_logprobs=logp,
        advantages=torch.randn(n),
        loss_mask=b.response_mask.float(),
        is_weights=torch.rand(n, t) + 0.5,
        old_logprobs=logp - 1e-3,
    )


def _plugins():
    from lightning.pytorch.plugins.precision import (
        DeepSpeedPrecision,
        DoublePrecision,
        FSDPPrecision,
        HalfPrecision,
        MixedPrecision,
        Precision,
    )

    return {
        "32-true": Precision(),
        "bf16-mixed": MixedPrecision("bf16-mixed", "cpu"),
        "bf16-true": HalfPrecision("bf16-true"),
        "64-true": DoublePrecision(),
        "deepspeed-bf16-mixed": DeepSpeedPrecision("bf16-mixed"),
        "deepspeed-16-mixed": DeepSpeedPrecision("16-mixed"),
        "fsdp-bf16-true": FSDPPrecision("bf16-true"),
        "fsdp-bf16-mixed": FSDPPrecision("bf16-mixed"),
    }


def test_no_precision_plugin_changes_a_rollout_batch(tokenizer):
    """Lightning runs `precision_plugin.convert_input` on every batch; DeepSpeedPrecision casts every
    floating tensor into dataclasses (plugins/precision/deepspeed.py `convert_input`), at bf16-mixed too.
    After `keep_rollout_dtypes` (PolicyModule.setup) every plugin hands the batch back as it was, and
    still casts other inputs. Catches: the setup call removed, the exemption dropped, or the marker that
    makes a second call a no-op lost (found by `make mutation`)."""
    batch = _full_batch(tokenizer)
    tensors = {
        f.name: getattr(batch, f.name)
        for f in dataclasses.fields(batch)
        if isinstance(getattr(batch, f.name), torch.Tensor)
    }
    casting = set()
    for name, plugin in _plugins().items():
        converted = plugin.convert_input(batch)
        if any(getattr(converted, k).dtype != v.dtype for k, v in tensors.items()):
            casting.add(name)
        keep_rollout_dtypes(plugin)
        wrapped = plugin.convert_input
        keep_rollout_dtypes(plugin)  # setup runs for validate and for fit: wrapping twice is a no-op
        assert plugin.convert_input is wrapped  # not a wrapper around the wrapper (one per setup call)
        kept = plugin.convert_input(batch)
        for key, value in tensors.items():
            assert getattr(kept, key) is value, (name, key)
        other = plugin.convert_input({"x": torch.ones(2)})["x"]
        assert (other.dtype != torch.float32) == (name in casting), name
    # the library facts that make this matter (a Lightning that stops casting makes the exemption moot)
    assert {"deepspeed-bf16-mixed", "deepspeed-16-mixed", "bf16-true", "64-true", "fsdp-bf16-true"} <= casting
    assert "bf16-mixed" not in casting and "32-true" not in casting


def test_the_step_sees_the_batch_as_the_data_module_made_it(tiny_model_dir):
    """A real CPU fit under a plugin that casts inputs as DeepSpeed's does (bf16): the training step and
    the callbacks receive float32 rewards, log-probs and advantages. Catches `keep_rollout_dtypes`
    removed from `PolicyModule.setup`."""
    import lightning as L
    from lightning.pytorch.plugins.precision import DeepSpeedPrecision, Precision

    from lightning_prerl.data.prompts import toy_prompts
    from lightning_prerl.data.rewards import BoxedExactMatch
    from lightning_prerl.rollout.hf import HFEngine
    from lightning_prerl.training.datamodule import RolloutDataModule
    from lightning_prerl.training.policy import CondRL

    class CastsLikeDeepSpeed(Precision):  # DeepSpeedPrecision needs CUDA to run a fit; its casting does not
        convert_input = DeepSpeedPrecision("bf16-mixed").convert_input

    seen = []

    class Dtypes(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append({k: v.dtype for k, v in batch.tensors_at(slice(None)).items()})

    module = CondRL(model_path=str(tiny_model_dir))
    prompts = toy_prompts("train", 8)
    dm = RolloutDataModule(module.tokenizer, HFEngine, BoxedExactMatch(), prompts, None, 2, 2, {"max_new_tokens": 8})
    trainer = quiet_cpu_trainer(plugins=[CastsLikeDeepSpeed()], callbacks=[Dtypes()], max_steps=1)
    trainer.fit(module, datamodule=dm)
    assert len(seen) == 1 and seen[0]["rewards"] == torch.float32
    assert all(dtype != torch.bfloat16 for dtype in seen[0].values()), seen


@pytest.mark.parametrize("option", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_config_builds_with_the_rollout_loader(option, tokenizer):
    """The strategy of `trainer=deepspeed_zero2|3`, as the YAML builds it, formats its config against the
    project's real data module: the rollout loader has batch_size=None, so no batch sampler, and
    Lightning's `_auto_select_batch_size` (strategies/deepspeed.py) reads `batch_sampler.batch_size`
    unless `logging_batch_size_per_gpu` is set. Catches that key removed from the YAML (AttributeError
    before the first validation on any GPU)."""
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import open_dict
    from test_config import compose_cfg

    from lightning_prerl.data.prompts import toy_prompts
    from lightning_prerl.data.rewards import BoxedExactMatch
    from lightning_prerl.rollout.hf import HFEngine
    from lightning_prerl.training.datamodule import RolloutDataModule

    def formatted(strategy_cfg) -> dict:
        strategy = instantiate(strategy_cfg)
        trainer, module = L.Trainer(accelerator="cpu", logger=False), L.LightningModule()
        dm = RolloutDataModule(tokenizer, HFEngine, BoxedExactMatch(), toy_prompts("train", 8), None, 2, 2)
        trainer._data_connector.attach_data(module, datamodule=dm)  # as Trainer.fit does
        module.trainer, strategy._lightning_module = trainer, module  # as the strategy's connect does
        strategy._init_config_if_needed()  # zero.py calls this in configure_model, Lightning in setup
        return strategy.config

    cfg = compose_cfg(f"trainer={option}").trainer.strategy
    config = formatted(cfg)
    assert config["train_micro_batch_size_per_gpu"] == 1
    assert config["zero_optimization"]["stage"] == int(option[-1])
    with open_dict(cfg):
        del cfg["logging_batch_size_per_gpu"]
    with pytest.raises(AttributeError, match="batch_size"):  # the library fact behind the key
        formatted(cfg)


@pytest.mark.slow
def test_gpu_install_resolves_in_one_pass_with_one_torch(tmp_path):
    """`make setup GPU=1` = one pip call through constraints-gpu.txt. pip's resolver (--dry-run: package
    metadata only, ~20 s) must find every pin on the index and pick the torch vLLM pins, with nothing
    installed twice. Catches a pin the index no longer serves (vllm 0.34.0's flashinfer-python==0.7.3
    is why 0.33.0 is pinned) and a pin that contradicts vLLM's own."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q", "--report", str(report)]
    cmd += ["-c", "constraints-gpu.txt", ".[dev,vllm,deepspeed]"]
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    versions = {}
    for item in json.loads(report.read_text())["install"]:
        name = item["metadata"]["name"].lower()
        assert name not in versions, f"{name} resolved twice"
        versions[name] = item["metadata"]["version"]
    lines = (root / "constraints-gpu.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    for name, version in pins.items():
        assert versions.get(name.lower()) == version, (name, versions.get(name.lower()), version)


def test_gpu_check_plan_fits_ten_minutes_and_its_runs_validate(tmp_path):
    """`gpu/check.py --dry-run` (no GPU): every run stage's overrides compose and pass the config checks,
    the memory probe's arguments parse, the stage budgets add up to at most 600 s, and the carried wheels
    are the versions `make setup` installs here (one source of truth). Catches a renamed key in a stage,
    a budget over the limit, and a wheel pin left behind by an upgrade."""
    import json
    import subprocess
    import sys
    from importlib.metadata import version
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "gpu/check.py", "--dry-run", "--out", str(tmp_path)], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["budget_s"] <= 600
    assert {name for name, _ in plan["wheels"]} >= {"hydra-core", "omegaconf", "pydantic", "math-verify", "deepspeed"}
    for name, pinned in plan["wheels"]:
        assert version(name) == pinned, (name, version(name), pinned)
    for stage in ("setup", "model", "tests", "fsdp", "resume", "zero3", "memory"):
        assert stage in done.stdout


class _RecordingLLM:
    """Stands in for `vllm.LLM`: records its arguments, the environment it is built in, and calls."""

    def __init__(self, **kwargs):
        import os

        self.kwargs = kwargs
        self.env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
        self.calls = []

    def wake_up(self):
        self.calls.append("wake_up")

    def sleep(self, level):
        self.calls.append(f"sleep({level})")


def _placement_worker(rank: int, port: int, out: str) -> None:
    """One rank as Lightning's launcher leaves it: MASTER_*, NODE_RANK, LOCAL_RANK, WORLD_SIZE set (no
    RANK: launchers/subprocess_script.py), the process group initialised, on a machine that has CUDA."""
    import os
    import sys
    import types

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank))
    os.environ.update(WORLD_SIZE="2")
    os.environ.pop("RANK", None)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        sys.modules["vllm"] = types.SimpleNamespace(LLM=_RecordingLLM)
        torch.cuda.is_available = lambda: True  # the placement decision; nothing here touches a GPU
        from lightning_prerl.rollout.vllm import VLLMEngine
        from lightning_prerl.scale.models import load_tokenizer

        engine = VLLMEngine(load_tokenizer("toy"), "toy")
        torch.save({"kwargs": engine.llm.kwargs, "env": engine.llm.env}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_every_ranks_vllm_engine_is_placed_on_its_own_gpu(tmp_path):
    """2 ranks as Lightning starts them, each building its colocated engine with a recording stand-in for
    `vllm.LLM`: the external launcher with this rank's RANK / LOCAL_RANK / WORLD_SIZE. Without it vLLM's
    uni-process executor takes local rank 0 from the device name "cuda" (uniproc_executor.py
    `_distributed_args`) and every engine lands on GPU 0. Catches the placement arguments removed, and a
    RANK left unset (Lightning does not set it; the external launcher reads it)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "llm")
    mp.spawn(_placement_worker, args=(port, out), nprocs=2, join=True)
    for rank in (0, 1):
        seen = torch.load(f"{out}.{rank}", weights_only=False)
        assert seen["kwargs"]["distributed_executor_backend"] == "external_launcher"
        assert seen["kwargs"]["tensor_parallel_size"] == 1
        assert seen["env"] == {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}


def test_sleeping_engine_frees_torchs_cache_before_it_wakes(monkeypatch):
    """`sleep_between_rollouts`: the training step's freed memory sits in torch's caching allocator;
    `torch.cuda.empty_cache()` must run before `LLM.wake_up` maps vLLM's pool back. Catches the call
    removed or moved after the wake-up."""
    from lightning_prerl.rollout.vllm import VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)  # the sleep/wake logic only: no engine is built
    engine.llm, engine.sleep_between_rollouts, engine._asleep = _RecordingLLM(), True, False
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: engine.llm.calls.append("empty_cache"))
    engine.sleep()
    engine._wake()
    engine._wake()  # awake: nothing more
    assert engine.llm.calls == ["sleep(1)", "empty_cache", "wake_up"]


ZERO3_HOOKS = """
import os, socket, torch, torch.distributed as dist
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
count = lambda: sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
counts = [count()]
deepspeed.initialize(model=model, config=config)  # what Trainer.validate builds (no optimizer)
counts.append(count())
deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=config)  # Trainer.fit
counts.append(count())
print("HOOKS", *counts)
"""


@pytest.mark.slow
def test_zero3_engines_built_one_after_the_other_stack_their_hooks():
    """Why `eval_before_training` must not call `Trainer.validate` before `fit` under ZeRO-3: Lightning's
    inference engine (`_initialize_deepspeed_inference`, `deepspeed.initialize` without an optimizer) and
    the training engine each register DeepSpeed's parameter hooks on every module, and nothing removes
    the first set (raw DeepSpeed ZeRO-3 on CPU, one gloo rank, ~4 s). The project's side is pinned by
    tests/test_run.py (the default run evaluates at step 0 inside fit)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", ZERO3_HOOKS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before, inference, training = map(int, done.stdout.split("HOOKS")[1].split())
    assert before == 0 and inference > 0 and training == 2 * inference
