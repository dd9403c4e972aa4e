"""Streaming content digests: ``blake3:<64 hex>`` (default) or ``sha256:<64 hex>``.

Digests are self-describing strings so a store can hold either and a key can name one by prefix.
Files are hashed in one pass: BLAKE3 through ``mmap`` with every core on big files (it is a tree
hash, parallel inside one file), SHA-256 with 16 MiB ``readinto`` calls (``hashlib`` releases the
GIL on big buffers). Memory stays flat whatever the file size.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import re
import threading
from collections.abc import Callable
from typing import Protocol

from . import _progress, constants
from .errors import InvalidArgumentError

__all__ = [
    "Hasher",
    "copy_and_hash",
    "hash_bytes",
    "hash_file",
    "new_hasher",
    "parse_digest",
]

_DIGEST_RE = re.compile(r"(blake3|sha256):([0-9a-f]{64})")


class Hasher(Protocol):
    """What every incremental hasher offers (``hashlib`` and ``blake3`` both fit)."""

    def update(self, data: bytes | bytearray | memoryview, /) -> object: ...
    def hexdigest(self) -> str: ...


class _Digester:
    """An incremental hasher that knows its algorithm name and returns prefixed digests."""

    __slots__ = ("_h", "algorithm")

    def __init__(self, algorithm: str, *, parallel: bool) -> None:
        self.algorithm = _check_algorithm(algorithm)
        if algorithm == "blake3":
            import blake3

            threads = blake3.blake3.AUTO if parallel and not _forked else 1
            self._h: Hasher = blake3.blake3(max_threads=threads)
        else:
            self._h = hashlib.sha256()

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)

    def update_file(self, path: str | os.PathLike[str]) -> None:
        """Feed a whole file (mmap for BLAKE3, big reads otherwise)."""
        if self.algorithm == "blake3" and os.path.getsize(path) > 0:
            self._h.update_mmap(os.fspath(path))  # type: ignore[attr-defined]
            return
        with open(path, "rb", buffering=0) as f:
            _feed_fd(self, f.fileno())

    def digest(self) -> str:
        return f"{self.algorithm}:{self._h.hexdigest()}"


# BLAKE3's threads come from a process-wide pool (rayon) that a fork() does not copy: in a
# forked child whose parent had hashed in parallel, a parallel update waits forever for
# workers that do not exist. Forked children hash on one thread.
_forked = False


def _after_fork_in_child() -> None:
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


_OVERLAP_BYTES = 4 << 20
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def update_while_writing(hasher: _Digester, view: memoryview,
                         write: Callable[[], object]) -> None:
    """``hasher.update(view)`` and ``write()`` (which writes ``view`` somewhere), overlapped
    for big chunks: BLAKE3 and ``write(2)`` both release the GIL, so hashing a checkpoint's
    tensor in another thread while it is written hides the hashing time instead of adding
    it. Both are done when this returns (the caller may reuse its buffer); a failed write's
    error is the one raised. Small chunks, forked children and an interpreter that is
    shutting down (no new threads) do the two in turn."""
    pool = _hash_pool() if len(view) >= _OVERLAP_BYTES else None
    future = None
    if pool is not None:
        with contextlib.suppress(RuntimeError):  # "cannot schedule new futures after shutdown"
            future = pool.submit(hasher.update, view)
    if future is None:
        hasher.update(view)
        write()
        return
    try:
        write()
    except BaseException:
        with contextlib.suppress(BaseException):
            future.result()
        raise
    future.result()


def _hash_pool() -> concurrent.futures.ThreadPoolExecutor | None:
    global _pool
    if _forked:
        return None  # (its thread pool would not exist in the child)
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="repro-hash")
        return _pool


def new_hasher(algorithm: str = "blake3", *, parallel: bool = False) -> _Digester:
    """An incremental hasher; ``parallel=True`` lets BLAKE3 use every core per update."""
    return _Digester(algorithm, parallel=parallel)


def hash_bytes(data: bytes | bytearray | memoryview, algorithm: str = "blake3") -> str:
    """Digest of an in-memory buffer."""
    h = new_hasher(algorithm, parallel=len(data) >= constants.PARALLEL_HASH_MIN)
    h.update(data)
    return h.digest()


def hash_file(path: str | os.PathLike[str], algorithm: str = "blake3") -> str:
    """Digest of a file in one streaming pass with flat memory (reported to the progress bar
    of the operation, when one is shown: then fed in slices instead of one call)."""
    size = os.path.getsize(path)
    h = new_hasher(algorithm, parallel=size >= constants.PARALLEL_HASH_MIN)
    if _progress.active() and size > 0:
        with open(path, "rb", buffering=0) as f:
            _feed_fd(h, f.fileno(), report=_progress.report)
        return h.digest()
    h.update_file(path)
    return h.digest()


def parse_digest(digest: object) -> tuple[str, str]:
    """Split ``algo:hex`` into its parts, or raise ``InvalidArgumentError``."""
    if isinstance(digest, str):
        match = _DIGEST_RE.fullmatch(digest)
        if match:
            return match.group(1), match.group(2)
    raise InvalidArgumentError(
        f"invalid digest {digest!r}: expected 'blake3:<64 hex>' or 'sha256:<64 hex>'",
        argument="content_hash",
    )


def copy_and_hash(src_fd: int, dst_fd: int, hasher: _Digester, copy: _CopyFn, *,
                  start: int = 0) -> int:
    """Copy ``src_fd`` into ``dst_fd`` and hash exactly the bytes that landed in ``dst_fd``.

    The copy runs in the kernel (``copy_file_range``, as ``cp`` does: no trip through user
    space); each copied chunk is then hashed from the destination's page cache in a worker
    thread while the next chunk is copied, so the total time is about that of ``cp``. Hashing
    the destination (not the source) means a source file that changes while it is logged can
    never produce a blob that mismatches its digest. ``dst_fd`` must be opened for reading too.
    Memory: one chunk buffer. ``start``: where ``dst_fd``'s offset is when called (a file
    written in several calls, as chunked content is put back together).
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    chunk = constants.IO_CHUNK
    view = memoryview(bytearray(chunk))
    offset = start
    pending: Future[None] | None = None

    def hash_region(start: int, length: int) -> None:
        got = 0
        while got < length:
            n = os.preadv(dst_fd, [view[got:length]], start + got)
            if n == 0:
                raise OSError(f"destination shrank while hashing at offset {start + got}")
            got += n
        hasher.update(view[:length])

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="repro-hash") as pool:
        while True:
            n = _copy_full(src_fd, dst_fd, chunk, copy)
            if pending is not None:
                pending.result()
            if n == 0:
                break
            pending = pool.submit(hash_region, offset, n)
            offset += n
            _progress.report(n)
    return offset - start


