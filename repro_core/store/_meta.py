"""Small records beside a remote's blobs: ``<root>/meta/…``, the registry rows a remote carries.

A remote is an object store (or a directory) with no transactions, so what ``repro push``
needs from it is three primitives that every object store has:

- ``get(path)``: a record's bytes, or None; a record bigger than ``limit`` is refused before
  it is read (a forged huge object must not make us allocate without bound);
- ``put(path, data, create=True)``: *create-if-absent* (S3 ``If-None-Match: *``, a local
  ``link()``), the one atomic step version numbering needs: two stores claiming ``v4`` of one
  name at once — exactly one wins, the other sees ``False`` and takes the next number;
  ``create=False`` overwrites (aliases, run records);
- ``list(prefix)``: every record path under a prefix.

Paths are ``/``-separated segments of ``[A-Za-z0-9._-]`` (checked before any I/O), so nothing
read from a record can steer a write outside ``meta/``.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any

from .._safepath import real_dirs
from ..errors import IntegrityError, InvalidArgumentError, StorageError
from .base import StorageBackend

__all__ = ["MAX_RECORD", "RecordStore", "records_for"]

MAX_RECORD = 16 * 1024 * 1024
_ATOMIC: set[str] = set()  # URLs whose conditional writes were seen to work
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def check_path(path: str) -> list[str]:
    """The segments of a record path; anything else is refused before any I/O."""
    parts = path.split("/")
    if not parts or not all(_SEGMENT.fullmatch(p) and ".." not in p for p in parts):
        raise InvalidArgumentError(f"invalid record path {path[:200]!r}", argument="path")
    return parts


class RecordStore:
    """The ``meta/`` records of one remote (see the module docstring)."""

    where: str

    def get(self, path: str, *, limit: int = MAX_RECORD) -> bytes | None:
        raise NotImplementedError

    def put(self, path: str, data: bytes, *, create: bool = False) -> bool:
        raise NotImplementedError

    def list(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def delete(self, path: str) -> bool:
        raise NotImplementedError

    def check_atomic(self) -> None:
        """Refuse a store whose create-if-absent is not atomic (version numbering relies on
        it). A directory's ``link()`` is."""

    def _too_big(self, path: str, size: int, limit: int) -> IntegrityError:
        return IntegrityError(f"record {path} at {self.where} is {size} bytes (limit {limit}): "
                              "not something repro wrote; the remote is damaged or forged",
                              path=self.where)


def records_for(backend: StorageBackend) -> RecordStore:
    """The record store beside ``backend``'s blobs (a local directory, or fsspec)."""
    from .fsspec_backend import FsspecStorageBackend
    from .local import LocalStorageBackend

    if isinstance(backend, LocalStorageBackend):
        return LocalRecords(Path(backend.root))
    if isinstance(backend, FsspecStorageBackend):
        if backend._local is not None:
            return LocalRecords(Path(backend._local.root))
        return FsspecRecords(backend)
    raise InvalidArgumentError(f"{type(backend).__name__} keeps no registry records: push and "
                               "pull need a directory or an object store", argument="remote")


