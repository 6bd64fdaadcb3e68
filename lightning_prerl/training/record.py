"""The rollout record: every training batch as it was trained on, one parquet file per step and rank.

`data.record_rollouts=true` writes, under the run directory::

    rollouts/manifest.json              format version, world size, B, G, pad id, the run's resolved config
    rollouts/step000000-rank0.parquet   step 0's batch as rank 0 trained on it, one row per sample
    rollouts/step000001-rank0.parquet   ...

`experiments/replay.py` trains from these files with no rollout engine (`replay.ReplayDataModule`).

Decisions:
- **One shard per rank.** The data module already splits the global batch over ranks, so each rank
  writes the rows it trains on: no collective and no gathering of every completion on rank 0, and the
  write time divides over ranks. A replay on the same world size reads back exactly its own shard, so
  its updates are bit-identical; the shards of a step together are the global batch.
- **Step k is the k-th rollout batch** (`trainer.current_epoch`): with one update per batch (the
  default) the optimizer step k. The file also holds the policy version: the global step whose weights
  generated it.
- **A column per `RolloutBatch` field**, readable with pyarrow alone (`pyarrow.parquet.read_table`):
  `prompt_ids` and `response_ids` (and the prompt parts of the conditioning spaces, `question_ids`,
  `system_ids`, `fixed_ids`, when carried) are list columns of the real tokens (padding stripped; the masks are
  their lengths), response-aligned tensors (`rollout_logprobs`, when the engine returned them) list
  columns of the same lengths, per-sample tensors (`rewards` after DAPO shaping, `sample_mask`) and lists
  (`texts`, `has_answer`, `sources`, `seeds`) plain columns. The rest (step, rank, world size, policy
  version, objective phase at generation time, group size, padded widths, pad id, dtypes, the data
  path's stats) is JSON in the schema metadata under `lightning_prerl`.
- **Widths are kept.** After dynamic sampling a batch is padded to the widest row of every round, not of
  its kept rows; the replay pads back to that very shape and dtype, so each tensor is equal. A batch
  whose padding is not plain (a mask that is not one run of ones, padding that is not the pad id or 0)
  is refused rather than recorded wrong.
- **Atomic files.** Each file is written under a temporary name and renamed (`atomic.atomic_file`): a
  killed run never leaves half a step; the resumed run regenerates that step's identical batch.
"""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lightning_prerl.atomic import atomic_file, write_text
from lightning_prerl.data.batch import PROMPT_PARTS, RESPONSE_ALIGNED, RolloutBatch
from lightning_prerl.errors import ConfigError

FORMAT = 1
META_KEY = b"lightning_prerl"
LISTS = ("texts", "has_answer", "sources", "seeds")  # per-sample lists of the batch, as plain columns
MASKS = {"prompt_ids": "prompt_mask", "response_ids": "response_mask"}  # list columns: the mask of their tokens
MASKS.update(dict.fromkeys(RESPONSE_ALIGNED, "response_mask"))
MASKS.update({f"{part}_ids": f"{part}_mask" for part in PROMPT_PARTS})  # the spaces' prompt parts, when carried
LEFT_PADDED = ("prompt_ids", *(f"{part}_ids" for part in PROMPT_PARTS))
TOKENS = ("prompt_ids", "response_ids", *LEFT_PADDED[1:])  # the list columns whose lengths are their masks'


def _width_key(name: str) -> str:  # "prompt_ids" -> "prompt", a response-aligned column -> "response"
    return MASKS[name].removesuffix("_mask")


LIST_TYPES = {"texts": pa.string(), "has_answer": pa.bool_(), "sources": pa.string(), "seeds": pa.int64()}


def record_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "rollouts"


def shard_path(directory: Path, step: int, rank: int) -> Path:
    return Path(directory) / f"step{step:06d}-rank{rank}.parquet"


def _tensors(batch: RolloutBatch) -> dict[str, torch.Tensor]:
    return {f.name: getattr(batch, f.name) for f in fields(batch) if isinstance(getattr(batch, f.name), torch.Tensor)}


def batch_table(batch: RolloutBatch, meta: dict, pad: int) -> pa.Table:
    """A batch as a table of N rows; `meta` (JSON-able) goes into the schema metadata."""
    tensors = {k: v.detach().cpu() for k, v in _tensors(batch).items()}
    columns = {}
    for name, x in tensors.items():
        if name in MASKS.values():
            continue  # their lengths: the list columns' lengths
        if name not in MASKS:  # (N,) one value per sample
            columns[name] = pa.array(x.numpy())
            continue
        mask = tensors[MASKS[name]].bool()  # (N, W)
        if x.shape != mask.shape or not _is_run(mask, left=name in LEFT_PADDED):
            raise ValueError(f"cannot record {name}: its mask is not one run of ones per row")
        fill = pad if name.endswith("_ids") else 0
        if bool((x[~mask] != fill).any()):
            raise ValueError(f"cannot record {name}: its padding is not {fill}")
        offsets = np.concatenate([[0], np.cumsum(mask.sum(1).numpy())]).astype(np.int32)  # (N + 1,)
        columns[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(x[mask].numpy()))  # row-major
    for name in LISTS:
        values = getattr(batch, name)
        if values:
            columns[name] = pa.array(values, type=LIST_TYPES[name])
    meta = {
        **meta,
        "format": FORMAT,
        "group_size": batch.group_size,
        "padding_prompts": batch.padding_prompts,
        "widths": {_width_key(name): tensors[name].shape[1] for name in TOKENS if name in tensors},
        "pad_token_id": pad,
        "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()},
        "stats": batch.stats,
    }
    return pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(meta).encode()})


