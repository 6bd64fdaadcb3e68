"""From a composed Hydra config to live objects: schedule/objective, module, data module, trainer.

Shared by the entry points (`experiments/run.py`, `experiments/evaluate.py`). Every failure before
compute -- a bad value, a missing file, an unknown option -- becomes one `ConfigError` line.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_prerl.config.async_rollout import async_enabled, async_overrides
from lightning_prerl.config.checks import ConfigError, uses_deepspeed, validate_config
from lightning_prerl.config.replay import replay_config
from lightning_prerl.config.spaces import configured_spaces
from lightning_prerl.objectives.spaces import parts_read
from lightning_prerl.reports.callbacks import ResumableCSVLogger
from lightning_prerl.scale.models import resolve_model_path, stop_token_ids
from lightning_prerl.training.async_rollouts import async_data_module
from lightning_prerl.training.checkpoints import CheckpointError, RunState, check_checkpoint, newest_checkpoint

log = logging.getLogger(__name__)
# loggers that need an optional extra: (class name, import name, extra)
LOGGER_EXTRAS = [("WandbLogger", "wandb", "wandb")]
SECRET_ENV = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


class _DropAdverts(logging.Filter):
    """Drops Lightning's "💡 Tip: ... try installing [litlogger]/[litmodels]" lines (no switch turns them off)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


def route_lightning_logs() -> None:
    """Lightning's log lines printed once, through the handlers Hydra gave the root logger, without adverts.

    `import lightning` attaches a console handler ("INFO: ...") to the `lightning` logger while its
    records still propagate to the root logger, whose Hydra handlers print them a second time (and
    write them to the run's log file). With root handlers in place, Lightning's own handler goes.
    """
    if logging.getLogger().handlers:
        lightning_log = logging.getLogger("lightning")
        for handler in list(lightning_log.handlers):
            lightning_log.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())


def quiet_libraries(cfg: DictConfig) -> None:
    """Silences what libraries print on every run that the user did not ask for, at the source.

    - DeepSpeed guesses its accelerator when imported (accelerate imports it in `save_pretrained`) and
      warns "Setting accelerator to CPU" (deepspeed/accelerator/real_accelerator.py); on a CPU run
      `DS_ACCELERATOR=cpu` is that same choice, made explicitly (a user's own value is kept).
    - Lightning's `utilities/_pytree.py` builds torch's deprecated `LeafSpec` (a FutureWarning from
      torch.utils._pytree) on every fit; nothing in this project can change that call.
    - transformers draws "Loading weights" / "Writing model shards" bars mid-log on every load and export.
    """
    from lightning.fabric.accelerators.cuda import num_cuda_devices  # NVML count: no CUDA context
    from transformers.utils import logging as hf_logging

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator == "cpu" or (accelerator == "auto" and num_cuda_devices() == 0):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    leafspec = r"`isinstance\(treespec, LeafSpec\)` is deprecated"
    warnings.filterwarnings("ignore", message=leafspec, category=FutureWarning)
    hf_logging.disable_progress_bar()


def check_logger_packages(cfg: DictConfig) -> None:
    """One line naming the install command when a configured logger's optional package is missing."""
    for name, node in (cfg.get("logger") or {}).items():
        target = str(node.get("_target_", "")) if node else ""
        for cls, package, extra in LOGGER_EXTRAS:
            if target.endswith(cls) and importlib.util.find_spec(package) is None:
                raise ConfigError(f"logger.{name} ({cls}) needs the {package} package: pip install -e .[{extra}]")


def check_deepspeed(cfg: DictConfig) -> None:
    """One line, before any model loads, when a DeepSpeed trainer cannot start here."""
    if not uses_deepspeed(cfg):
        return
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("trainer strategy DeepSpeed needs the deepspeed package: pip install -e .[deepspeed]")
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "trainer=deepspeed_*: Lightning's DeepSpeedStrategy runs on CUDA GPUs only; on CPU use trainer=ddp "
            "or trainer=fsdp (DeepSpeed itself is tested on CPU by tests/test_zero.py)"
        )


