"""Train a policy with RL on verifiable rewards: compose -> validate -> instantiate -> fit.

    python experiments/run.py                                   # GRPO on the toy world, CPU
    python experiments/run.py objective=dsrl trainer=ddp        # any group option / key override
    python experiments/run.py -m objective.switch_step=10,20    # Hydra multirun sweep

Artefacts in the Hydra run dir: logs/ (CSV + TensorBoard), checkpoints/, policy/ (save_pretrained),
report.png, config.yaml (resolved) and .hydra/ (composed config and overrides).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    import lightning as L
    import torch
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from lightning_prerl.config import ConfigError, validate_config

    try:
        validate_config(cfg)
        objective = instantiate(cfg.objective)
        # a schedule (DSRL) is a callback that owns the objective of each phase
        schedule = objective if isinstance(objective, L.Callback) else None
        # objects go in through partials: Hydra would turn a dataclass argument back into a config
        build_module = instantiate(cfg.module, _partial_=True, _convert_="all")
        module = build_module(objective=getattr(schedule, "initial_objective", objective))
        build_data = instantiate(cfg.data, _partial_=True, _convert_="all")
        datamodule = build_data(tokenizer=module.tokenizer, engine=instantiate(cfg.rollout))
    except (ConfigError, InstantiationException, ValueError, FileNotFoundError) as exc:
        sys.exit(f"config error: {' '.join(str(exc).split())}")

    # post-step checkpoints are what we want; one rollout batch per epoch is what we mean
    warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined.*")
    L.seed_everything(cfg.seed, workers=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, Path(cfg.run_dir) / "config.yaml", resolve=True)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c] + ([schedule] if schedule else [])
    loggers = [instantiate(lg) for lg in cfg.logger.values() if lg]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    if cfg.eval_before_training and cfg.ckpt_path is None:
        trainer.validate(module, datamodule=datamodule)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    accuracy = trainer.callback_metrics.get("val/accuracy")
    return None if accuracy is None else float(accuracy)


if __name__ == "__main__":
    from lightning_prerl.config import ConfigError, check_group_choices

    try:
        check_group_choices(sys.argv[1:], Path(__file__).resolve().parents[1] / "conf")
    except ConfigError as exc:
        sys.exit(f"config error: {exc}")
    main()