def _is_run(mask: torch.Tensor, left: bool) -> bool:
    """(N, W) bool: is every row one run of ones, at the right end (`left`-padded) or at the left end?"""
    cols = torch.arange(mask.shape[1])  # (W,)
    lengths = mask.sum(1, keepdim=True)  # (N, 1)
    expected = cols >= mask.shape[1] - lengths if left else cols < lengths  # (N, W)
    return torch.equal(mask, expected)


def table_batch(table: pa.Table) -> tuple[RolloutBatch, dict]:
    """The batch a table holds, every tensor of the recorded shape and dtype, and its metadata."""
    meta = json.loads(table.schema.metadata[META_KEY])
    widths, dtypes, pad = meta["widths"], meta["dtypes"], meta["pad_token_id"]
    tensors, masks = {}, {}
    for name in (n for n in TOKENS if n in table.column_names):
        lengths = torch.from_numpy(np.diff(table[name].combine_chunks().offsets.to_numpy()))  # (N,)
        width = widths[_width_key(name)]
        cols = torch.arange(width)
        masks[name] = cols >= width - lengths[:, None] if name in LEFT_PADDED else cols < lengths[:, None]
    for name in table.column_names:
        if name in LISTS:
            continue
        dtype = getattr(torch, dtypes[name])
        column = table[name].combine_chunks()
        if name not in MASKS:
            tensors[name] = torch.from_numpy(column.to_numpy(zero_copy_only=False).copy()).to(dtype)
            continue
        mask = masks[f"{_width_key(name)}_ids"]  # (N, W)
        fill = pad if name.endswith("_ids") else 0
        out = torch.full(mask.shape, fill, dtype=dtype)
        out[mask] = torch.from_numpy(column.flatten().to_numpy(zero_copy_only=False).copy()).to(dtype)
        tensors[name] = out
    for ids, mask in masks.items():
        tensors[MASKS[ids]] = mask.to(getattr(torch, dtypes[MASKS[ids]]))
    lists = {name: table[name].to_pylist() if name in table.column_names else [] for name in LISTS}
    batch = RolloutBatch(
        **tensors, **lists, group_size=meta["group_size"], padding_prompts=meta["padding_prompts"], stats=meta["stats"]
    )
    return batch, meta


def record_batch(datamodule, batch: RolloutBatch, epoch: int) -> None:
    """Write this rank's batch of step `epoch` (the manifest too, on global rank 0, when missing);
    the write time is added to the batch's stats as `time/record`."""
    t0, trainer = time.perf_counter(), datamodule.trainer
    directory, pad = record_dir(trainer.default_root_dir), datamodule.tokenizer.pad_token_id
    directory.mkdir(parents=True, exist_ok=True)
    if trainer.is_global_zero and not (directory / "manifest.json").exists():
        write_manifest(directory, datamodule, pad)
    meta = {
        "step": epoch,
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "policy_version": trainer.global_step if batch.policy_version is None else int(batch.policy_version.min()),
        "phase": getattr(trainer.lightning_module, "phase", None),
    }
    table = batch_table(batch, meta, pad)
    with atomic_file(shard_path(directory, epoch, trainer.global_rank)) as tmp:
        pq.write_table(table, tmp)
    batch.stats["time/record"] = time.perf_counter() - t0


def write_manifest(directory: Path, datamodule, pad: int) -> None:
    import yaml

    config = Path(datamodule.trainer.default_root_dir) / "config.yaml"
    manifest = {
        "format": FORMAT,
        "world_size": datamodule.trainer.world_size,
        "prompts_per_step": datamodule.prompts_per_step,
        "samples_per_prompt": datamodule.samples_per_prompt,
        "mini_batches": datamodule.mini_batches,
        "data": datamodule.name,
        "pad_token_id": pad,
        "config": yaml.safe_load(config.read_text()) if config.exists() else None,
    }
    write_text(directory / "manifest.json", json.dumps(manifest, indent=1) + "\n")


def read_manifest(directory: Path) -> dict:
    """The record's manifest; one-line `ConfigError` when there is none or its format is not this one."""
    path = Path(directory) / "manifest.json"
    if not path.exists():
        raise ConfigError(
            f"no rollout record at {directory} (no manifest.json): record a run with data.record_rollouts=true"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"rollout record {directory}: format {manifest.get('format')}, this version reads {FORMAT}")
    return manifest


def check_record(directory: Path, steps: int, world: int) -> None:
    """One-line `ConfigError` unless steps 0..`steps`-1 of every rank of `world` are recorded."""
    manifest = read_manifest(directory)
    if manifest["world_size"] != world:
        raise ConfigError(
            f"rollout record {directory} holds {manifest['world_size']} rank shard(s) per step; the replay runs "
            f"{world} process(es): replay on the world size of the recording"
        )
    missing = [(s, r) for s in range(steps) for r in range(world) if not shard_path(directory, s, r).exists()]
    if missing:
        step, rank = missing[0]
        raise ConfigError(
            f"rollout record {directory} is incomplete: no {shard_path(directory, step, rank).name}; the replay "
            f"needs steps 0-{steps - 1} of {world} rank(s), the record has {step} whole step(s): lower "
            "trainer.max_steps or record again"
        )


def read_batch(directory: Path, step: int, rank: int, world: int) -> RolloutBatch:
    """Rank `rank`'s recorded batch of step `step` (one-line `ConfigError` when absent or of another world)."""
    path = shard_path(directory, step, rank)
    if not path.exists():
        raise ConfigError(f"rollout record {directory} has no {path.name}: the replay asked for step {step}")
    batch, meta = table_batch(pq.read_table(path))
    if meta["world_size"] != world:
        raise ConfigError(f"{path}: recorded on {meta['world_size']} process(es), replayed on {world}")
    return batch
