"""A callback the DDP end-to-end test adds to the real script (`+callbacks.probe._target_=rank_probe.RankProbe`,
tests/ on PYTHONPATH): each rank writes what it trained on and a digest of its final weights. With
`oom_rank` / `oom_step`, that rank's policy forward raises `torch.OutOfMemoryError` once in that step."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch


class RankProbe(L.Callback):
    def __init__(self, out_dir: str, oom_rank: int | None = None, oom_step: int | None = None):
        self.out_dir, self.prompts = Path(out_dir), []
        self.oom_at = (oom_rank, oom_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.prompts.append(batch.prompt_ids[:: batch.group_size].tolist())  # one row per prompt
        if self.oom_at == (trainer.global_rank, trainer.global_step):
            policy = pl_module.policy
            clean = policy.forward

            def fail_once(*args, **kwargs):
                policy.forward = clean
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

            policy.forward = fail_once

    def on_fit_end(self, trainer, pl_module) -> None:
        digest = hashlib.sha256()
        for _, p in sorted(pl_module.policy.state_dict().items()):
            digest.update(p.detach().cpu().contiguous().numpy().tobytes())
        record = {"rank": trainer.global_rank, "prompts": self.prompts, "weights": digest.hexdigest()}
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
