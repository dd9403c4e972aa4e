"""How a remote object is written so that nobody ever sees it incomplete.

Each sink lends the backend a free buffer (``buffer``), takes the file block by block in such
buffers (``write``), then either publishes it (``commit``) or throws everything away
(``abort``); the backend hashes every block on its way in and commits only when the digest
matches. Buffers are reused, never allocated per block: the memory an upload holds is the
sink's buffers, whatever the file size and whatever the allocator does with freed blocks.

- ``S3Sink``: one ``PutObject`` for a file of at most one block, else a multipart upload:
  S3 shows the object only at ``CompleteMultipartUpload``, and ``AbortMultipartUpload`` drops
  the parts. Up to ``concurrency`` parts are in flight at once (a thread each, all through
  s3fs's one event loop), from ``concurrency + 1`` buffers of one block: the parts in flight
  and the block being read. Both kinds of request carry our mark (``_blob_s3.py``).
  A killed process leaves an incomplete upload that no listing shows;
  ``FsspecStorageBackend.sweep_uploads`` (or a bucket lifecycle rule
  ``AbortIncompleteMultipartUpload``) reclaims it.
- ``BufferedFileSink`` (``gs://`` and other object stores): the filesystem's own buffered
  writer, committed by ``close()`` and ``discard()``ed otherwise; never used as a context
  manager, whose ``__exit__`` would commit a half-written file on an exception.

A ``CompleteMultipartUpload`` whose answer is lost (a reset after the server did the work) must
not turn into a failure, nor into a blind retry: S3 answers a repeated complete with
``NoSuchUpload`` once the first one went through. So after a failed attempt we look first:
the object there with our size and mark means the earlier attempt worked; else an upload that
is still pending is completed again, and one that is gone is a ``StorageError`` that says so.
"""

from __future__ import annotations

import contextlib
import io
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol, cast

from ..errors import StorageError
from . import _blob_s3
from ._remote import Retrying

__all__ = ["BufferedFileSink", "S3Sink", "Sink"]


class Sink(Protocol):
    def buffer(self) -> memoryview: ...
    def write(self, block: memoryview) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class _Stopped(Exception):
    """A part request not sent because the upload is being aborted (never surfaces)."""


