"""What the blob store asks of S3 beyond fsspec: our mark on objects, streamed reads, sweeps.

- **The mark.** Every object we publish carries ``x-amz-meta-repro-digest: <digest>``, set
  by the upload that hashed the bytes before publishing them (``PutObject`` or
  ``CreateMultipartUpload``). An object of the right size *without* it proves nothing (anyone
  with write access can put 4 GB of zeros under a digest's key), so ``upload`` skips only
  objects that carry the mark and ``exists`` answers yes only for them. The mark is not a
  signature: what keeps a download honest is still the digest, checked as it streams.
- **Streamed reads.** ``S3Stream`` reads an object through one ``GetObject`` whose body is
  consumed ``chunk`` bytes at a time (a broken stream resumes from the byte it stopped at).
  Its range ends one byte past the size we expect: a larger object costs us that one byte
  before it is refused, never its whole size. One request per object, not one per chunk:
  servers that load the whole object for every ranged GET (moto does) would otherwise make a
  download quadratic in the object's size.
- **Sweeps.** A killed upload leaves a multipart upload that no listing of objects shows but
  that is billed for its parts; ``sweep_uploads`` aborts those older than a cutoff.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._remote import Retrying

__all__ = ["DIGEST_KEY", "Head", "S3Stream", "head", "sweep_uploads"]

#: User-metadata key of our mark (S3 sends it as the header ``x-amz-meta-repro-digest``).
DIGEST_KEY = "repro-digest"


@dataclass(frozen=True)
class Head:
    """What a ``HeadObject`` says about one object: its size and our mark, if it has one."""

    size: int
    digest: str | None

    def is_blob(self, digest: str, size: int | None = None) -> bool:
        """Whether this object was published by a verified upload of ``digest``."""
        return self.digest == digest and (size is None or self.size == size)


def head(fs: Any, path: str) -> Head | None:
    """``HeadObject`` of ``bucket/key`` (one attempt; the caller retries); None if absent."""
    bucket, key, _ = fs.split_path(path)
    try:
        out = fs.call_s3("head_object", Bucket=bucket, Key=key)
    except FileNotFoundError:
        return None
    metadata = {str(k).lower(): v for k, v in (out.get("Metadata") or {}).items()}
    return Head(int(out["ContentLength"]), metadata.get(DIGEST_KEY))


class S3Stream:
    """Bytes ``[0, size]`` of one object (``size + 1`` at most), ``chunk`` bytes at a time.

    Iterate once, then ``close()`` (also after an error: the connection goes back or is
    dropped). Each chunk is a view of one reused buffer, valid until the next one is asked
    for. A failed read is retried by ``retry`` from the byte it stopped at, with a new
    ``GetObject`` whose range starts there.
    """

    def __init__(self, fs: Any, path: str, retry: Retrying, *, size: int, chunk: int) -> None:
        self._fs, self._retry = fs, retry
        self._bucket, self._key, _ = fs.split_path(path)
        self._size = size
        self._buffer = memoryview(bytearray(max(1, min(chunk, size + 1))))
        self._body: Any = None
        self._have = 0  # bytes in the buffer from an attempt that broke off
        self._ended = size == 0  # (an empty object: nothing to ask for)

    def __iter__(self) -> Iterator[memoryview]:
        offset = 0
        while True:
            got = self._retry("downloading a blob", functools.partial(self._read, offset))
            if not got:
                return
            offset += got
            yield self._buffer[:got]

    def close(self) -> None:
        """Drop the response, on the event loop's thread (its connection is the loop's: a
        read interrupted by Ctrl-C may still be running there)."""
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):
                self._fs.loop.call_soon_threadsafe(body.close)

    def _read(self, offset: int) -> int:
        """Fill the buffer with the bytes from ``offset`` on; 0 at the end of the object.

        An attempt that broke off keeps what it had put in the buffer (``_have``): the next
        one asks for the rest only, from the first byte not yet received. Nothing past the
        probe byte is read, even from a server that ignored the range.
        """
        room = min(len(self._buffer), self._size + 1 - offset)
        if room <= 0:
            self.close()
            return 0
        if self._body is None:
            position = offset + self._have
            if self._ended or position >= self._size:  # (past the size: only the probe byte
                got, self._have = self._have, 0  # was lost with a connection)
                return got
            out = self._fs.call_s3("get_object", Bucket=self._bucket, Key=self._key,
                                   Range=f"bytes={position}-{self._size}")
            self._body = out["Body"]
        filled = [self._have]
        try:
            from fsspec.asyn import sync

            ended: bool = sync(self._fs.loop, _fill, self._body, self._buffer[:room], filled)
        except BaseException:
            self._have = filled[0]
            self.close()  # the next attempt opens a fresh stream where this one stopped
            raise
        if ended:  # the object ended (a short one is the digest's to refuse)
            self._ended = True
            self.close()
        self._have = 0
        return filled[0]


async def _fill(body: Any, buffer: memoryview, filled: list[int]) -> bool:
    """Fill ``buffer`` from a streaming body, counting in ``filled[0]`` (which survives an
    error); whether the body ended first."""
    while filled[0] < len(buffer):
        n = await body.readinto(buffer[filled[0]:])
        if not n:
            return True
        filled[0] += n
    return False


def sweep_uploads(fs: Any, retry: Retrying, bucket: str, prefix: str,
                  older_than: float) -> int:
    """Abort the multipart uploads under ``prefix`` started over ``older_than`` s ago."""
    cutoff = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
        seconds=older_than)
    stale = [u for u in _uploads(fs, retry, bucket, prefix) if u["Initiated"] <= cutoff]
    aborted = 0
    for upload in stale:
        try:
            retry("aborting a multipart upload", functools.partial(
                fs.call_s3, "abort_multipart_upload", Bucket=bucket, Key=upload["Key"],
                UploadId=upload["UploadId"]))
        except FileNotFoundError:  # completed or aborted since the listing
            continue
        aborted += 1
    return aborted


def _uploads(fs: Any, retry: Retrying, bucket: str, prefix: str) -> list[dict[str, Any]]:
    """Every pending multipart upload under ``prefix`` (all pages)."""
    found: list[dict[str, Any]] = []
    page: dict[str, str] = {"Bucket": bucket, "Prefix": prefix}
    while True:
        out = retry("listing multipart uploads",
                    functools.partial(fs.call_s3, "list_multipart_uploads", **page))
        found.extend(out.get("Uploads") or [])
        if not out.get("IsTruncated"):
            return found
        page = {**page, "KeyMarker": out["NextKeyMarker"],
                "UploadIdMarker": out["NextUploadIdMarker"]}
