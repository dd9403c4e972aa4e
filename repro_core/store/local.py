"""Content-addressed blob store on a local (or mounted) filesystem.

The store root looks like this; only ``blobs/`` and ``tmp/`` belong to this module::

    <root>/                      $REPRO_HOME, default ./repro_store
    ├── CACHEDIR.TAG             tells backup tools this is a cache
    ├── registry.sqlite          (registry/)
    ├── blobs/
    │   └── blake3/
    │       └── ab/
    │           └── cdef…        immutable, read-only, named by the digest of its bytes
    ├── tmp/
    │   └── <pid>-<token>.part   writers in flight, each flock()ed by its writer
    ├── cache/                   what use_artifact hands out; rebuildable (_cache.py)
    │   ├── identity/…           each blob's inode/size/mtime/ctime when last known good
    │   ├── files/…, trees/…     named read-only hard links, directory generations
    │   └── copies/…             private writable copies (copy mode)
    └── runs/<run_id>/           human-readable exports (manager.py)

Every blob is written as: unique temp file in ``tmp/`` (same filesystem, so the rename is
atomic) → hash while writing → fsync → ``os.replace`` into ``blobs/`` → fsync the directory.
A reader therefore sees either no blob or a complete one, also after ``kill -9`` or a power cut.
A temp file whose flock can be taken belongs to a dead writer and is swept when the store opens.
Publishing bytes that are already stored keeps the existing blob (same inode) when its identity
shows it unwritten since it was last known good, and replaces it otherwise (see ``_publish``).
Nothing under ``blobs/`` is ever handed out directly: ``check`` verifies, ``_cache`` serves.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from .. import _fsio, constants
from .._safepath import real_dirs
from ..errors import ArtifactNotFoundError, IntegrityError, StorageError
from ..hashing import copy_and_hash, hash_file, new_hasher, parse_digest, update_while_writing
from . import _gc_lock, _identity
from ._stream import check_expected_size, read_fd_chunks, receive_into, wrong_size
from ._tmp import is_stale_temp, new_locked_temp
from ._tmp import remove_entry as _remove_entry
from .base import StorageBackend

__all__ = ["BlobWriter", "LocalStorageBackend", "is_stale_temp", "new_locked_temp"]

_T = TypeVar("_T")
_DIGEST = re.compile(r"(blake3|sha256):[0-9a-f]{64}")
_SHARD = re.compile(r"[0-9a-f]{2}")
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
        # A big chunk (a checkpoint's tensor) is hashed in another thread while written.
        update_while_writing(self._hasher, view, lambda: _storage_errors(
            "writing a blob", self.temp_path, lambda: _fsio.write_all(self._fd, view)))
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
        self, cache_dir: str | Path = "./artifact_cache", *, algorithm: str | None = None,
        cachedir_tag: bool = True,
    ) -> None:
        """``cachedir_tag=False``: no ``CACHEDIR.TAG`` (a remote's directory is the durable
        shared copy: backup tools must not skip it)."""
        self.root = Path(cache_dir).expanduser().absolute()
        self.algorithm = algorithm or constants.REPRO_HASH
        new_hasher(self.algorithm)  # validates the name before any I/O
        self.blobs_dir = self.root / "blobs"
        self.tmp_dir = self.root / "tmp"
        self._layout_ready = False
        self._cachedir_tag = cachedir_tag

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

    def download(self, content_hash: str, target_path: Path, *,
                 expected_size: int | None = None) -> Path:
        """Copy the blob to ``target_path`` atomically, re-hashing it on the way: a corrupt
        blob is an ``IntegrityError`` (target untouched), a missing one an
        ``ArtifactNotFoundError``. With ``expected_size``, a blob of another size is refused
        before a byte is copied, and no more than ``expected_size + 1`` bytes are ever read."""
        expected_size = check_expected_size(expected_size)
        source = self.blob_path(content_hash)
        try:  # O_NOFOLLOW: a symlink planted in blobs/ is never served; O_NONBLOCK: nor a
            # FIFO (whose open would block for ever), refused below with any non-file
            fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"blob {content_hash} is not in {self.blobs_dir}",
                                        key=content_hash) from None
        except OSError as exc:
            raise StorageError(f"reading blob {content_hash} failed: {exc}", path=source,
                               errno=exc.errno) from exc
        try:
            self._check_readable(fd, source, content_hash, expected_size)
            limit = None if expected_size is None else expected_size + 1
            return receive_into(target_path, _read_blob(fd, source, limit), content_hash,
                                source=f"blob {content_hash} at {source}",
                                expected_size=expected_size)
        except IntegrityError:
            _identity.forget(self.root, content_hash)  # so re-logging the bytes repairs it
            raise
        finally:
            os.close(fd)

    @staticmethod
    def _check_readable(fd: int, source: Path, content_hash: str,
                        expected_size: int | None) -> None:
        """A regular file (not a device, FIFO or socket), of the expected size if one is
        known: checked before the target side is touched at all."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(f"{source} is not a regular file (a device, FIFO or "
                                 "socket planted in the store?); nothing is read from it",
                                 digest=content_hash, path=source)
        if expected_size is not None and st.st_size != expected_size:
            raise wrong_size(f"blob {content_hash} at {source}", content_hash, expected_size,
                             st.st_size)

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
        """Every blob in the store. Symlinks are never followed (a planted ``blobs/blake3/aa ->
        /elsewhere`` would let gc delete files outside the store) nor listed."""
        real_dirs(self.root, "blobs")
        for algo_dir in sorted(self.blobs_dir.glob("*")):
            if algo_dir.is_symlink() or not algo_dir.is_dir():
                continue
            for shard in sorted(algo_dir.glob("??")):
                if shard.is_symlink() or not shard.is_dir():
                    continue
                for blob in sorted(shard.iterdir()):
                    digest = f"{algo_dir.name}:{shard.name}{blob.name}"
                    if not blob.is_symlink() and _DIGEST.fullmatch(digest):
                        yield digest  # (a stray .DS_Store or editor file is not a blob)

    # -- derived operations -----------------------------------------------------------------

    def open_writer(self) -> BlobWriter:
        """A :class:`BlobWriter` for write-once content."""
        return BlobWriter(self)

    def has_blob(self, content_hash: str, size: int) -> bool:
        """Whether a good copy of this blob is stored: a regular file of ``size`` bytes whose
        identity vouches for it (unwritten since last known good). Only reads: the caller
        holds ``publish_guard`` until its row commits, so gc cannot take the blob meanwhile
        (no mtime refresh needed). A chunk writer skips writing a part that is stored."""
        path = self.blob_path(content_hash)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise StorageError(f"checking blob {content_hash} failed: {exc}", path=path,
                               errno=exc.errno) from exc
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        known = _identity.load(self.root, content_hash)
        return known is not None and known.vouches_for(st)

    def stage(self, data: memoryview) -> BlobWriter:
        """A temp file holding ``data``, not hashed here: the caller hashed these very bytes
        and publishes them with ``publish_staged``. (Hashing first lets a chunk writer skip
        the write of a part that is already stored.)"""
        writer = BlobWriter(self)
        try:
            _storage_errors("writing a blob", writer.temp_path,
                            lambda: _fsio.write_all(writer._fd, data))
        except BaseException:
            writer.abort()
            raise
        writer._size = len(data)
        return writer

    def publish_staged(self, writer: BlobWriter, digest: str, *,
                       sync_dir: bool = True) -> tuple[str, int]:
        """Publish a ``stage``d temp file as the blob ``digest`` (durably, as ``commit``).
        ``sync_dir=False``: the caller fsyncs the shard directory later (``sync_dirs``), once
        for many blobs, before anything refers to them."""
        self._publish(writer, digest, writer._size, sync_dir=sync_dir)
        return digest, writer._size

    def sync_dirs(self, digests: Iterable[str]) -> None:
        """fsync the shard directory of each blob once (after ``sync_dir=False`` publishes)."""
        shards = sorted({self.blob_path(d).parent for d in digests})

        def _sync() -> None:
            for shard in shards:
                _fsio.fsync_dir(shard)

        _storage_errors("syncing blob directories", self.blobs_dir, _sync)

    def ingest_file(self, file_path: Path) -> tuple[str, int]:
        """Copy a file into the store while hashing it (one read); return ``(digest, size)``."""
        with self.open_writer() as writer:
            self._copy_file_into(writer, Path(file_path))
            return writer.commit()

    def check(self, content_hash: str, size: int, *, full: bool = True,
              identity: bool = True) -> Path:
        """Check a blob's size (always) and digest (``full``); return its path or raise.

        ``full=False`` still re-hashes when the blob's identity (inode, size, mtime, ctime)
        is not the one recorded when it was last known good (``store/_identity.py``): a write
        into a served path — a hard link to this very inode — is caught without hashing every
        blob on every use. A good hash records the identity; a bad one forgets it, so that
        re-logging the same bytes replaces (repairs) the blob. ``identity=False`` makes
        ``full=False`` a plain size check (``repro verify`` without hashing).
        """
        path = self.blob_path(content_hash)
        seen = self._blob_stat(content_hash, path, size)
        known = _identity.load(self.root, content_hash) if identity else None
        vouched = known is not None and known.vouches_for(seen)
        if not full and (vouched or not identity):
            return path
        actual = hash_file(path, parse_digest(content_hash)[0])
        if actual != content_hash:
            _identity.forget(self.root, content_hash)
            raise IntegrityError(
                f"blob {content_hash} is corrupt: its content hashes to {actual}",
                digest=content_hash,
                path=path,
                expected=content_hash,
                actual=actual,
            )
        if identity and not vouched:
            _identity.remember(self.root, content_hash, path, seen)
        return path

    def _blob_stat(self, content_hash: str, path: Path, size: int) -> os.stat_result:
        """``lstat`` of a blob that exists, is a regular file (never a link someone planted:
        serving it would hand out, and let users write to, whatever it points at) and has
        ``size`` bytes."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise IntegrityError(
                f"blob {content_hash} is missing from {self.blobs_dir}",
                digest=content_hash, path=path, expected=size, actual=None,
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise IntegrityError(
                f"blob {content_hash} at {path} is not a regular file (a symlink or special "
                "file someone put in the store); delete it and log the content again",
                digest=content_hash, path=path, expected="regular file", actual="other")
        if st.st_size != size:
            raise IntegrityError(
                f"blob {content_hash} has {st.st_size} bytes, expected {size}: it is corrupt",
                digest=content_hash, path=path, expected=size, actual=st.st_size,
            )
        return st

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
        real_dirs(self.root, "tmp")  # a planted tmp -> /home/you would be swept
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
        steps (when the row is not there yet) and deletes it under a writer's feet
        (``_gc_lock.py``)."""
        self.ensure_layout()
        with _gc_lock.hold(self.root / ".gc.lock", exclusive=exclusive):
            yield

    def ensure_layout(self) -> None:
        """Create the directory skeleton and CACHEDIR.TAG (idempotent)."""
        if self._layout_ready:
            return

        def _make() -> None:
            algo_dir = self.blobs_dir / self.algorithm
            self._check_top_dirs()  # before creating anything: mkdir follows a planted link
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
            self._check_shards()
            tag = self.root / "CACHEDIR.TAG"
            if self._cachedir_tag and not tag.exists():
                # (a temp name outside tmp/, so no sweep can take it)
                tmp = self.root / f".CACHEDIR.TAG.{os.getpid()}.{secrets.token_hex(4)}"
                tmp.write_text(_CACHEDIR_TAG)
                os.replace(tmp, tag)

        _storage_errors("creating the store layout", self.root, _make)
        self._layout_ready = True

    def _check_top_dirs(self) -> None:
        """Every directory of the layout must be a real directory: see
        ``_safepath.real_dirs``."""
        for top in ("tmp", "cache", "runs", "spill"):
            real_dirs(self.root, top)
        real_dirs(self.root, "blobs", self.algorithm)

    def _check_shards(self) -> None:
        """So must each blob shard, where blobs are published and deleted (one scan)."""
        with os.scandir(self.blobs_dir / self.algorithm) as entries:
            for entry in entries:
                if _SHARD.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
                    real_dirs(self.blobs_dir / self.algorithm, entry.name)  # raises

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

    def _publish(self, writer: BlobWriter, digest: str, size: int, *,
                 sync_dir: bool = True) -> None:
        """fsync → read-only → rename into place → fsync dir; or keep an existing good blob.

        Dedup keeps the blob that is there when its identity is still the one recorded when it
        was last known good (unwritten since): renaming fresh bytes over it would give it a new
        inode, so every hard link the cache handed out would go stale and directory trees would
        be rebuilt on every re-log. Otherwise (no record, a write since, content known bad) our
        verified bytes are renamed over it — atomic, and it repairs a rotted blob. Either way
        the blob's mtime is refreshed, which keeps gc's grace period honest, and its identity
        recorded.
        """
        final = self.blob_path(digest)

        def _do() -> None:
            if self._keep_existing(final, digest, size):
                writer.abort()  # our temp copy is identical and not needed
                if sync_dir:
                    _fsio.fsync_dir(final.parent)  # the kept entry is durable before the row
                return
            _fsio.fsync(writer._fd)
            os.fchmod(writer._fd, 0o444)
            try:
                _fsio.replace(writer.temp_path, final)
            except FileNotFoundError:  # shard removed by hand: recreate it durably
                final.parent.mkdir(parents=True, exist_ok=True)
                _fsio.fsync_dir(final.parent.parent)
                _fsio.replace(writer.temp_path, final)
            writer._close_fd()
            if sync_dir:
                _fsio.fsync_dir(final.parent)
            published = _identity.backdated(final)
            if published is not None:
                _identity.save(self.root, digest, published)

        try:
            _storage_errors("publishing a blob", final, _do)
        except BaseException:
            writer.abort()
            raise

    def _keep_existing(self, final: Path, digest: str, size: int) -> bool:
        try:
            st = os.lstat(final)
        except FileNotFoundError:
            return False
        known = _identity.load(self.root, digest)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size or known is None \
                or not known.vouches_for(st):
            return False
        fresh = _identity.backdated(final)  # fresh for gc; None: not ours to touch → replace
        if fresh is None:
            return False
        _identity.save(self.root, digest, fresh)
        return True


def stored_algorithm(root: Path) -> str | None:
    """The digest algorithm of the blobs a store already holds (None when it holds none): a
    registry rebuilt or forced over existing blobs must keep it."""
    for name in constants.HASH_ALGORITHMS:
        shards = root / "blobs" / name
        if shards.is_dir() and not shards.is_symlink() and any(
                any(True for _ in d.iterdir()) for d in shards.iterdir()
                if d.is_dir() and not d.is_symlink()):
            return name
    return None


def _read_blob(fd: int, path: Path, limit: int | None = None) -> Iterator[memoryview]:
    try:
        yield from read_fd_chunks(fd, limit)
    except OSError as exc:
        raise StorageError(f"reading {path} failed: {exc}", path=path, errno=exc.errno) from exc
