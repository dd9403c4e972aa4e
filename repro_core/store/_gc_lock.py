"""The store's publish guard: ``<root>/.gc.lock``, shared by writers, exclusive for gc.

A writer publishes a blob, then commits the registry row that names it; gc lists blobs and
deletes those no row names. Between the writer's two steps a blob has no row yet, so gc must
not run then: writers hold the lock shared (``flock(LOCK_SH)``) across both steps, gc holds it
exclusively while it deletes. ``LocalStorageBackend.publish_guard`` is the public entry.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .. import constants
from ..errors import StorageError

__all__ = ["hold"]

# Guard descriptors open in this process. A fork() child inherits them, and the lock lives as
# long as any copy is open: a child outliving the call would block gc for ever. The child
# closes its copies at once (the parent's own copy still holds the lock).
_GUARD_FDS: set[int] = set()


@contextlib.contextmanager
def hold(path: Path, *, exclusive: bool) -> Iterator[None]:
    """Hold the lock file ``path`` shared (writers) or exclusive (gc, with a deadline)."""
    fd = _open_locked(path, exclusive)
    _GUARD_FDS.add(fd)
    try:
        yield
    finally:
        _GUARD_FDS.discard(fd)
        os.close(fd)


def _open_locked(path: Path, exclusive: bool) -> int:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StorageError(f"locking the store failed: {exc}", path=path,
                           errno=exc.errno) from exc
    try:
        if exclusive:
            _flock_with_deadline(fd, path)
        else:
            fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, StorageError):
            raise
        raise StorageError(f"locking the store failed: {exc}", path=path,
                           errno=exc.errno) from exc
    except BaseException:  # Ctrl-C while waiting: no descriptor leaks
        os.close(fd)
        raise
    return fd


def _flock_with_deadline(fd: int, path: Path) -> None:
    """gc's exclusive lock: wait for writers, but not for ever."""
    deadline = time.monotonic() + constants.SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise StorageError(
                    f"the store is busy: a writer has held {path} for over "
                    f"{constants.SQLITE_BUSY_TIMEOUT_MS // 1000} s; retry gc later",
                    path=path) from None
            time.sleep(0.05)


def _close_guards_in_child() -> None:
    for fd in list(_GUARD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _GUARD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_guards_in_child)
