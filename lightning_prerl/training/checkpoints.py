"""What a checkpoint must hold for a bit-exact resume, and which checkpoint a run may resume from.

- RNG states (Python, NumPy, torch CPU and CUDA) of every rank, stored as plain lists and tensors so
  that checkpoints keep loading with `weights_only=True`. (Sampling does not depend on them: the
  engines are seeded per prompt from the position in the prompt stream; these cover everything else.)
- `ckpt_path=auto`: the newest complete checkpoint of the run directory, or a fresh start.
- A checkpoint is checked before any model is loaded: a truncated file, an incomplete sharded
  directory, a checkpoint of another model (embedding shape) or of another objective config fails in
  one line naming the file and the problem.

Checkpoint files are written atomically by Lightning (`_atomic_save`: an fsspec transaction, i.e. a
temporary file renamed into place); a sharded (FSDP2) directory counts as complete once its `meta.pt`
exists, which rank 0 writes after every shard, a DeepSpeed directory once its `latest` tag file exists
(written after every rank's files).
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import lightning as L
import torch

log = logging.getLogger(__name__)

META = "meta.pt"  # Lightning's file of the non-tensor state in a sharded checkpoint directory
# DeepSpeed: `latest` names the tag folder (Lightning's: "checkpoint"), whose rank-0 module file also holds
# Lightning's state (ZeRO-1/2: mp_rank_00_..., ZeRO-3: zero_pp_rank_0_mp_rank_00_...)
DEEPSPEED_LATEST = "latest"
DEEPSPEED_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


class CheckpointError(ValueError):
    """A checkpoint this run cannot resume from."""


# -- RNG states -----------------------------------------------------------------------------------
def rng_state() -> dict:
    """This process's RNG states in weights-only-loadable types."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, py_gauss = random.getstate()
    return {
        "python": [version, list(state), py_gauss],
        "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    import numpy as np

    version, py_state, py_gauss = state["python"]
    random.setstate((version, tuple(py_state), py_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -- which checkpoint ---------------------------------------------------------------------------------
def _step_of(path: Path) -> int:
    digits = "".join(c for c in path.stem if c.isdigit())
    return int(digits) if digits else -1


def is_complete(path: Path) -> bool:
    """A checkpoint file that loads, or a sharded directory whose final `meta.pt` was written."""
    try:
        _load_head(path)
    except CheckpointError:
        return False
    return True


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint of `run_dir/checkpoints` with the highest step (`last.ckpt` excluded:
    the step files name their step; a half-written file or directory is passed over). Fault
    checkpoints (`fault-step*`, written when non-finite steps stop a run, possibly between two updates
    of one rollout batch) are for inspection and an explicit `ckpt_path`, never picked here."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    regular = (p for p in folder.iterdir() if p.stem != "last" and not p.name.startswith("fault-"))
    candidates = sorted(regular, key=_step_of, reverse=True)
    return next((p for p in candidates if _step_of(p) >= 0 and is_complete(p)), None)


def _load_head(path: Path) -> dict:
    """The checkpoint's non-tensor state (and, for a file, its tensors memory-mapped, not read)."""
    if path.is_dir() and (path / DEEPSPEED_LATEST).is_file():
        tag = path / (path / DEEPSPEED_LATEST).read_text().strip()
        state = next((tag / name for name in DEEPSPEED_STATES if (tag / name).is_file()), None)
        if state is None:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed tag {tag.name} has no rank-0 model state file")
        try:  # DeepSpeed pickles its own objects beside the tensors: not loadable with weights_only
            return torch.load(state, map_location="cpu", weights_only=False, mmap=True)
        except Exception as exc:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed state cannot be read ({type(exc).__name__})") from None
    deepspeed_files = path.is_dir() and any(next(path.glob(f"*/{name}"), None) for name in DEEPSPEED_STATES)
    if deepspeed_files and not (path / META).is_file():
        raise CheckpointError(f"checkpoint {path}: DeepSpeed directory without its latest file (an interrupted save)")
    target = path / META if path.is_dir() else path
    if path.is_dir() and not (path / ".metadata").is_file():
        raise CheckpointError(f"checkpoint {path}: sharded directory without .metadata (an interrupted save)")
    try:
        return torch.load(target, map_location="cpu", weights_only=True, mmap=not path.is_dir())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: no {META} (an interrupted or foreign save)") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"checkpoint {path}: cannot be read ({first}); truncated or not a checkpoint") from None


def check_checkpoint(path: Path, model_dir: Path, objective: dict) -> int:
    """The global step of `path`; fails in one line unless it is a complete checkpoint of this model
    and objective config."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: does not exist")
    head = _load_head(path)
    if not isinstance(head, dict) or "global_step" not in head:
        raise CheckpointError(f"checkpoint {path}: not a Lightning checkpoint (no global_step)")
    saved = head.get("run_identity")
    if saved is None:
        raise CheckpointError(f"checkpoint {path}: written by another program (no run_identity)")
    if saved.get("objective") != objective:
        diff = sorted(_differences(saved.get("objective"), objective))[:3]
        raise CheckpointError(f"checkpoint {path}: written for another objective config ({'; '.join(diff)})")
    config = json.loads((model_dir / "config.json").read_text()) if (model_dir / "config.json").is_file() else {}
    want = [config.get("vocab_size"), config.get("hidden_size")]
    if None not in want and saved.get("embedding") not in (None, want):
        raise CheckpointError(
            f"checkpoint {path}: written for another model (embedding {saved['embedding']}, model.path has {want})"
        )
    return int(head["global_step"])


def _differences(a, b, prefix: str = "objective") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}.{key}")
        return out
    return [] if a == b else [f"{prefix}: checkpoint {a!r}, now {b!r}"]


class RunState(L.Callback):
    """Saves what a resume needs beyond weights, optimizer and loops: every rank's RNG states and the
    run's identity (objective config, embedding shape) that `check_checkpoint` compares against.

    Args:
        objective: the run's resolved objective config (`OmegaConf.to_container(cfg.objective)`).
    """

    def __init__(self, objective: dict):
        self.objective = objective

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        states = [rng_state()]
        if trainer.world_size > 1:  # every rank is in this hook (dump_checkpoint runs everywhere)
            import torch.distributed as dist

            states = [None] * trainer.world_size
            dist.all_gather_object(states, rng_state())
        checkpoint["rng"] = states
        embedding = pl_module.policy.get_input_embeddings().weight  # a DTensor's shape is the global one
        checkpoint["run_identity"] = {"objective": self.objective, "embedding": list(embedding.shape)}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        states = checkpoint.get("rng") or []
        if len(states) == trainer.world_size:
            set_rng_state(states[trainer.global_rank])
        else:
            log.warning(
                "checkpoint RNG states are for %d ranks, this run has %d: not restored", len(states), trainer.world_size
            )
