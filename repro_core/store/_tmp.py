"""Temp entries of writers in flight (``tmp/``): born locked, swept once their writer is gone.

A live writer holds ``flock(LOCK_EX)`` on its temp file or directory, so an entry whose lock can
be taken belongs to a dead process (a PID check would be fooled by PID reuse).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from pathlib import Path

from .. import constants
from ..errors import StorageError

__all__ = ["is_stale_temp", "new_locked_temp", "remove_entry"]


def new_locked_temp(tmp_dir: Path, suffix: str, *, directory: bool = False) -> tuple[Path, int]:
    """Create ``tmp/<pid>-<token><suffix>`` already flock()ed by us; return (path, fd).

    The entry is born under a dot-name that ``sweep_tmp`` leaves alone, locked, and only then
    renamed to its sweepable name (the lock follows the open file across the rename). Creating
    it under the final name and locking it after would let a concurrent sweep delete a live
    writer's file in between.
    """
    name = f"{os.getpid()}-{secrets.token_hex(8)}{suffix}"
    hidden, final = tmp_dir / f".{name}", tmp_dir / name

    def _create() -> int:
        if directory:
            hidden.mkdir()
            fd = os.open(hidden, os.O_RDONLY | os.O_CLOEXEC)
        else:
            fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.rename(hidden, final)
        except BaseException:
            os.close(fd)
            remove_entry(hidden)
            raise
        return fd

    try:
        return final, _create()
    except OSError as exc:
        raise StorageError(f"creating a temp file failed: {exc}", path=final,
                           errno=exc.errno) from exc


def is_stale_temp(entry: Path, now: float) -> bool:
    """A temp entry is stale when its writer's flock can be taken, or it is very old.

    Dot-names are entries being born (see ``new_locked_temp``): only age makes them stale.
    """
    try:
        age = now - entry.lstat().st_mtime
    except FileNotFoundError:
        return False
    if age > constants.REPRO_STALE_TMP_SECONDS:
        return True
    if entry.name.startswith("."):
        return False
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live writer (EWOULDBLOCK), or unknowable: leave it
        return False
    finally:
        os.close(fd)
    return True


def remove_entry(entry: Path) -> None:
    """Best effort: a temp entry we cannot remove (permissions) is left for ``repro gc``."""
    with contextlib.suppress(OSError):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink()
