"""Names read from a store are untrusted: checked as data first, then used without following links.

A store is shared, synced and downloaded, so a manifest, a registry row or anything under
``cache/`` may have been written by someone else. Two rules keep such input from reaching
anything outside the store (a forged manifest once made ``use_artifact`` overwrite
``../../victim`` through a copy fallback):

1. every name that will become a path is checked *before any I/O*: ``check_relpath`` (relative,
   normalised: no ``..``, ``.``, empty component, NUL, backslash or leading ``/``; bounded
   length and depth), ``safe_component`` (one file name), ``check_digest`` (blob names);
2. every directory we create or write into below the store root is reached one component at a
   time, relative to its parent's file descriptor, with ``O_NOFOLLOW`` (``store_dir``,
   ``open_dir``), so a symlink planted anywhere in the store is refused instead of followed.
   ``os.path`` joins would follow it. The root itself is the user's choice and may be a link.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import IntegrityError, InvalidArgumentError, StorageError
from .hashing import parse_digest

__all__ = ["MAX_DEPTH", "check_digest", "check_relpath", "closing_fd", "component_problem",
           "open_dir", "refuse_inside", "remove_tree", "safe_component", "store_dir"]

MAX_COMPONENT_BYTES = 255  # NAME_MAX on every filesystem we run on
MAX_PATH_BYTES = 4096  # PATH_MAX
MAX_DEPTH = 255  # directory levels in a manifest path (bounds fds and recursion)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def component_problem(name: object) -> str | None:
    """Why ``name`` is not one safe path component, or None when it is."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a string"
    if name in ("", ".", ".."):
        return "is empty, '.' or '..'"
    if "/" in name or "\\" in name or "\x00" in name:
        return "contains '/', a backslash or NUL"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if size > MAX_COMPONENT_BYTES:
        return f"is longer than {MAX_COMPONENT_BYTES} bytes"
    return None


def safe_component(name: object) -> str | None:
    """``name`` if it is one safe file name (for names that have a fallback), else None."""
    return name if component_problem(name) is None else None  # type: ignore[return-value]


def check_relpath(path: object, *, where: str) -> tuple[str, ...]:
    """Split a manifest path into its components, or raise ``IntegrityError`` saying why not."""
    if not isinstance(path, str):
        raise IntegrityError(f"{where}: path {path!r} is a {type(path).__name__}, not a string")
    if path.startswith("/"):
        raise IntegrityError(f"{where}: path {path[:200]!r} is absolute; manifest paths are "
                             "relative to the directory", path=path[:200])
    parts = tuple(path.split("/"))
    for part in parts:
        problem = component_problem(part)
        if problem is not None:
            raise IntegrityError(f"{where}: path {path[:200]!r} has a component that {problem}; "
                                 "the manifest is damaged or forged", path=path[:200])
    if len(parts) > MAX_DEPTH or len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise IntegrityError(f"{where}: path {path[:200]!r}… is deeper than {MAX_DEPTH} levels "
                             f"or longer than {MAX_PATH_BYTES} bytes", path=path[:200])
    return parts


def check_digest(value: object, *, where: str) -> str:
    """A digest read from the store (it names a file under ``blobs/``), or ``IntegrityError``."""
    try:
        parse_digest(value)
    except InvalidArgumentError:
        raise IntegrityError(f"{where}: {str(value)[:200]!r} is not a digest ('blake3:<64 hex>' "
                             "or 'sha256:<64 hex>'); the store is damaged or forged",
                             actual=str(value)[:200]) from None
    assert isinstance(value, str)
    return value


def open_dir(parent_fd: int, name: str, *, create: bool, where: Path) -> int:
    """Open directory ``name`` in ``parent_fd`` (creating it if asked), never through a link.

    Opens first and creates only when missing: on overlay and network filesystems a failing
    ``mkdir`` costs as much as a successful one, and the directory usually exists."""
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise IntegrityError(
                f"{where} is a symlink or not a directory. repro never follows links inside a "
                "store (one planted there could redirect writes outside it); remove it, and "
                "repro rebuilds what belongs there. To put the store on another disk, move the "
                "whole store and point REPRO_HOME (or root=) at it", path=where) from None
        raise
    with contextlib.suppress(FileExistsError):  # made meanwhile by another process: fine
        os.mkdir(name, 0o755, dir_fd=parent_fd)
    return open_dir(parent_fd, name, create=False, where=where)


@contextlib.contextmanager
def closing_fd(fd: int) -> Iterator[int]:
    """``with closing_fd(os.open(...)) as fd``: a raw descriptor closed on leaving the block."""
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def store_dir(root: Path, parts: Sequence[str], *, create: bool) -> Iterator[int]:
    """A descriptor for ``root/parts…``, each component opened with ``O_NOFOLLOW``."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, name in enumerate(parts):
            child = open_dir(fd, name, create=create, where=root.joinpath(*parts[:i + 1]))
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def remove_tree(parent_fd: int, name: str, *, _depth: int = 0) -> None:
    """Delete ``name`` (a file, a link, or a whole tree) in ``parent_fd`` without following any
    link: a symlink planted in the cache is removed, never its target (``shutil.rmtree`` on a
    path would follow a link in the path's *parents*)."""
    try:
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=parent_fd)
        return
    if _depth > MAX_DEPTH + 8:
        raise IntegrityError(f"{name!r} is nested deeper than repro ever builds; remove it by hand")
    fd = open_dir(parent_fd, name, create=False, where=Path(name))
    try:
        for child in os.listdir(fd):
            remove_tree(fd, child, _depth=_depth + 1)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(name, dir_fd=parent_fd)


def real_dirs(root: Path, *parts: str) -> None:
    """Refuse a store directory that is a symlink or not a directory (``root/a``, ``root/a/b``
    … for each of ``parts``; missing ones are fine: they will be created inside the store).

    A synced or downloaded store can carry a planted ``tmp -> /home/you`` or ``spill -> ..``;
    sweeping, importing or writing there would delete, rename or create files outside the
    store. ``root`` itself may be a symlink (a user's own ``repro_store -> /data/store``).
    """
    path = root
    for part in parts:
        path = path / part
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        except OSError as exc:  # permissions, I/O: a storage problem, not a forged store
            raise StorageError(f"cannot inspect {path}: {exc}", path=path,
                               errno=exc.errno) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise IntegrityError(
                f"{path} is a symlink or not a directory: a repro store's directories must be "
                "real directories inside it (was it planted by whoever wrote the store?); "
                "remove it and retry", path=path)


def open_untrusted(path: Path) -> int | None:
    """A read-only descriptor of a *regular file* read from a store, or None: never follows a
    symlink (a planted ``events.jsonl -> /home/you/...``), never blocks on a FIFO, never
    reads a device (``/dev/zero`` would never end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def read_untrusted(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file from a store, or None when it is not one or is larger
    than ``limit`` (read through :func:`open_untrusted`; memory stays bounded by ``limit``)."""
    fd = open_untrusted(path)
    if fd is None:
        return None
    with closing_fd(fd):
        if os.fstat(fd).st_size > limit:
            return None
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # grew while we read
                return None
        return b"".join(chunks)


def refuse_inside(path: Path, root: Path, *, argument: str) -> None:
    """A path of the user's (``copy_to=``, ``link_version``'s ``dest``) must not lie inside
    the store: written there it would replace the registry, a blob or a journal — what
    ``repro recover`` cannot rebuild. Symlinks in either are resolved first."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real == real_root or real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise InvalidArgumentError(f"{path} is inside the store {root}; repro never writes "
                                   "your files there (it could replace the registry or a "
                                   "blob): choose a path outside it", argument=argument)
