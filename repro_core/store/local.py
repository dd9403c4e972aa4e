"""Content-addressed blob store on a local (or mounted) filesystem.

The store root looks like this; only ``blobs/`` and ``tmp/`` belong to this module::

    <root>/                      $REPRO_HOME, default ./repro_store
    ├── CACHEDIR.TAG             tells backup tools this is a cache
    ├── registry.sqlite          (registry.py)
    ├── blobs/
    │   └── blake3/
    │       └── ab/
    │           └── cdef…        immutable, read-only, named by the digest of its bytes
    ├── tmp/
    │   └── <pid>-<token>.part   writers in flight, each flock()ed by its writer
    ├── cache/dirs/…             directory artifacts materialised as hard links (directory.py)
    └── runs/<run_id>/           human-readable exports (manager.py)

Every blob is written as: unique temp file in ``tmp/`` (same filesystem, so the rename is
atomic) → hash while writing → fsync → ``os.replace`` into ``blobs/`` → fsync the directory.
A reader therefore sees either no blob or a complete one, also after ``kill -9`` or a power cut.
A temp file whose flock can be taken belongs to a dead writer and is swept when the store opens.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from .. import _fsio, constants
from ..errors import IntegrityError, StorageError
from ..hashing import copy_and_hash, hash_file, new_hasher, parse_digest
from .base import StorageBackend

__all__ = ["BlobWriter", "LocalStorageBackend", "is_stale_temp", "new_locked_temp"]

_T = TypeVar("_T")
_CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by repro.\n"
)


def _storage_errors(what: str, path: Path | str | None, fn: Callable[[], _T]) -> _T:
    """Run ``fn`` translating ``OSError`` into ``StorageError`` (the boundary of this module)."""
    try:
        return fn()
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"{what} failed: {exc}", path=path, errno=exc.errno) from exc


class BlobWriter:
    """A write-once file: bytes written here are hashed on the way to a temp file in ``tmp/``.

    ``commit()`` makes it a visible blob and returns ``(digest, size)``; leaving the ``with``
    block without commit (or with an exception) deletes the temp file. Serializers (safetensors,
    numpy, JSON) write straight into it, so logged content is never read back or copied.
    """

    def __init__(self, store: LocalStorageBackend) -> None:
        self._store = store
        self._hasher = new_hasher(store.algorithm, parallel=True)
        self._size = 0
        self._closed = False
        self.temp_path, self._fd = store._new_temp_file()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        self._hasher.update(view)
        _storage_errors("writing a blob", self.temp_path, lambda: _fsio.write_all(self._fd, view))
        self._size += len(view)
        return len(view)

    def tell(self) -> int:
        return self._size

    def flush(self) -> None:
        """Writes go straight to the file descriptor; nothing is buffered here."""

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def copy_from_fd(self, src_fd: int) -> None:
        """Stream another file in (kernel copy, hashed from our temp file's page cache)."""
        self._size += _storage_errors(
            "copying into the store",
            self.temp_path,
            lambda: copy_and_hash(src_fd, self._fd, self._hasher, _fsio.copy_range),
        )

    def commit(self) -> tuple[str, int]:
        """Make the content a visible, read-only blob; return ``(digest, size)``."""
        digest = self._hasher.digest()
        self._store._publish(self, digest, self._size)
        return digest, self._size

    def abort(self) -> None:
        """Drop the temp file (idempotent)."""
        if self._closed:
            return
        self._closed = True
        os.close(self._fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)

    def _close_fd(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.abort()


class LocalStorageBackend(StorageBackend):
    """Local filesystem storage; also the cache every remote backend reads through."""

    def __init__(
        self, cache_dir: str | Path = "./artifact_cache", *, algorithm: str | None = None
    ) -> None:
        self.root = Path(cache_dir).expanduser().absolute()
        self.algorithm = algorithm or constants.REPRO_HASH
        new_hasher(self.algorithm)  # validates the name before any I/O
        self.blobs_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self._layout_ready = False

    # -- primitives -------------------------------------------------------------------------

    def blob_path(self, content_hash: str) -> Path:
        """Where the blob named ``content_hash`` lives (whether or not it exists)."""
        algorithm, hexdigest = parse_digest(content_hash)
        return self.blobs_dir / algorithm / hexdigest[:2] / hexdigest[2:]

    def exists(self, content_hash: str) -> bool:
        return self.blob_path(content_hash).is_file()

    def upload(self, file_path: Path, content_hash: str) -> str:
        """Copy ``file_path`` in; refuse it if its bytes do not hash to ``content_hash``."""
        algorithm, _ = parse_digest(content_hash)
        if algorithm != self.algorithm:
            store = LocalStorageBackend(self.root, algorithm=algorithm)
            return store.upload(file_path, content_hash)
        with self.open_writer() as writer:
            self._copy_file_into(writer, Path(file_path))
            actual = writer._hasher.digest()
            if actual != content_hash:
                raise IntegrityError(
                    f"{file_path} hashes to {actual}, not {content_hash}; nothing was stored",
                    digest=content_hash,
                    path=file_path,
                    expected=content_hash,
                    actual=actual,
                )
            writer.commit()
        return str(self.blob_path(content_hash))

    def download(self, content_hash: str, target_path: Path) -> Path:
        """Copy the blob to ``target_path`` atomically (temp file beside it + rename)."""
        source = self.blob_path(content_hash)
        if not source.is_file():
            raise StorageError(f"blob {content_hash} is not in the store", path=source)
        target = Path(target_path)
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")

        def _copy() -> Path:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                shutil.copyfile(source, tmp)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    tmp.unlink()
            return target

        return _storage_errors("downloading a blob", target, _copy)

    def delete(self, content_hash: str) -> bool:
        path = self.blob_path(content_hash)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"deleting {path} failed: {exc}", path=path) from exc
        return True

    def iter_digests(self) -> Iterator[str]:
        for algo_dir in sorted(self.blobs_dir.glob("*")):
            for shard in sorted(algo_dir.glob("??")):
                for blob in sorted(shard.iterdir()):
                    yield f"{algo_dir.name}:{shard.name}{blob.name}"

    # -- derived operations -----------------------------------------------------------------

    def open_writer(self) -> BlobWriter:
        """A :class:`BlobWriter` for write-once content."""
        return BlobWriter(self)

    def ingest_file(self, file_path: Path) -> tuple[str, int]:
        """Copy a file into the store while hashing it (one read); return ``(digest, size)``."""
        with self.open_writer() as writer:
            self._copy_file_into(writer, Path(file_path))
            return writer.commit()

    def check(self, content_hash: str, size: int, *, full: bool = True) -> Path:
        """Check a blob's size (always) and digest (``full``); return its path or raise."""
        path = self.blob_path(content_hash)
        try:
            actual_size = path.stat().st_size
        except FileNotFoundError:
            raise IntegrityError(
                f"blob {content_hash} is missing from {self.blobs_dir}",
                digest=content_hash,
                path=path,
                expected=size,
                actual=None,
            ) from None
        if actual_size != size:
            raise IntegrityError(
                f"blob {content_hash} has {actual_size} bytes, expected {size}: it is corrupt",
                digest=content_hash,
                path=path,
                expected=size,
                actual=actual_size,
            )
        if full:
            actual = hash_file(path, parse_digest(content_hash)[0])
            if actual != content_hash:
                raise IntegrityError(
                    f"blob {content_hash} is corrupt: its content hashes to {actual}",
                    digest=content_hash,
                    path=path,
                    expected=content_hash,
                    actual=actual,
                )
        return path

    def verify(self, content_hash: str) -> None:
        """Re-hash in place (no copy needed locally); a missing blob is an IntegrityError."""
        try:
            size = self.blob_path(content_hash).stat().st_size
        except FileNotFoundError:
            size = -1  # check() reports it as missing
        self.check(content_hash, size, full=True)

    def sweep_tmp(self) -> int:
        """Delete temp files of dead writers; return how many were removed.

        A live writer holds ``flock(LOCK_EX)`` on its temp file, so a lock we can take means its
        process is gone (a PID check would be fooled by PID reuse). Files older than
        ``REPRO_STALE_TMP_SECONDS`` go too, for filesystems where flock is not shared.
        """
        if not self.tmp_dir.is_dir():
            return 0
        removed = 0
        now = time.time()
        for entry in self.tmp_dir.iterdir():
            if is_stale_temp(entry, now):
                _remove_entry(entry)
                removed += 1
        return removed

    @contextlib.contextmanager
    def publish_guard(self, *, exclusive: bool = False) -> Iterator[None]:
        """Writers hold this shared from publishing a blob until its registry row commits;
        gc holds it exclusively while deleting, so it never sees a blob between the two
        steps (when the row is not there yet) and deletes it under a writer's feet."""
        self.ensure_layout()
        path = self.root / ".gc.lock"

        def _lock() -> int:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if exclusive:
                    _flock_with_deadline(fd, path)
                else:
                    fcntl.flock(fd, fcntl.LOCK_SH)
            except BaseException:
                os.close(fd)
                raise
            return fd

        fd = _storage_errors("locking the store", path, _lock)
        _GUARD_FDS.add(fd)
        try:
            yield
        finally:
            _GUARD_FDS.discard(fd)
            os.close(fd)

    def ensure_layout(self) -> None:
        """Create the directory skeleton and CACHEDIR.TAG (idempotent)."""
        if self._layout_ready:
            return

        def _make() -> None:
            algo_dir = self.blobs_dir / self.algorithm
            fresh = not (algo_dir / "ff").is_dir()
            for d in (self.root, algo_dir, self.tmp_dir):
                d.mkdir(parents=True, exist_ok=True)
            if fresh:
                # All 256 shards up front: publishing then never creates a directory, and the
                # directory entries are made durable once here rather than per blob.
                for i in range(256):
                    (algo_dir / f"{i:02x}").mkdir(exist_ok=True)
                for d in (self.root.parent, self.root, self.blobs_dir, algo_dir):
                    _fsio.fsync_dir(d)
            tag = self.root / "CACHEDIR.TAG"
            if not tag.exists():  # temp name outside tmp/, so no sweep can take it
                tmp = self.root / f".CACHEDIR.TAG.{os.getpid()}.{secrets.token_hex(4)}"
                tmp.write_text(_CACHEDIR_TAG)
                os.replace(tmp, tag)

        _storage_errors("creating the store layout", self.root, _make)
        self._layout_ready = True

    # -- internals --------------------------------------------------------------------------

    def _copy_file_into(self, writer: BlobWriter, file_path: Path) -> None:
        try:
            fd = os.open(file_path, os.O_RDONLY)
        except OSError as exc:
            raise StorageError(f"cannot read {file_path}: {exc}", path=file_path) from exc
        try:
            writer.copy_from_fd(fd)
        finally:
            os.close(fd)

    def _new_temp_file(self) -> tuple[Path, int]:
        self.ensure_layout()
        return new_locked_temp(self.tmp_dir, ".part")

    def _publish(self, writer: BlobWriter, digest: str, size: int) -> None:
        """fsync → read-only → rename into place → fsync dir (dedup: same digest, same path)."""
        final = self.blob_path(digest)

        def _do() -> None:
            # Always rename our verified bytes into place, even over an existing blob of the
            # same name: the rename is atomic and as cheap as a check, it repairs a blob that
            # rotted on disk, and the fresh mtime keeps gc's grace period honest.
            _fsio.fsync(writer._fd)
            os.fchmod(writer._fd, 0o444)
            try:
                _fsio.replace(writer.temp_path, final)
            except FileNotFoundError:  # shard removed by hand: recreate it durably
                final.parent.mkdir(parents=True, exist_ok=True)
                _fsio.fsync_dir(final.parent.parent)
                _fsio.replace(writer.temp_path, final)
            writer._close_fd()
            _fsio.fsync_dir(final.parent)

        try:
            _storage_errors("publishing a blob", final, _do)
        except BaseException:
            writer.abort()
            raise


# Guard descriptors open in this process. A fork() child inherits them, and the lock lives as
# long as any copy is open: a child outliving the call would block gc for ever. The child
# closes its copies at once (the parent's own copy still holds the lock).
_GUARD_FDS: set[int] = set()


def _close_guards_in_child() -> None:
    for fd in list(_GUARD_FDS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _GUARD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_guards_in_child)


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
            _remove_entry(hidden)
            raise
        return fd

    return final, _storage_errors("creating a temp file", final, _create)


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


def _remove_entry(entry: Path) -> None:
    """Best effort: a temp entry we cannot remove (permissions) is left for ``repro gc``."""
    with contextlib.suppress(OSError):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink()
