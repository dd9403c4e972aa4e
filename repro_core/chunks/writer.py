"""Writing chunked content: parts hashed from memory, written only when not already stored.

``PartWriter`` takes a file's bytes part by part, in order. Every byte goes through two hashes
at once — the whole file's (the version's digest) and its part's (the blob's name) — on two
threads, so the second hash costs little wall time. A part whose blob is already stored (a
frozen layer saved again) is never written: that is what makes the tenth checkpoint of a
fine-tune cheap in time as well as in bytes. A new part is written to a temp file and
published (fsync, rename) by a small pool in the background while the next parts are hashed.

Only after every part is durable is the manifest published: a crash at any point leaves no
manifest that names a missing blob (orphan parts are what ``repro gc`` removes).

A part that arrives in pieces (a stream cut by the caller) is gathered in memory up to
``_GATHER_MAX`` bytes; a bigger one streams through a ``BlobWriter`` (hashed while written;
an already stored copy is kept at publish and the temp file dropped).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import StorageError
from ..hashing import hash_bytes, new_hasher
from ..store.local import BlobWriter, LocalStorageBackend
from .manifest import ChunkManifest, Part, encode

__all__ = ["PartWriter", "Stored"]

_GATHER_MAX = 64 << 20  # a part up to this size arriving in pieces is gathered in memory
_IN_FLIGHT = 32  # new parts written but not yet published (each holds a temp file open)
_OVERLAP_MIN = 1 << 20  # smaller parts: both hashes in turn (a thread hop costs more)


@dataclass(frozen=True)
class Stored:
    """What the registry records for chunked content."""

    digest: str  # the whole file's
    size: int
    manifest: str  # the manifest blob's digest
    blobs: list[tuple[str, int]]  # every part blob once, then the manifest


class PartWriter:
    """Collects one file's parts in order; ``finish()`` publishes the manifest."""

    def __init__(self, store: LocalStorageBackend, method: str) -> None:
        self._store = store
        self._method = method
        self._algorithm = store.algorithm
        self._whole = new_hasher(store.algorithm, parallel=True)
        self._size = 0
        self._parts: list[Part | tuple[concurrent.futures.Future[tuple[str, int]],
                                       tuple[str, ...]]] = []
        self._publishing: list[concurrent.futures.Future[tuple[str, int]]] = []
        self._handled: set[str] = set()  # part digests seen (stored or being published)
        self._inflight = threading.BoundedSemaphore(_IN_FLIGHT)
        self._stream: BlobWriter | None = None
        self._stream_names: tuple[str, ...] = ()
        self._gather: bytearray | None = None

    # -- a part in one piece ------------------------------------------------------------------

    def add(self, data: bytes | bytearray | memoryview, tensors: tuple[str, ...] = ()) -> None:
        """One whole part. ``data`` is only read during the call (the caller may reuse it)."""
        view = memoryview(data).cast("B")
        if not view:
            return
        digest = self._hash_both(view)
        self._size += len(view)
        self._parts.append(Part(digest, len(view), tensors))
        if digest in self._handled or self._store.has_blob(digest, len(view)):
            self._handled.add(digest)
            return
        self._handled.add(digest)
        self._inflight.acquire()  # bounded: open temp files and dirty pages
        try:
            staged = self._store.stage(view)
        except BaseException:
            self._inflight.release()
            raise
        self._publishing.append(_submit("publish", self._publish, staged, digest))

    def _publish(self, staged: BlobWriter, digest: str) -> tuple[str, int]:
        """fsync + rename now; the shard directories are synced once, in ``finish``."""
        try:
            return self._store.publish_staged(staged, digest, sync_dir=False)
        finally:
            self._inflight.release()

    def _hash_both(self, view: memoryview) -> str:
        """The part's digest, while the whole-file hash takes the same bytes on another
        thread (BLAKE3 releases the GIL). Both are done when this returns."""
        if len(view) < _OVERLAP_MIN:
            self._whole.update(view)
            return hash_bytes(view, self._algorithm)
        future = _submit("hash", self._whole.update, view)
        try:
            return hash_bytes(view, self._algorithm)
        finally:
            future.result()

    # -- a part in pieces ---------------------------------------------------------------------

    def begin(self, size: int, tensors: tuple[str, ...] = ()) -> None:
        """Start a part of ``size`` bytes that will come in pieces (``feed``, then ``end``)."""
        self._stream_names = tensors
        if size <= _GATHER_MAX:
            self._gather = bytearray()
        else:
            self._stream = self._store.open_writer()

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        if self._gather is not None:
            self._gather += view
            return
        assert self._stream is not None
        stream = self._stream
        _overlap(lambda: self._whole.update(view), lambda: stream.write(view))
        self._size += len(view)

    def end(self) -> None:
        if self._gather is not None:
            gathered, self._gather = self._gather, None
            self.add(gathered, self._stream_names)
            return
        stream, self._stream = self._stream, None
        assert stream is not None
        if stream.tell() == 0:
            stream.abort()
            return
        self._parts.append((_submit("publish", stream.commit), self._stream_names))

    # -- the end --------------------------------------------------------------------------------

    def finish(self) -> Stored:
        """Wait until every part is durable, then publish the manifest."""
        self._drain()
        parts = tuple(p if isinstance(p, Part) else Part(*p[0].result(), p[1])
                      for p in self._parts)
        if not parts:  # (a file that shrank to nothing while read): never a manifest
            raise StorageError("the content ended before its first byte was stored; log it "
                               "again once it is complete")
        # every part's directory entry durable before the manifest can name it: ours (their
        # directories were not synced when published) and those found stored (another
        # writer may have published one the same way, not synced yet)
        self._store.sync_dirs(self._handled)
        manifest = ChunkManifest(method=self._method, digest=self._whole.digest(),
                                 size=self._size, parts=parts)
        with self._store.open_writer() as writer:
            writer.write(encode(manifest))
            manifest_digest, manifest_size = writer.commit()
        return Stored(digest=manifest.digest, size=manifest.size, manifest=manifest_digest,
                      blobs=[*manifest.blobs(), (manifest_digest, manifest_size)])

    def abort(self) -> None:
        """Drop what is not published yet; published parts are orphans for ``repro gc``."""
        if self._stream is not None:
            self._stream.abort()
            self._stream = None
        for part in self._parts:
            if not isinstance(part, Part):
                self._publishing.append(part[0])
        self._drain(quiet=True)

    def _drain(self, *, quiet: bool = False) -> None:
        pending, self._publishing = self._publishing, []
        first: BaseException | None = None
        for future in pending:
            try:
                future.result()
            except BaseException as exc:
                first = first or exc
        if first is not None and not quiet:
            raise first