def without_secrets(cfg: DictConfig) -> DictConfig:
    """The resolved config with every value containing a secret-looking environment variable (API keys,
    tokens, passwords, e.g. from `${oc.env:WANDB_API_KEY}`) replaced by "***", for saving to disk."""
    secrets = {v for k, v in os.environ.items() if SECRET_ENV.search(k) and len(v) >= 8}
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def scrub(node):
        if isinstance(node, dict):
            return {k: scrub(v) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return "***" if isinstance(node, str) and any(s in node for s in secrets) else node

    return OmegaConf.create(scrub(resolved))


@dataclass
class Run:
    """What an entry point drives."""

    module: L.LightningModule
    datamodule: L.LightningDataModule
    trainer: L.Trainer
    ckpt_path: str | None = None  # the checkpoint to resume from (`ckpt_path=auto` resolved)


def resolve_checkpoint(cfg: DictConfig) -> tuple[str | None, int]:
    """(checkpoint path, its global step) for `cfg.ckpt_path`, checked before any model is loaded."""
    if cfg.ckpt_path is None:
        return None, 0
    if cfg.ckpt_path == "auto":
        path = newest_checkpoint(Path(cfg.run_dir))
        if path is None:
            log.info("ckpt_path=auto: no complete checkpoint in %s, starting fresh", cfg.run_dir)
            return None, 0
    else:
        path = Path(cfg.ckpt_path)
    objective = OmegaConf.to_container(cfg.objective, resolve=True)
    return str(path), check_checkpoint(path, resolve_model_path(cfg.model.path), objective)


def build_run(cfg: DictConfig) -> Run:
    """Validate `cfg`, then instantiate everything; exits with one line on a config mistake."""
    route_lightning_logs()
    quiet_libraries(cfg)
    try:
        if cfg.get("replay_from"):  # experiments/replay.py: the recorded rollouts instead of an engine
            replay_config(cfg)
        validate_config(cfg)
        check_logger_packages(cfg)
        check_deepspeed(cfg)
        ckpt_path, resume_step = resolve_checkpoint(cfg)
        objective = instantiate(cfg.objective)
        # a schedule (DSRL) is a callback that owns the objective of each phase
        schedule = objective if isinstance(objective, L.Callback) else None
        # objects go in through partials: Hydra would turn a dataclass argument back into a config
        build_module = instantiate(cfg.module, _partial_=True, _convert_="all")
        module_async, engine_async = async_overrides(cfg)  # asynchronous rollouts: stale batches corrected
        module = build_module(objective=getattr(schedule, "initial_objective", objective), **module_async)
        module.evaluate_first = bool(cfg.eval_before_training)  # inside fit, at step 0 (HeldOutEvaluation)
        stops = stop_token_ids(module.tokenizer, cfg.model.path, cfg.model.gguf_file, cfg.model.get("stop_token_ids"))
        engine = instantiate(cfg.rollout, stop_token_ids=stops, **engine_async)
        build_data = instantiate(cfg.data, _partial_=True, _convert_="all")
        parts = parts_read(configured_spaces(cfg))  # the prompt parts the spaces score after, as tokens
        if async_enabled(cfg):
            build_data = async_data_module(build_data, cfg.async_rollout)
        datamodule = build_data(
            tokenizer=module.tokenizer, engine=engine, mini_batches=cfg.module.mini_batches, context_parts=parts
        )
    except (ConfigError, CheckpointError, InstantiationException, ValueError, FileNotFoundError) as exc:
        sys.exit(f"config error: {' '.join(str(exc).split())}")

    # post-step checkpoints are what we want; one rollout batch per epoch is what we mean
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
    L.seed_everything(cfg.seed, workers=True)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(without_secrets(cfg), Path(cfg.run_dir) / "config.yaml")
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c] + ([schedule] if schedule else [])
    callbacks.append(RunState(OmegaConf.to_container(cfg.objective, resolve=True)))
    loggers = [instantiate(lg) for lg in cfg.logger.values() if lg]
    for lg in loggers:
        if ckpt_path is not None and isinstance(lg, ResumableCSVLogger):
            lg.resume_from(resume_step)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return Run(module, datamodule, trainer, ckpt_path)
