"""Checks on the composed Hydra config, run before anything is loaded or computed.

Each failure is one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightning_prerl.models import resolve_model_path

GROUP_ADVANTAGES = ("grpo", "group_mean")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(ValueError):
    """A composed config that cannot run."""


def _devices(cpu_processes: int) -> int:
    """Every visible GPU when CUDA is present, else `cpu_processes` CPU processes."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else int(cpu_processes)


def _precision(dtype: str, param_dtype: str) -> str:
    """Lightning's precision for (compute dtype, parameter dtype): bf16 compute over float32 weights is
    bf16-mixed (autocast); equal dtypes need no autocast (the weights are loaded in that dtype)."""
    if dtype == "float16":
        raise ConfigError(
            "model.dtype=float16: fp16 compute needs loss scaling, which this manual-optimization loop does "
            "not do; use bfloat16"
        )
    return "bf16-mixed" if dtype == "bfloat16" and param_dtype != "bfloat16" else "32-true"


# `${lp.devices:2}`, `${lp.mul:a,b}`, `${lp.precision:dtype,param_dtype}` in conf/trainer/*.yaml
for _name, _fn in (("lp.devices", _devices), ("lp.mul", lambda a, b: int(a) * int(b)), ("lp.precision", _precision)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def _world_size(trainer: DictConfig) -> int | None:
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    return devices * nodes if isinstance(devices, int) else None


def _objectives(node: DictConfig) -> list[DictConfig]:
    """The loss configs inside an objective node (one, or the phases of a schedule)."""
    if "space" in node:
        return [node]
    return [v for v in node.values() if isinstance(v, DictConfig) and "space" in v]


def validate_config(cfg: DictConfig) -> None:
    """Raises ConfigError on the first value that cannot work."""
    data = cfg.data
    g = data.samples_per_prompt
    if g < 1:
        raise ConfigError(f"data.samples_per_prompt={g}: must be >= 1")
    for key in ("prompts_per_step", "eval_samples"):
        if data[key] < 1:
            raise ConfigError(f"data.{key}={data[key]}: must be >= 1")
    for obj in _objectives(cfg.objective):
        if g == 1 and obj.advantage in GROUP_ADVANTAGES:
            raise ConfigError(
                f"data.samples_per_prompt=1 with objective advantage '{obj.advantage}': group advantages "
                f"need >= 2 samples per prompt (or use objective advantage 'signed')"
            )
    for k in cfg.module.pass_k:
        if k > data.eval_samples:
            raise ConfigError(
                f"module.pass_k contains {k} > data.eval_samples={data.eval_samples}: "
                f"pass@k needs at least k samples per prompt"
            )
    _precision(cfg.model.dtype, cfg.model.get("param_dtype", "float32"))  # raises on a compute dtype we cannot train in
    strategy = cfg.trainer.get("strategy")
    tp = strategy.get("tensor_parallel_size", 1) if isinstance(strategy, DictConfig) else 1
    if tp != 1:
        raise ConfigError(
            f"trainer.strategy.tensor_parallel_size={tp}: only 1 is supported (the loss normaliser and the "
            f"rollout split assume pure data parallelism); shard with FSDP2 over data_parallel_size instead"
        )
    world = _world_size(cfg.trainer)
    if world is not None and data.prompts_per_step % world:
        raise ConfigError(
            f"data.prompts_per_step={data.prompts_per_step} does not divide by the world size {world} "
            f"(trainer.devices x trainer.num_nodes): it is the global number of prompts per step"
        )
    max_steps = cfg.trainer.get("max_steps")
    if max_steps is None or max_steps < 1:
        raise ConfigError(f"trainer.max_steps={max_steps}: must be >= 1")
    budget = data.sampling.max_new_tokens + (data.get("max_prompt_tokens") or 0)
    max_len = cfg.rollout.get("max_model_len")
    if max_len is not None and max_len < budget:
        raise ConfigError(
            f"rollout.max_model_len={max_len} < data.sampling.max_new_tokens + data.max_prompt_tokens = {budget}: "
            f"the engine could not hold a full prompt and completion"
        )
    temperature = data.sampling.temperature
    if temperature < 0:
        raise ConfigError(f"data.sampling.temperature={temperature}: must be >= 0")
    try:
        resolve_model_path(cfg.model.path)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None


def check_group_choices(overrides: list[str], conf_dir: Path) -> None:
    """Reject `group=option` overrides naming an option that does not exist, in one line.

    Hydra would reject them too, but over several lines with its search path; this names the key,
    the value and the allowed options. Sweeps (`objective=grpo,dsrl`) are checked option by option.
    """
    for arg in overrides:
        key, sep, value = arg.partition("=")
        group = conf_dir / key.lstrip("+~")
        if not sep or not group.is_dir() or value in ("null", ""):
            continue
        allowed = sorted(p.stem for p in group.glob("*.yaml"))
        for option in value.split(","):
            if option not in allowed:
                raise ConfigError(f"{key.lstrip('+~')}={option!r} is not an option: choose one of {allowed}")


def check_command_line(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Exit with one line when a `group=option` override names no existing option.

    Runs before Hydra (and before Lightning is imported, so Lightning keeps Hydra's log handlers).
    """
    try:
        check_group_choices(argv, conf_dir)
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