def _overlap(first: Callable[[], object], second: Callable[[], object]) -> None:
    """Run both, ``first`` on a pool thread; both done when this returns."""
    future = _submit("hash", first)
    try:
        second()
    finally:
        future.result()


_pools: dict[str, concurrent.futures.ThreadPoolExecutor] = {}
_pools_pid = 0
_pools_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A fork while another thread held the lock would leave it held for ever in the child
    (an async checkpoint thread forking a data loader worker): make a fresh one."""
    global _pools_lock
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
_POOL_SIZES = {"hash": 2, "publish": 4}  # fsyncs overlap well (one journal commit serves many)


def _submit(kind: str, fn: Callable[..., object],
            *args: object) -> concurrent.futures.Future:  # type: ignore[type-arg]
    """Run on the ``hash`` or ``publish`` pool (separate, so a slow fsync never delays the
    whole-file hash; a forked child makes its own). An interpreter shutting down refuses new
    threads: then run here, at once."""
    global _pools_pid
    with _pools_lock:
        if _pools_pid != os.getpid():
            _pools.clear()
            _pools_pid = os.getpid()
        pool = _pools.get(kind)
        if pool is None:
            pool = _pools[kind] = concurrent.futures.ThreadPoolExecutor(
                _POOL_SIZES[kind], thread_name_prefix=f"repro-{kind}")
    try:
        return pool.submit(fn, *args)
    except RuntimeError:
        future: concurrent.futures.Future = concurrent.futures.Future()  # type: ignore[type-arg]
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future
