"""A callback the DDP end-to-end test adds to the real script (`+callbacks.probe._target_=rank_probe.RankProbe`,
tests/ on PYTHONPATH): each rank writes what it trained on and a digest of its final weights."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L


class RankProbe(L.Callback):
    def __init__(self, out_dir: str):
        self.out_dir, self.prompts = Path(out_dir), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.prompts.append(batch.prompt_ids[:: batch.group_size].tolist())  # one row per prompt

    def on_fit_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for _, p in sorted(pl_module.policy.state_dict().items()):
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        record = {"rank": trainer.global_rank, "prompts": self.prompts, "weights": digest.hexdigest()}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
