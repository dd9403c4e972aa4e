"""Chunked logging of a file (``file_path=``) and of a safetensors stream (``data=``).

Both read every byte once, into memory they own, and hash and write from there: a source file
that changes while it is logged yields parts that match their digests and a whole-file digest
that matches the parts (a mix of old and new bytes, but never a blob that lies), as the
whole-file path guarantees by hashing what it wrote.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

from ..errors import SerializationError, StorageError
from ..store.local import BlobWriter, LocalStorageBackend
from .split import cdc_chunks, header_length, plan_tensor_parts
from .writer import _GATHER_MAX, PartWriter, Stored

__all__ = ["SafetensorsSink", "ingest_file"]

_READ = 16 << 20


def ingest_file(store: LocalStorageBackend, path: Path, min_bytes: int | None) -> Stored | None:
    """Store ``path`` chunked when it is at least ``min_bytes`` long (None: never); None
    means "store it whole" (the caller does)."""
    if min_bytes is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}", path=path, errno=exc.errno) from exc
    try:
        size = os.fstat(fd).st_size
        if size < min_bytes:
            return None
        plan = _safetensors_plan(fd, size)
        writer = PartWriter(store, "tensors" if plan is not None else "cdc")
        try:
            if plan is not None:
                _copy_planned(fd, path, writer, plan)
            else:
                with io.FileIO(fd, "rb", closefd=False) as stream:
                    for chunk in cdc_chunks(stream):
                        writer.add(chunk)
                _same_size(fd, path, size)
            return writer.finish()
        except BaseException:
            writer.abort()
            raise
    except OSError as exc:
        raise StorageError(f"logging {path} failed: {exc}", path=path, errno=exc.errno) from exc
    finally:
        os.close(fd)


def _safetensors_plan(fd: int, size: int) -> list[tuple[int, tuple[str, ...]]] | None:
    """Header part + tensor parts when the file is a valid safetensors file, else None."""
    length = header_length(os.pread(fd, 8, 0), size)
    if length is None:
        return None
    header = _pread_full(fd, 8 + length, 0)
    tensors = plan_tensor_parts(header, size - 8 - length)
    return None if tensors is None else [(8 + length, ()), *tensors]


def _copy_planned(fd: int, path: Path, writer: PartWriter,
                  plan: list[tuple[int, tuple[str, ...]]]) -> None:
    buffer = bytearray()
    offset = 0
    for size, names in plan:
        if size <= _GATHER_MAX:
            if len(buffer) < size:
                buffer = bytearray(size)
            view = memoryview(buffer)[:size]
            _readinto_full(fd, view, offset, path)
            writer.add(view, names)
        else:
            writer.begin(size, names)
            done = 0
            while done < size:
                piece = bytearray(min(_READ, size - done))
                _readinto_full(fd, memoryview(piece), offset + done, path)
                writer.feed(piece)
                done += len(piece)
            writer.end()
        offset += size
    _same_size(fd, path, offset)


def _same_size(fd: int, path: Path, size: int) -> None:
    if os.fstat(fd).st_size != size:
        raise StorageError(f"{path} changed size while it was logged; log it again once it "
                           "is complete", path=path)


def _pread_full(fd: int, count: int, offset: int) -> bytes:
    buffer = bytearray(count)
    _readinto_full(fd, memoryview(buffer), offset, None)
    return bytes(buffer)


def _readinto_full(fd: int, view: memoryview, offset: int, path: Path | None) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            raise StorageError(f"{path or 'the file'} shrank while it was logged (at byte "
                               f"{offset + got}); log it again once it is complete", path=path)
        got += n


class SafetensorsSink:
    """The sink a safetensors ``Payload`` writes into: chunked when its header says the file
    is at least ``min_bytes`` (and is valid), one blob otherwise. The header is gathered
    first; after it, each write is cut at the planned part boundaries — a serializer that
    writes one tensor per call hands every big part over whole, hashed straight from the
    tensor's memory and never copied."""

    def __init__(self, store: LocalStorageBackend, min_bytes: int | None) -> None:
        self._store = store
        self._min = min_bytes
        self._head = bytearray()
        self._plain: BlobWriter | None = None
        self._parts: PartWriter | None = None
        self._plan: list[tuple[int, tuple[str, ...]]] = []
        self._left = 0  # bytes still due in the current part (0: between parts)
        self._in_part = False
        self._extra = False  # bytes came after the last declared tensor

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if self._plain is None and self._parts is None:
            view = self._take_head(view)
        if self._plain is not None:
            self._plain.write(view)
        elif self._parts is not None:
            self._cut(view)
        return len(memoryview(data).cast("B"))

    def _take_head(self, view: memoryview) -> memoryview:
        """Gather the header; once complete (or impossible), choose how to store."""
        while True:
            need = self._head_need()
            if need is None or len(self._head) >= need:
                self._choose(valid=need is not None)
                return view
            if not view:
                return view
            take = min(len(view), need - len(self._head))
            self._head += view[:take]
            view = view[take:]

    def _head_need(self) -> int | None:
        """Bytes the header takes (8 until its length is known); None: not safetensors."""
        if len(self._head) < 8:
            return 8
        length = header_length(bytes(self._head[:8]), None)
        return None if length is None else 8 + length

    def _choose(self, *, valid: bool) -> None:
        plan = plan_tensor_parts(bytes(self._head), None) if valid else None
        total = len(self._head) + sum(size for size, _ in plan or ())
        if plan is None or self._min is None or total < self._min:
            self._plain = self._store.open_writer()
            self._plain.write(self._head)
            return
        self._parts = PartWriter(self._store, "tensors")
        self._parts.add(self._head)
        self._plan = list(reversed(plan))

    def _cut(self, view: memoryview) -> None:
        writer = self._parts
        assert writer is not None
        while view:
            if not self._in_part:
                if self._plan:
                    size, names = self._plan.pop()
                else:  # more bytes than the header declares: refused at commit
                    self._extra = True
                    return
                if len(view) >= size:  # the whole part in this write: no copy
                    writer.add(view[:size], names)
                    view = view[size:]
                    continue
                writer.begin(size, names)
                self._in_part, self._left = True, size
            take = min(self._left, len(view))
            writer.feed(view[:take])
            view, self._left = view[take:], self._left - take
            if self._left == 0:
                writer.end()
                self._in_part = False

    def commit(self) -> tuple[str, int, Stored | None]:
        """``(digest, size, chunked)``: ``chunked`` is None when stored as one blob."""
        if self._plain is None and self._parts is None:
            self._choose(valid=False)  # shorter than a header: one blob, whatever it is
        if self._plain is not None:
            digest, size = self._plain.commit()
            return digest, size, None
        assert self._parts is not None
        if self._in_part or self._plan or self._extra:
            problem = "fewer bytes than it declares" if self._in_part or self._plan \
                else "bytes after its last tensor"
            raise SerializationError(
                f"the safetensors content written does not match its own header ({problem}); "
                "the writer of this Payload is broken — nothing was logged", path="data")
        stored = self._parts.finish()
        return stored.digest, stored.size, stored

    def abort(self) -> None:
        if self._plain is not None:
            self._plain.abort()
        if self._parts is not None:
            self._parts.abort()
