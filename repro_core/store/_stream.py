"""Downloads every backend shares: stream into a temp file beside the target, verify, rename.

The target appears only complete and verified: bytes go to ``.<name>.<token>.part`` in the
target's directory (same filesystem, so the rename is atomic) while they are hashed; a digest
mismatch, an error or an interrupt (Ctrl-C) deletes the temp file and leaves the target as it
was. Only a ``kill -9`` can leave the dot-named ``.part`` behind, never a partial target.

A caller that knows the blob's size (a registry row says it) passes ``expected_size``: the
source then asks for at most ``expected_size + 1`` bytes (one more, to see that there are more),
and ``receive_into`` stops at the first byte past the size. A forged huge object under a
digest costs one byte of excess, not a full disk before the digest check fails.
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .. import constants
from ..errors import IntegrityError, InvalidArgumentError, StorageError
from ..hashing import new_hasher, parse_digest, readinto_full, update_while_writing

__all__ = ["check_expected_size", "read_fd_chunks", "receive_into", "wrong_size"]


def check_expected_size(expected_size: object) -> int | None:
    """``download(…, expected_size=)`` is None or a whole number of bytes (before any I/O)."""
    if expected_size is None:
        return None
    if isinstance(expected_size, bool) or not isinstance(expected_size, int) \
            or expected_size < 0:
        raise InvalidArgumentError(f"expected_size must be a whole number of bytes >= 0 or "
                                   f"None, got {expected_size!r}", argument="expected_size")
    return expected_size


def wrong_size(source: str, content_hash: str, expected: int, actual: int | str
               ) -> IntegrityError:
    """The error for a stored object whose size is not the one recorded for its digest."""
    return IntegrityError(f"{source} holds {actual} bytes, not the {expected} recorded for "
                          f"{content_hash}: it is not that blob (damaged or forged); "
                          "refused", digest=content_hash, path=source,
                          expected=expected, actual=actual)


def receive_into(target_path: Path, chunks: Iterable[bytes | bytearray | memoryview],
                 content_hash: str, *, source: str, expected_size: int | None = None) -> Path:
    """Write ``chunks`` to ``target_path`` atomically, refusing bytes that do not hash to
    ``content_hash`` (``IntegrityError``, nothing at the target). ``source`` names where the
    bytes came from, for messages; with ``expected_size``, a chunk that takes the total past it
    stops the transfer at once. Memory: the caller's chunk, nothing more."""
    algorithm, _ = parse_digest(content_hash)
    target = Path(target_path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
    hasher = new_hasher(algorithm, parallel=True)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StorageError(f"creating {tmp} failed: {exc}", path=tmp, errno=exc.errno) from exc
    try:
        try:
            total = 0
            for chunk in chunks:  # a source's own errors pass through as the source raised them
                view = memoryview(chunk).cast("B")
                total += len(view)
                if expected_size is not None and total > expected_size:
                    raise wrong_size(source, content_hash, expected_size,
                                     f"more than {expected_size}")
                update_while_writing(hasher, view, functools.partial(_write_target, fd, view,
                                                                     target))
        finally:
            os.close(fd)
        if expected_size is not None and total != expected_size:
            raise wrong_size(source, content_hash, expected_size, total)
        actual = hasher.digest()
        if actual != content_hash:
            raise IntegrityError(
                f"{source} is corrupt: its bytes hash to {actual}, not {content_hash}; "
                f"nothing was written to {target}",
                digest=content_hash, path=source, expected=content_hash, actual=actual)
        _sink(target, lambda: os.replace(tmp, target))
    except BaseException:  # IntegrityError, any error, KeyboardInterrupt: no partial file
        _discard(tmp)
        raise
    return target


def read_fd_chunks(fd: int, limit: int | None = None) -> Iterator[memoryview]:
    """The file behind ``fd`` in ``IO_CHUNK`` slices of one reused buffer (flat memory);
    never more than ``limit`` bytes in all, when given."""
    buffer = memoryview(bytearray(constants.IO_CHUNK if limit is None
                                  else max(1, min(constants.IO_CHUNK, limit))))
    left = limit
    while left is None or left > 0:
        view = buffer if left is None else buffer[:left]
        got = readinto_full(fd, view)
        if got == 0:
            return
        yield view[:got]
        if got < len(view):
            return
        if left is not None:
            left -= got


def _write_target(fd: int, view: memoryview, target: Path) -> None:
    _sink(target, lambda: _write(fd, view))


def _write(fd: int, view: memoryview) -> None:
    """One chunk to the temp file (a function of its own so tests can fail it mid-stream)."""
    while view:
        view = view[os.write(fd, view):]


def _sink(target: Path, fn: Callable[[], object]) -> None:
    """Run a write to the target side, translating ``OSError`` (disk full, permission)."""
    try:
        fn()
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"writing {target} failed: {exc}", path=target,
                           errno=exc.errno) from exc


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
