"""Writing a directory atomically: build it under a temporary name, fsync, rename into place.

Whatever stood at the path stays complete until the rename; a crash leaves a `.tmp-*`
sibling (removed by the next save) or an `.old-*` one, never a half-written directory. Used
by the Lightning checkpoints, the Hugging Face export and the recipes' tiny checkpoint.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "commit_directory",
    "fsync_files",
    "new_token",
    "prepare_temporary_directory",
    "remove_stale",
    "temporary_directory",
]


def new_token() -> str:
    return uuid.uuid4().hex[:12]


def temporary_directory(path: Path, token: str) -> Path:
    return path.parent / f".{path.name}.tmp-{token}"


def prepare_temporary_directory(
    path: str | os.PathLike, broadcast: Callable[[Any], Any], is_global_zero: bool, barrier: Callable[[], None]
) -> tuple[Path, Path, str]:
    """Collective (the start of a multi-rank save): every rank takes global rank 0's path and a
    fresh token (`broadcast`), rank 0 removes the leftovers of interrupted saves and creates the
    temporary directory, and `barrier` holds the others until it exists. Returns
    `(path, temporary directory, token)`; `commit_directory(tmp, path, token)` ends the save."""
    path_str, token = broadcast((str(path), new_token()))
    path = Path(path_str)
    tmp = temporary_directory(path, token)
    if is_global_zero:
        remove_stale(path)
        tmp.mkdir(parents=True)
    barrier()
    return path, tmp, token


def remove_stale(path: Path, keep: Path | None = None) -> None:
    """Remove temporary directories of interrupted saves of `path` (all but `keep`)."""
    if not path.parent.is_dir():
        return
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if keep is None or stale != keep:
            shutil.rmtree(stale, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(directory: Path, names: list[str]) -> None:
    for name in names:
        _fsync(directory / name)


def commit_directory(tmp: Path, path: Path, token: str) -> None:
    """Put the complete directory `tmp` at `path` (replacing what is there) by renames."""
    _fsync(tmp)
    if path.exists() or path.is_symlink():
        old = path.parent / f".{path.name}.old-{token}"
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(old, path)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.rename(tmp, path)
    _fsync(path.parent)
    for leftover in path.parent.glob(f".{path.name}.old-*"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink()