class _CopyFn(Protocol):
    def __call__(self, src_fd: int, dst_fd: int, count: int, /) -> int: ...


def _copy_full(src_fd: int, dst_fd: int, count: int, copy: _CopyFn) -> int:
    """Copy up to ``count`` bytes (the kernel may copy less per call); 0 means end of file."""
    done = 0
    while done < count:
        n = copy(src_fd, dst_fd, count - done)
        if n == 0:
            break
        done += n
    return done


def readinto_full(fd: int, view: memoryview) -> int:
    """Fill ``view`` as far as the file allows (``readv`` may return short counts)."""
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return got


def _feed_fd(hasher: _Digester, fd: int, report: Callable[[int], None] | None = None) -> None:
    buf = bytearray(constants.IO_CHUNK)
    view = memoryview(buf)
    while True:
        n = readinto_full(fd, view)
        if n == 0:
            return
        hasher.update(view[:n])
        if report is not None:
            report(n)


def _check_algorithm(algorithm: str) -> str:
    if algorithm not in constants.HASH_ALGORITHMS:
        raise InvalidArgumentError(
            f"unknown hash algorithm {algorithm!r}; expected one of "
            f"{', '.join(constants.HASH_ALGORITHMS)}",
            argument="algorithm",
        )
    return algorithm

