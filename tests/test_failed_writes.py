"""Writes that fail half-way (disk full, permission, a kill) leave the previous state intact (issue 27, part 3).

Each test injects the failure where the bytes are written and checks that the last good file or folder
is unchanged, that nothing partial is left behind, and that the error still reaches the caller.
"""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from lightning_prerl import atomic
from lightning_prerl.training.checkpoints import newest_checkpoint

DISK_FULL = OSError(errno.ENOSPC, "No space left on device")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_checkpoint_write_that_fails_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """Lightning's TorchCheckpointIO writes through an fsspec transaction (a temporary file renamed into
    place, cloud_io._atomic_save): a disk that fills mid-write leaves the previous checkpoint whole,
    no second file, and `ckpt_path=auto` resumes from the good one. Pins that library behaviour."""
    import fsspec.implementations.local as local
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    ckpts = tmp_path / "checkpoints"
    io = TorchCheckpointIO()
    io.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.ones(64)}}, ckpts / "step000002.ckpt")
    io.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.ones(64)}}, ckpts / "last.ckpt")
    good = _files(ckpts)

    real_write = local.LocalFileOpener.write

    def half_then_full(self, data):
        real_write(self, data[: len(data) // 2])
        raise DISK_FULL

    monkeypatch.setattr(local.LocalFileOpener, "write", half_then_full)
    for name in ("step000004.ckpt", "last.ckpt"):
        with pytest.raises(OSError, match="No space left"):
            io.save_checkpoint({"global_step": 4, "state_dict": {"w": torch.zeros(64)}}, ckpts / name)
    monkeypatch.undo()
    assert _files(ckpts) == good  # neither a half-written step 4 nor a damaged last.ckpt
    assert newest_checkpoint(tmp_path) == ckpts / "step000002.ckpt"  # step files only (last.ckpt is not)
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 3


def test_an_export_that_fails_leaves_the_previous_policy_whole(tiny_model_dir, tmp_path, monkeypatch):
    """`save_pretrained` dies after writing part of the weights: `policy/` still holds the previous
    export byte for byte, no partial folder is left, and the error is raised."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_prerl.scale.models import export_policy

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tmp_path / "policy"
    export_policy(model, tok, out)
    before = _files(out)
    assert "model.safetensors" in before

    def dies_mid_write(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise DISK_FULL

    monkeypatch.setattr(type(model), "save_pretrained", dies_mid_write)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="No space left"):
        export_policy(model, tok, out)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]  # no .policy.partial / .policy.old
    monkeypatch.undo()
    export_policy(model, tok, out)  # a later export replaces it whole
    assert _files(out)["model.safetensors"] != before["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]


def test_a_text_write_that_fails_keeps_the_previous_file(tmp_path, monkeypatch):
    """summary.json and the evaluator's files: the old content stays when the new one cannot be written."""
    path = atomic.write_text(tmp_path / "summary.json", '{"step": 1}\n')

    def full(self, text, *args, **kwargs):
        Path.write_bytes(self, text[:3].encode())
        raise DISK_FULL

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError):
        atomic.write_text(path, '{"step": 2}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"step": 1}\n' and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_folder_left_by_a_killed_export_is_cleared_and_a_failed_swap_restores_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "policy"
    (tmp_path / ".policy.partial").mkdir()  # a process killed mid-export left this
    (tmp_path / ".policy.partial" / "junk").write_text("x")
    with atomic.atomic_directory(target) as part:
        (part / "a").write_text("1")
    assert _files(target) == {"a": b"1"} and [p.name for p in tmp_path.iterdir()] == ["policy"]

    import os

    real_replace = os.replace

    def second_rename_fails(src, dst):
        if Path(src).name == ".policy.partial":
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", second_rename_fails)
    with pytest.raises(PermissionError), atomic.atomic_directory(target) as part:
        (part / "a").write_text("2")
    monkeypatch.undo()
    assert _files(target) == {"a": b"1"}
