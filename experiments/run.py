"""Train a policy with RL on verifiable rewards: compose -> validate the config -> instantiate -> fit.

    python experiments/run.py                                   # DSRL on the toy world, CPU
    python experiments/run.py objective=grpo trainer=ddp        # any group option / key override
    python experiments/run.py -m objective.switch_step=10,20    # Hydra multirun sweep

Artefacts in the Hydra run dir: logs/ (CSV + TensorBoard; logger=wandb adds wandb/), checkpoints/,
policy/ (save_pretrained), report.png, summary.json (also printed at the end), config.yaml (resolved)
and .hydra/ (composed config and overrides).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return train(cfg)
    from lightning_prerl.reports.sweep import record_failure

    try:  # a sweep job that fails is recorded and the sweep goes on (its report lists the failure)
        return train(cfg)
    except (Exception, SystemExit) as exc:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            return None
        record_failure(cfg.run_dir, exc)
        return None


def train(cfg: DictConfig) -> float | None:
    from lightning_prerl.config.compose import build_run
    from lightning_prerl.errors import ConfigError, RunFault

    run = build_run(cfg)  # eval_before_training: the module evaluates at step 0 inside fit
    try:
        run.trainer.fit(run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path, weights_only=True)
    except ConfigError as exc:  # found once the model is loaded (e.g. LoRA target modules): one line
        sys.exit(f"config error: {' '.join(str(exc).split())}")
    except RunFault as exc:  # e.g. out of memory after every retry (training/oom.py): one line
        sys.exit(str(exc))
    if run.module.fault is not None:
        sys.exit(run.module.fault)
    accuracy = run.trainer.callback_metrics.get("val/accuracy")
    return None if accuracy is None else float(accuracy)  # the value Hydra sweepers optimise


if __name__ == "__main__":
    from lightning_prerl.config.checks import check_command_line

    check_command_line(sys.argv[1:])
    main()
