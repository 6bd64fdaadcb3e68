"""Writes that fail leave the previous state intact: a file or a folder appears whole, or not at all.

A disk that fills, a permission error or a kill half-way through `save_pretrained` would otherwise
leave a policy folder that loads garbage or nothing. Everything is written under a temporary name in
the same folder (the same file system), then renamed into place; `os.replace` of a file is atomic on
POSIX, a folder takes two renames (the old one aside, the new one in) with the old one restored if the
second fails. Checkpoint files need none of this: Lightning already writes them through an fsspec
transaction (lightning/fabric/utilities/cloud_io.py `_atomic_save`: a temporary file moved into place).
This module imports nothing of the package, so every layer may use it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """Yields an empty sibling folder to write `path`'s new content into; on success it replaces `path`,
    on any exception it is deleted and `path` (if it existed) is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial, old = path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.old")
    for leftover in (partial, old):  # of an earlier process killed mid-way
        shutil.rmtree(leftover, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    try:
        os.replace(partial, path)
    except BaseException:
        if old.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yields a temporary sibling path to write `path`'s new content to (by any writer: pyarrow,
    torch.save); on success it replaces `path`, on any exception it is deleted and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> Path:
    """`path.write_text(text)`, except that a failure leaves the previous file (or none) in place."""
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)
