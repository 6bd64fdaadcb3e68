"""`async_rollout`: the config of asynchronous rollouts (`training/async_rollouts.py`), its refusals and
what it changes in the module and the engine.

Supported: one process or DDP, on CPU, with either engine, the policy unsharded and without LoRA.
Everything else is refused in one line before any compute.
"""

from __future__ import annotations

from typing import Literal

from omegaconf import DictConfig, OmegaConf
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
    refusals = {
        "data.dynamic_sampling=true": run.data.dynamic_sampling,
        f"model.lora.r={run.model.lora.r}": run.model.lora.r > 0,
        f"trainer.strategy={_strategy(cfg)}": _strategy(cfg) not in ("auto", "ddp", "ddp_spawn", "single_device"),
        f"trainer.accelerator={cfg.trainer.get('accelerator')}": _on_gpu(cfg),
    }
    for setting, refused in refusals.items():
        if refused:
            raise ConfigError(
                f"async_rollout.enabled=true with {setting}: asynchronous rollouts run on CPU, one process or "
                f"DDP, with an unsharded policy without LoRA and without dynamic sampling"
            )


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
