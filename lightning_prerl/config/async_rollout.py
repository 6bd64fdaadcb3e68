"""`async_rollout`: the config of asynchronous rollouts (`training/async_rollouts.py`), its refusals and
what it changes in the module and the engine.

Supported: one process, DDP or FSDP2 (`trainer=fsdp`: each rank's worker receives the full weights,
all-gathered from the shards after each optimizer step), with either engine, without LoRA; on CPU, or
on GPUs with one GPU per worker (`placement`: colocated on the rank's GPU, or disaggregated on
`engine_devices`). Everything else is refused in one line before any compute.
"""

from __future__ import annotations

from typing import Literal

from omegaconf import DictConfig, ListConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field

from lightning_prerl.errors import ConfigError


class AsyncRollout(BaseModel):
    """A worker process generates the next rollout batches while the policy trains (`async_rollout`)."""

    model_config = ConfigDict(extra="allow", use_attribute_docstrings=True)  # as schema.py's nodes

    enabled: bool = False
    """Generate in a worker process, ahead of training; false: in the trainer, between steps."""
    max_staleness: int = Field(default=1, ge=0)
    """k: optimizer steps by which a batch's generating weights may lag the step that trains on it (0: the
    synchronous schedule, through the worker; a multiple of module.ppo_epochs x module.mini_batches)."""
    worker_threads: int | None = Field(default=None, ge=1)
    """torch threads of the worker process; null: the trainer's."""
    placement: Literal["colocated", "disaggregated"] = "colocated"
    """GPU runs: where each rank's worker generates, one GPU per worker. colocated: on the rank's own GPU,
    a vLLM engine sleeping between generations (its rollout.gpu_memory_utilization must leave the trainer
    room); disaggregated: on async_rollout.engine_devices, GPUs the trainer does not use. CPU: the worker
    shares the cores (worker_threads)."""
    engine_devices: list[int] | None = None
    """placement=disaggregated: indices of the engines' GPUs among the visible ones (as vLLM's device_ids),
    none of the trainer's; the W ranks of a node share them evenly, rank r's worker on
    engine_devices[r * len // W] (len must divide W). null: colocated."""
    correction: Literal["token", "sequence"] | None = "token"
    """Stale batches (k >= 1): TIS level against the engine's log-probs when module.rollout_correction sets
    neither tis nor mask (cap: its tis_cap; PreRL phases only with its prerl=true); null: none."""


def async_enabled(cfg: DictConfig) -> bool:
    """Asynchronous rollouts on? (A replay has no engine: never there.)"""
    settings = cfg.get("async_rollout")
    return bool(settings and settings.enabled and not cfg.get("replay_from"))


def check_async(run, cfg: DictConfig) -> None:
    """One line for a combination asynchronous rollouts do not support."""
    settings = run.async_rollout
    if not async_enabled(cfg):
        return
    updates = run.module.ppo_epochs * run.module.mini_batches
    if settings.max_staleness % updates:
        raise ConfigError(
            f"async_rollout.max_staleness={settings.max_staleness} is not a multiple of module.ppo_epochs x "
            f"module.mini_batches = {updates}: a rollout batch makes {updates} optimizer steps"
        )
    strategy = _strategy(cfg)
    deepspeed = "deepspeed" in strategy.lower()
    refusals = [  # (setting, refused, why)
        ("data.dynamic_sampling=true", run.data.dynamic_sampling,
         "extra rounds depend on the batch's rewards and cannot be generated ahead"),
        (f"model.lora.r={run.model.lora.r}", run.model.lora.r > 0, "LoRA policies are not supported yet"),
        (f"trainer.strategy={strategy}", deepspeed,
         "untested (Lightning's DeepSpeedStrategy refuses CPU, and no GPU has run it); use trainer=fsdp"),
        (f"trainer.strategy={strategy}", not deepspeed and strategy not in SUPPORTED_STRATEGIES,
         f"supported: {', '.join(SUPPORTED_STRATEGIES)}"),
    ]  # fmt: skip
    for setting, refused, why in refusals:
        if refused:
            raise ConfigError(f"async_rollout.enabled=true with {setting}: {why}")
    _check_placement(settings, cfg)


def _check_placement(settings: AsyncRollout, cfg: DictConfig) -> None:
    devices, key = settings.engine_devices, f"async_rollout.engine_devices={settings.engine_devices}"
    if settings.placement == "colocated":
        if devices:
            raise ConfigError(f"{key} with async_rollout.placement=colocated: set placement=disaggregated")
        return
    if not _on_gpu(cfg):
        raise ConfigError("async_rollout.placement=disaggregated on CPU: engine devices are GPUs (colocated on CPU)")
    if not devices or len(set(devices)) != len(devices):
        raise ConfigError(f"{key} with async_rollout.placement=disaggregated: needs distinct GPU indices")
    trainer = cfg.trainer.get("devices")
    trainer = list(range(trainer)) if isinstance(trainer, int) else list(trainer) if _is_list(trainer) else None
    if trainer is not None and set(devices) & set(trainer):
        raise ConfigError(f"{key} overlaps the trainer's GPUs {trainer}: disaggregated engines need their own")
    if trainer is not None and len(trainer) % len(devices):
        raise ConfigError(
            f"{key}: {len(devices)} engine GPUs do not divide the {len(trainer)} ranks of a node (one GPU per "
            f"worker, shared evenly; tensor-parallel engines are not supported)"
        )


def _is_list(value) -> bool:
    return isinstance(value, list | ListConfig)


# one process, DDP, FSDP2 (trainer=fsdp: Lightning's ModelParallelStrategy with data parallelism only)
SUPPORTED_STRATEGIES = ("auto", "single_device", "ddp", "ddp_spawn", "ModelParallelStrategy")


def _strategy(cfg: DictConfig) -> str:
    strategy = cfg.trainer.get("strategy", "auto")
    if isinstance(strategy, DictConfig):
        return str(strategy.get("_target_", "?")).rsplit(".", 1)[-1]
    return str(strategy)


def _on_gpu(cfg: DictConfig) -> bool:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        return True
    import torch

    return accelerator == "auto" and torch.cuda.is_available()


def async_overrides(cfg: DictConfig) -> tuple[dict, dict]:
    """(module keyword arguments, engine keyword arguments) that asynchronous rollouts change: with k >= 1
    and no correction configured, TIS at `async_rollout.correction`'s level, and engine log-probs for it."""
    if not async_enabled(cfg):
        return {}, {}
    settings = cfg.async_rollout
    fix = OmegaConf.to_container(cfg.module.rollout_correction, resolve=True)
    if settings.max_staleness == 0 or settings.correction is None or fix.get("tis") or fix.get("mask"):
        return {}, {}
    return {"rollout_correction": {**fix, "tis": settings.correction}}, {"return_logprobs": True}
