"""Train from a run's rollout record with no rollout engine: compose -> check the record -> fit.

    python experiments/run.py data.record_rollouts=true hydra.run.dir=runs/a   # record every step's rollouts
    python experiments/replay.py runs/a                          # the same run again: bit-identical weights
    python experiments/replay.py runs/a objective=nsr_prerl      # another objective on the identical rollouts
    python experiments/replay.py runs/a -m objective=grpo,nsr_prerl            # both, as a sweep
    python experiments/replay.py runs/a ckpt_path=runs/a/checkpoints/step000006.ckpt trainer.max_steps=7
                                                                 # step 6 alone, from the weights before it

The config is the recorded run's (its own overrides, `RUN_DIR/.hydra/overrides.yaml`) with these
overrides on top (`lightning_prerl/config/replay.py`); a replay that would change the rollouts, the
model or the world size, or needs steps the record lacks, stops with one line before any compute.
Held-out evaluation needs generation and is off. Artefacts as for `run.py`, in RUN_DIR/replay/<time>/.
"""

from __future__ import annotations

import sys

import hydra
import run  # experiments/run.py, beside this script: the same job (sweeps included) once composed
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    return run.main.__wrapped__(cfg)  # `replay_from` in cfg: build_run serves the record


if __name__ == "__main__":
    from lightning_prerl.config.checks import check_command_line
    from lightning_prerl.config.replay import replay_argv

    sys.argv[1:] = replay_argv(sys.argv[1:])
    check_command_line(sys.argv[1:])
    main()