class S3Sink:
    """Parts of exactly the caller's block size (the last may be smaller), up to
    ``concurrency`` at a time. Every request goes through the backend's retry loop."""

    def __init__(self, fs: Any, path: str, retry: Retrying, *, block_size: int, digest: str,
                 size: int, concurrency: int) -> None:
        self._fs, self._retry, self._path = fs, retry, path
        self._bucket, self._key, _ = fs.split_path(path)
        self._block_size = block_size
        self._multipart = size > block_size
        self._digest, self._size, self._concurrency = digest, size, concurrency
        self._free: list[bytearray] = []
        self._buffers = 0  # made so far, at most concurrency + 1
        self._held: memoryview | None = None  # a one-block file, sent by commit() as one PUT
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._next_part = 1
        self._pool: ThreadPoolExecutor | None = None
        self._running: set[Future[tuple[dict[str, Any], memoryview]]] = set()
        self._stopping = threading.Event()

    def buffer(self) -> memoryview:
        """A block-sized buffer no part in flight uses (waits for one to finish if need be)."""
        while not self._free and self._running and self._buffers > self._concurrency:
            self._collect(wait(self._running, return_when=FIRST_COMPLETED).done)
        if self._free:
            return memoryview(self._free.pop())
        self._buffers += 1
        return memoryview(bytearray(self._block_size))

    def write(self, block: memoryview) -> None:
        if not self._multipart and self._held is None and self._upload_id is None:
            self._held = block
            return
        if self._upload_id is None:  # (also when a "one block" file grew while being read)
            self._start()
            held, self._held = self._held, None
            if held is not None:
                self._submit(held)
        self._submit(block)

    def commit(self) -> None:
        if self._upload_id is None:
            block, self._held = self._held or memoryview(b""), None
            self._call("uploading", "put_object", body=block, Bucket=self._bucket,
                       Key=self._key, Metadata=self._mark())
            return
        self._drain()
        self._complete()
        self._upload_id = None
        self._close_pool(cancel=False)

    def abort(self) -> None:
        """Stop sending, wait for the parts in flight, drop the upload (best effort: a failure
        here must not hide the original error)."""
        self._held = None
        self._stopping.set()
        self._close_pool(cancel=True)
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            with contextlib.suppress(Exception):
                self._call("aborting a multipart upload", "abort_multipart_upload",
                           Bucket=self._bucket, Key=self._key, UploadId=upload_id)

    # -- parts ------------------------------------------------------------------------------

    def _start(self) -> None:
        self._upload_id = self._call("starting a multipart upload", "create_multipart_upload",
                                     Bucket=self._bucket, Key=self._key,
                                     Metadata=self._mark())["UploadId"]
        self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="repro-s3-part")

    def _submit(self, block: memoryview) -> None:
        """Send ``block`` as the next part once fewer than ``concurrency`` are in flight; a
        part that failed meanwhile raises here (the caller then aborts)."""
        while len(self._running) >= self._concurrency:
            self._collect(wait(self._running, return_when=FIRST_COMPLETED).done)
        self._collect({f for f in self._running if f.done()})
        number, self._next_part = self._next_part, self._next_part + 1
        assert self._pool is not None
        self._running.add(self._pool.submit(self._send_part, number, block))

    def _drain(self) -> None:
        while self._running:
            self._collect(wait(self._running, return_when=FIRST_COMPLETED).done)

    def _collect(self, done: set[Future[tuple[dict[str, Any], memoryview]]]) -> None:
        for future in done:
            self._running.discard(future)
            part, block = future.result()  # a part's error is raised here
            self._parts.append(part)
            self._free.append(cast(bytearray, block.obj))  # the buffer is free again

    def _send_part(self, number: int, block: memoryview
                   ) -> tuple[dict[str, Any], memoryview]:
        out = self._call(f"uploading part {number}", "upload_part", body=block,
                         stoppable=True, Bucket=self._bucket, Key=self._key,
                         UploadId=self._upload_id, PartNumber=number)
        return {"PartNumber": number, "ETag": out["ETag"]}, block

    def _close_pool(self, *, cancel: bool) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=cancel)
        self._running.clear()

    # -- completing -------------------------------------------------------------------------

    def _complete(self) -> None:
        parts = sorted(self._parts, key=lambda p: int(p["PartNumber"]))
        tried = [False]

        def attempt() -> None:
            if tried[0]:  # the last attempt may have worked and only its answer been lost
                if self._published():
                    return
                self._check_pending()
            tried[0] = True
            try:
                self._fs.call_s3("complete_multipart_upload", Bucket=self._bucket,
                                 Key=self._key, UploadId=self._upload_id,
                                 MultipartUpload={"Parts": parts})
            except FileNotFoundError as exc:  # NoSuchUpload: completed before, or aborted
                if not self._published():
                    raise self._gone() from exc

        self._retry("completing a multipart upload", attempt)

    def _published(self) -> bool:
        """Whether the object under our key is this blob, published by a verified upload."""
        found = _blob_s3.head(self._fs, self._path)
        return found is not None and found.is_blob(self._digest, self._size)

    def _check_pending(self) -> None:
        try:
            self._fs.call_s3("list_parts", Bucket=self._bucket, Key=self._key,
                             UploadId=self._upload_id, MaxParts=1)
        except FileNotFoundError as exc:
            raise self._gone() from exc

    def _gone(self) -> StorageError:
        return StorageError(
            f"completing the upload of s3://{self._path} failed: the multipart upload is gone "
            "(aborted by sweep_uploads or a lifecycle rule, or completed and then replaced) "
            "and the object there is not this blob; nothing was published, upload again",
            path=f"s3://{self._path}")

    # -- requests ---------------------------------------------------------------------------

    def _mark(self) -> dict[str, str]:
        return {_blob_s3.DIGEST_KEY: self._digest}

    def _call(self, what: str, method: str, *, body: memoryview | None = None,
              stoppable: bool = False, **kwargs: Any) -> Any:
        """One request, retried. A body is a fresh reader at every attempt, with its length
        given: an attempt that failed half-way must never make the next send only the rest
        (botocore reads the length from the reader's position), which S3 would accept.
        ``stoppable``: not (re)tried once the upload is being aborted."""
        def attempt() -> Any:
            if stoppable and self._stopping.is_set():
                raise _Stopped(what)
            if body is not None:
                kwargs.update(Body=_BlockReader(body), ContentLength=len(body))
            return self._fs.call_s3(method, **kwargs)

        return self._retry(what, attempt)


class _BlockReader(io.RawIOBase):
    """One block as a read-only, seekable file, so the HTTP layer streams it in small pieces.

    Memory: the block, once. A ``bytes`` Body is copied whole into the socket transport's
    buffer, and a ``BytesIO`` whole by aiohttp (its ``getbuffer()`` unshares the bytes): either
    doubles the peak. botocore rewinds the body (checksum, then send): hence ``seek``.
    """

    def __init__(self, block: memoryview) -> None:
        self._view = block.cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        buffer[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


class BufferedFileSink:
    """The filesystem's own writer (gcsfs: a resumable upload, visible only once closed)."""

    def __init__(self, fs: Any, path: str, block_size: int) -> None:
        self._file = fs.open(path, "wb", block_size=block_size)
        self._buffer = memoryview(bytearray(block_size))

    def buffer(self) -> memoryview:
        """One buffer, reused: ``write`` copies the block into the file's own buffer."""
        return self._buffer

    def write(self, block: memoryview) -> None:
        self._file.write(block)

    def commit(self) -> None:
        self._file.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._file.discard()
        self._file.closed = True  # so that __del__ does not close (= commit) it