class LocalRecords(RecordStore):
    """Records in ``<root>/meta`` of a directory: written to a unique temp file, fsynced, then
    linked (create) or renamed (overwrite) into place — never visible half-written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.where = str(root)

    def _path(self, path: str) -> Path:
        parts = check_path(path)
        real_dirs(self.root, "meta", *parts[:-1])  # a planted meta/x -> /elsewhere is refused
        return self.root.joinpath("meta", *parts)

    def get(self, path: str, *, limit: int = MAX_RECORD) -> bytes | None:
        target = self._path(path)
        try:
            fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {target}: {exc}", path=target,
                               errno=exc.errno) from exc
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise IntegrityError(f"{target} is not a regular file", path=target)
            if st.st_size > limit:
                raise self._too_big(path, st.st_size, limit)
            return fh.read(limit + 1)[:limit]

    def put(self, path: str, data: bytes, *, create: bool = False) -> bool:
        target = self._path(path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.parent / f".tmp-{secrets.token_hex(8)}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                if create:
                    try:
                        os.link(tmp, target)
                    except FileExistsError:
                        return False
                else:
                    os.replace(tmp, target)
                    tmp = None  # type: ignore[assignment]
            finally:
                if tmp is not None:
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()
            _fsync_dir(target.parent)
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc}", path=target,
                               errno=exc.errno) from exc
        return True

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        found: builtins.list[str] = []
        self._walk(base, prefix, found)
        return sorted(found)

    def _walk(self, directory: Path, rel: str, found: builtins.list[str]) -> None:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise StorageError(f"cannot list {directory}: {exc}", path=directory) from exc
        for entry in entries:
            if entry.name.startswith(".") or entry.is_symlink():
                continue  # temp files in flight; a planted link is never followed
            if entry.is_dir(follow_symlinks=False):
                self._walk(Path(entry.path), f"{rel}/{entry.name}", found)
            elif entry.is_file(follow_symlinks=False):
                found.append(f"{rel}/{entry.name}")

    def delete(self, path: str) -> bool:
        try:
            self._path(path).unlink()
        except FileNotFoundError:
            return False
        return True


class FsspecRecords(RecordStore):
    """Records under ``<bucket/prefix>/meta`` of an fsspec filesystem (S3: conditional PUT)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.where = backend.url

    def _key(self, path: str) -> str:
        check_path(path)
        return f"{self.backend.location.root}/meta/{path}"

    def get(self, path: str, *, limit: int = MAX_RECORD) -> bytes | None:
        key = self._key(path)
        backend = self.backend
        backend._ensure_location()
        backend._fs().invalidate_cache(key)  # another store may have written it since
        with backend._errors("reading a record"):
            try:
                info = backend._retry("reading a record", lambda: backend._fs().info(key))
                size = int(info.get("size") or 0)
                if size > limit:
                    raise self._too_big(path, size, limit)
                data: bytes = backend._retry("reading a record",
                                             lambda: backend._fs().cat_file(key))
            except FileNotFoundError:
                return None
        if len(data) > limit:
            raise self._too_big(path, len(data), limit)
        return data

    def put(self, path: str, data: bytes, *, create: bool = False) -> bool:
        key = self._key(path)
        backend = self.backend
        backend._ensure_location()
        mode = "create" if create else "overwrite"
        with backend._errors("writing a record"):
            try:
                backend._retry("writing a record",
                               lambda: backend._fs().pipe_file(key, data, mode=mode))
            except FileExistsError:
                return False
            except OSError as exc:
                if create and _precondition_failed(exc):
                    return False
                raise
        return True

    def list(self, prefix: str) -> list[str]:
        base = self._key(prefix)
        backend = self.backend
        backend._ensure_location()
        backend._fs().invalidate_cache(base)  # s3fs caches listings; other stores write
        with backend._errors("listing records"):
            try:
                keys = backend._retry("listing records", lambda: backend._fs().find(base))
            except FileNotFoundError:
                return []
        root = f"{backend.location.root}/meta/"
        return sorted(k[len(root):] for k in keys if k.startswith(root))

    def check_atomic(self) -> None:
        """Probe once per process and URL: a create-if-absent write of one scratch record,
        twice. S3 honours ``If-None-Match: *``; an S3-compatible server that ignores it (or
        a filesystem whose fsspec driver emulates it with exists-then-write) would let two
        stores both claim ``v4`` — so it is refused before any claim is made."""
        if self.where in _ATOMIC:
            return
        probe = f"locks/probe-{secrets.token_hex(8)}"
        first = self.put(probe, b"first", create=True)
        second = self.put(probe, b"second", create=True)
        with contextlib.suppress(StorageError):
            self.delete(probe)
        if not first or second:
            raise StorageError(
                f"{self.where} does not honour conditional writes (If-None-Match: *): repro "
                "cannot number versions safely there (two stores could both claim one "
                "number). Use AWS S3, a server that supports conditional PUTs (MinIO, Ceph "
                "RGW recent releases), or a shared directory", path=self.where)
        _ATOMIC.add(self.where)

    def delete(self, path: str) -> bool:
        key = self._key(path)
        backend = self.backend
        with backend._errors("deleting a record"):
            try:
                backend._retry("deleting a record", lambda: backend._fs().rm_file(key))
            except FileNotFoundError:
                return False
        return True


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an error is S3's 412 for a create-if-absent PUT that lost the race (read from
    botocore's structured response, never guessed from message text)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if error.get("Code") in ("PreconditionFailed", "412") or status == 412:
                return True
        seen = seen.__cause__ or seen.__context__
    return False


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
