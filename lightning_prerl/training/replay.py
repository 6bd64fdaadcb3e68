"""ReplayDataModule: the recorded rollouts of a run (`record.py`) served again, with no rollout engine.

A `RolloutDataModule` whose training batch of step k is read from the record instead of generated:
everything after the batch (the update, the objective, DSRL's switch, checkpoints, logs) is the same
code path as the recorded run, so the same config on the same world size ends on bit-identical weights,
and another objective trains on the identical rollouts (a controlled comparison). Held-out evaluation
needs generation, so it is off; nothing here can build an engine. `experiments/replay.py` composes the
recorded run's config with the overrides and checks the record before any compute.
"""

from __future__ import annotations

import time
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from lightning_prerl.data.batch import RolloutBatch
from lightning_prerl.training.datamodule import RolloutDataModule
from lightning_prerl.training.record import read_batch, read_manifest


class ReplayDataModule(RolloutDataModule):
    """Serves the recorded batch of step k at step k.

    Args:
        record_dir: the record (`<run dir>/rollouts`).
        **kwargs: `RolloutDataModule`'s arguments (the recorded run's data config); the engine is never
            built, held-out prompts are dropped (no evaluation) and recording is off.
    """

    def __init__(self, record_dir: str, **kwargs):
        super().__init__(**{**kwargs, "eval_prompts": None, "record_rollouts": False})
        self.record_dir = Path(record_dir)

    def _get_engine(self):
        raise RuntimeError(f"a replay of {self.record_dir} has no rollout engine: every batch comes from the record")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        manifest = read_manifest(self.record_dir)
        rank_zero_info(
            f"replay of {self.record_dir} ({manifest['prompts_per_step']} prompts x "
            f"{manifest['samples_per_prompt']} samples per step): no rollout engine, held-out evaluation off "
            f"(it needs generation)"
        )

    def train_batch(self, epoch: int) -> RolloutBatch:
        """The recorded batch; the recorded timings (generation, scoring, sync) make way for the read's."""
        t0, (rank, world) = time.perf_counter(), self._rank_world()
        batch = read_batch(self.record_dir, epoch, rank, world)
        batch.stats = {k: v for k, v in batch.stats.items() if not k.startswith("time/")}
        batch.stats["time/replay"] = time.perf_counter() - t0
        return batch
