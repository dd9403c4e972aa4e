"""The few OS calls through which every store write passes.

Keeping them in one module gives the fault-injection tests one place to make the Nth
write / fsync / replace fail (as SQLite tests its own I/O error paths), and gives the store one
place to honour ``REPRO_FSYNC``.
"""

from __future__ import annotations

import errno as _errno
import os
import tempfile
from pathlib import Path

from . import constants
from .errors import StorageError

__all__ = ["copy_range", "fsync", "fsync_dir", "replace", "write_all", "write_file_atomic"]

# errnos for which copy_file_range is unsupported rather than a real I/O failure.
_FALLBACK_ERRNOS = {_errno.EXDEV, _errno.ENOSYS, _errno.EOPNOTSUPP, _errno.EINVAL, _errno.EPERM}


def write_all(fd: int, data: bytes | bytearray | memoryview) -> int:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data).cast("B")
    total = 0
    while total < len(view):
        total += os.write(fd, view[total:])
    return total


def copy_range(src_fd: int, dst_fd: int, count: int) -> int:
    """Copy up to ``count`` bytes from the current offsets inside the kernel; returns bytes copied.

    ``copy_file_range`` avoids a trip through user space (and reflinks on btrfs/xfs); where it is
    missing or refused (cross-device on old kernels, some FUSE mounts) we fall back to read/write.
    """
    try:
        return os.copy_file_range(src_fd, dst_fd, count)
    except (AttributeError, OSError) as exc:
        if isinstance(exc, OSError) and exc.errno not in _FALLBACK_ERRNOS:
            raise
    data = os.read(src_fd, count)
    if data:
        write_all(dst_fd, data)
    return len(data)


def fsync(fd: int) -> None:
    """fsync a file unless the store runs with ``REPRO_FSYNC=none``."""
    if constants.REPRO_FSYNC == "full":
        os.fsync(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so a rename inside it survives power loss (POSIX needs this)."""
    if constants.REPRO_FSYNC != "full":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Atomically move ``src`` over ``dst`` (same filesystem)."""
    os.replace(src, dst)



def write_file_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replace ``path`` with ``data`` all at once: unique temp file beside it, fsync, rename,
    fsync the directory. A reader sees the old file or the new one, never half of either
    (the seed's original left ``artifacts.json`` half-written when it crashed)."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            try:
                write_all(fd, data)
                fsync(fd)
            finally:
                os.close(fd)
            replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
    except OSError as exc:
        raise StorageError(f"cannot write {target}: {exc}", path=target, errno=exc.errno) from exc
    return target
