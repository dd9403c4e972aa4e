"""How a remote object is written so that nobody ever sees it incomplete.

Each sink takes the file block by block (``write``), then either publishes it (``commit``) or
throws everything away (``abort``); the backend hashes every block on its way in and commits
only when the digest matches.

- ``S3Sink``: one ``PutObject`` for a file of at most one block, else a multipart upload:
  S3 shows the object only at ``CompleteMultipartUpload``, and ``AbortMultipartUpload`` drops
  the parts. A killed process leaves an incomplete upload that no listing shows (a bucket
  lifecycle rule ``AbortIncompleteMultipartUpload`` reclaims its space).
- ``BufferedFileSink`` (``gs://`` and other object stores): the filesystem's own buffered
  writer, committed by ``close()`` and ``discard()``ed otherwise; never used as a context
  manager, whose ``__exit__`` would commit a half-written file on an exception.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Protocol

from ._remote import Retrying

__all__ = ["BufferedFileSink", "S3Sink", "Sink"]


class Sink(Protocol):
    def write(self, block: bytes) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...


class S3Sink:
    """Parts of exactly ``block_size`` bytes (the last may be smaller), one at a time: memory
    holds the block being sent. Every request goes through the backend's retry loop."""

    def __init__(self, fs: Any, path: str, retry: Retrying, *, multipart: bool) -> None:
        self._fs, self._retry = fs, retry
        self._bucket, self._key, _ = fs.split_path(path)
        self._multipart = multipart  # the file is bigger than one block
        self._held: bytes | None = None  # else its one block, sent by commit() as one PUT
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def write(self, block: bytes) -> None:
        if not self._multipart and self._held is None and self._upload_id is None:
            self._held = block
            return
        if self._upload_id is None:  # (also when a "one block" file grew while being read)
            self._upload_id = self._call("starting a multipart upload", "create_multipart_upload",
                                         Bucket=self._bucket, Key=self._key)["UploadId"]
            held, self._held = self._held, None
            if held is not None:
                self._send_part(held)
        self._send_part(block)

    def commit(self) -> None:
        if self._upload_id is None:
            block = self._held or b""
            self._call("uploading", "put_object", Bucket=self._bucket, Key=self._key,
                       body=block)
            self._held = None
            return
        self._call("completing a multipart upload", "complete_multipart_upload",
                   Bucket=self._bucket, Key=self._key, UploadId=self._upload_id,
                   MultipartUpload={"Parts": self._parts})
        self._upload_id = None

    def abort(self) -> None:
        """Drop the parts (best effort: a failure here must not hide the original error)."""
        self._held = None
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            with contextlib.suppress(Exception):
                self._call("aborting a multipart upload", "abort_multipart_upload",
                           Bucket=self._bucket, Key=self._key, UploadId=upload_id)

    def _send_part(self, block: bytes) -> None:
        number = len(self._parts) + 1
        out = self._call(f"uploading part {number}", "upload_part", Bucket=self._bucket,
                         Key=self._key, UploadId=self._upload_id, PartNumber=number,
                         body=block)
        self._parts.append({"PartNumber": number, "ETag": out["ETag"]})

    def _call(self, what: str, method: str, *, body: bytes | None = None,
              **kwargs: Any) -> Any:
        """One request, retried. A body is a fresh reader at every attempt, with its length
        given: an attempt that failed half-way must never make the next send only the rest
        (botocore reads the length from the reader's position), which S3 would accept."""
        def attempt() -> Any:
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

    def __init__(self, block: bytes) -> None:
        self._view = memoryview(block)
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

    def write(self, block: bytes) -> None:
        self._file.write(block)

    def commit(self) -> None:
        self._file.close()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self._file.discard()
        self._file.closed = True  # so that __del__ does not close (= commit) it
