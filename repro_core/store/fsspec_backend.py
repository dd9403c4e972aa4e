"""Blob store on any fsspec filesystem: ``s3://bucket/prefix`` (s3fs), ``gs://…``, ``file:///…``.

The layout under the prefix is the local store's (``store/local.py``), so a remote can be
pushed to, pulled from and compared key by key::

    s3://bucket/prefix/
    ├── blobs/
    │   └── blake3/
    │       └── ab/
    │           └── cdef…        one object per digest, visible only complete
    └── tmp/                     (file:// only) uploads in flight, renamed into blobs/

``file://`` goes through ``LocalStorageBackend`` (same layout): a local directory gets the
local store's defences against planted symlinks and its crash-safe publishing.

Every upload is hashed while it streams and published only when the digest matches
(``_uploads.py`` says how each kind of store keeps partial objects invisible; on S3 up to
``max_concurrency`` parts go up at once); every download is hashed while it streams into a temp
file beside the target and renamed only when it matches (``_stream.py``). Memory holds about
``max_concurrency + 1`` blocks on the way up and one read chunk on the way down, whatever the
file size. On S3 each published object carries our mark (``_blob_s3.py``): an object without
it is never taken for a blob, whatever its size.

Credentials are never ours: s3fs/botocore find them through the standard provider chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, an
instance or container role; ``AWS_ENDPOINT_URL`` for S3-compatible servers), and nothing of
them is stored, logged or put in a message. Transient failures are retried with backoff
(``REPRO_REMOTE_RETRIES``, ``REPRO_REMOTE_BACKOFF``); everything else is one ``StorageError``
naming the URL and what to fix.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from .. import constants
from ..errors import (
    ArtifactNotFoundError,
    IntegrityError,
    InvalidArgumentError,
    ReproError,
    StorageError,
)
from ..hashing import new_hasher, parse_digest, readinto_full
from . import _blob_s3
from ._blob_config import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CONCURRENCY,
    check_block_size,
    check_concurrency,
    filesystem_options,
)
from ._remote import Retrying, import_filesystem, parse_url
from ._stream import check_expected_size, receive_into, wrong_size
from ._uploads import BufferedFileSink, S3Sink, Sink
from .base import StorageBackend
from .local import LocalStorageBackend

__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_CONCURRENCY", "FsspecStorageBackend"]

_MIB = 1024 * 1024
_S3_MAX_PARTS = 10_000
_BLOB = re.compile(r"(blake3|sha256)/([0-9a-f]{2})/([0-9a-f]{62})")
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError",
                      "CredentialRetrievalError", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


class _Chunks(Protocol):
    """A blob's bytes in chunks, to be closed once read (or abandoned)."""

    def __iter__(self) -> Iterator[bytes | memoryview]: ...
    def close(self) -> None: ...


class FsspecStorageBackend(StorageBackend):
    """Content-addressed blobs under a URL prefix, through fsspec (s3fs for ``s3://``).

    ``storage_options`` go to the fsspec filesystem (e.g. ``{"endpoint_url": …}`` or
    ``{"client_kwargs": {"region_name": …}}``); ``block_size`` is the multipart part size
    (default 16 MiB, raised automatically so a file never needs more than 10,000 parts);
    ``max_concurrency`` bounds the parts in flight at once (default 4; memory holds about
    ``max_concurrency + 1`` blocks); ``retries`` / ``backoff`` bound the retries of transient
    failures.
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None,
                 block_size: int | None = None, retries: int | None = None,
                 backoff: float | None = None, max_concurrency: int | None = None) -> None:
        self.location = parse_url(url)
        self.url = self.location.url
        self.block_size = check_block_size(block_size)
        self.max_concurrency = check_concurrency(max_concurrency)
        self._retry = Retrying(self.url, retries, backoff)
        self._options = filesystem_options(self.location.protocol, storage_options)
        self._lock = threading.Lock()
        self._fs_obj: Any = None
        self._pid = -1
        self._checked = False
        # file:// is a local directory: the local store's primitives (no-follow opens, checked
        # directories, flocked temp files that are swept, fsync + rename) make it safe against
        # planted symlinks and crashes, as fsspec's LocalFileSystem (shutil.move) is not.
        self._local = LocalStorageBackend(self.location.root, cachedir_tag=False) \
            if self.location.protocol == "file" else None
        self._fs()  # a missing fsspec / s3fs is reported now, not at the first upload

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (a DataLoader worker, a spawned rank): the filesystem is made again."""
        state = self.__dict__.copy()
        state.update(_lock=None, _fs_obj=None, _pid=-1, _checked=False)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- primitives -------------------------------------------------------------------------

    def blob_key(self, content_hash: str) -> str:
        """The fsspec path of the blob named ``content_hash`` (checked before any I/O)."""
        algorithm, hexdigest = parse_digest(content_hash)
        return f"{self.location.root}/blobs/{algorithm}/{hexdigest[:2]}/{hexdigest[2:]}"

    def exists(self, content_hash: str) -> bool:
        """Whether the blob is stored. On S3: an object under its key that carries our mark
        (one without it may be anything, and ``upload`` will replace it)."""
        key = self.blob_key(content_hash)
        if self._local is not None:
            return self._local.exists(content_hash)
        if self.location.protocol == "s3":
            found = self._head(key)
            return found is not None and found.is_blob(content_hash)
        return self._stat(key) is not None

    def upload(self, file_path: Path, content_hash: str) -> str:
        """Stream ``file_path`` up while hashing it; return the blob's URL.

        An S3 object already there with the file's size *and our mark* for this digest is
        kept (no transfer; the file is still hashed, so content that is not ``content_hash``
        is refused all the same). Anything else under the key (a same-size object without the
        mark, a truncated one) is replaced by a verified upload; so is any object on stores
        that keep no mark (``gs://``: every upload transfers).
        """
        key = self.blob_key(content_hash)
        path = Path(file_path)
        if self._local is not None:
            self._local.upload(path, content_hash)
            return f"file://{key}"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}", path=path, errno=exc.errno) from exc
        try:
            size = os.fstat(fd).st_size
            if self._holds_blob(key, content_hash, size):
                hasher = new_hasher(parse_digest(content_hash)[0], parallel=True)
                buffer = memoryview(bytearray(constants.IO_CHUNK))
                while got := _read_into(fd, path, buffer):
                    hasher.update(buffer[:got])
                _check_upload(path, hasher.digest(), content_hash)
            else:
                self._send(fd, path, size, key, content_hash)
        finally:
            os.close(fd)
        return f"{self.location.scheme}://{key}"

    def download(self, content_hash: str, target_path: Path, *,
                 expected_size: int | None = None) -> Path:
        """Stream the blob into ``target_path`` (temp file + rename), verifying its digest.

        ``expected_size`` (the size a registry row records): an object of another size is an
        ``IntegrityError`` before any byte is transferred (nothing at the target), and no more
        than ``expected_size + 1`` bytes are ever read from the remote.
        """
        key = self.blob_key(content_hash)
        expected_size = check_expected_size(expected_size)
        if self._local is not None:
            return self._local.download(content_hash, target_path, expected_size=expected_size)
        source = f"{self.location.scheme}://{key}"
        chunks = self._open_blob(key, content_hash, expected_size)
        try:
            return receive_into(target_path, self._translated(chunks, "downloading a blob"),
                                content_hash, source=source, expected_size=expected_size)
        finally:
            chunks.close()

    def delete(self, content_hash: str) -> bool:
        key = self.blob_key(content_hash)
        if self._local is not None:
            return self._local.delete(content_hash)
        if self._stat(key) is None:
            return False
        with self._errors("deleting a blob"):
            try:
                self._retry("deleting a blob", lambda: self._fs().rm_file(key))
            except FileNotFoundError:
                return False
        return True

    def iter_digests(self) -> Iterator[str]:
        """Every complete blob; anything else under ``blobs/`` (a stray file) is skipped."""
        if self._local is not None:
            yield from self._local.iter_digests()
            return
        self._ensure_location()
        base = f"{self.location.root}/blobs"
        with self._errors("listing blobs"):
            try:
                found = self._retry("listing blobs", lambda: self._fs().find(base))
            except FileNotFoundError:
                return
        for path in sorted(found):
            match = _BLOB.fullmatch(path[len(base) + 1:]) if path.startswith(base + "/") else None
            if match:
                yield f"{match.group(1)}:{match.group(2)}{match.group(3)}"

    def verify(self, content_hash: str) -> None:
        """Re-hash the stored object as it streams (nothing written locally)."""
        key = self.blob_key(content_hash)
        if self._local is not None:
            self._local.verify(content_hash)
            return
        try:
            chunks = self._open_blob(key, content_hash, None)
        except ArtifactNotFoundError:
            raise IntegrityError(f"blob {content_hash} is missing from {self.url}",
                                 digest=content_hash, path=self.url, expected=content_hash,
                                 actual=None) from None
        hasher = new_hasher(parse_digest(content_hash)[0], parallel=True)
        try:
            for chunk in self._translated(chunks, "verifying a blob"):
                hasher.update(chunk)
        finally:
            chunks.close()
        actual = hasher.digest()
        if actual != content_hash:
            raise IntegrityError(f"blob {content_hash} at {self.url} is corrupt: its content "
                                 f"hashes to {actual}", digest=content_hash, path=self.url,
                                 expected=content_hash, actual=actual)

    def sweep_uploads(self, older_than: float = 86400.0) -> int:
        """Abort the multipart uploads under this store's ``blobs/`` that were started more
        than ``older_than`` seconds ago; return how many were aborted.

        A killed ``upload`` leaves its parts behind, billed but invisible to every listing of
        objects. ``older_than`` must outlast the slowest upload in flight (another process's
        would fail at its end: ``0`` aborts every pending upload). Stores without multipart
        uploads (``file://``, ``gs://``) have nothing to sweep: 0.
        """
        if isinstance(older_than, bool) or not isinstance(older_than, (int, float)) \
                or not 0 <= older_than < math.inf:
            raise InvalidArgumentError(f"older_than must be seconds >= 0, got {older_than!r}",
                                       argument="older_than")
        if self.location.protocol != "s3":
            return 0
        self._ensure_location()
        bucket, _, prefix = self.location.root.partition("/")
        with self._errors("sweeping abandoned uploads"):
            return _blob_s3.sweep_uploads(self._fs(), self._retry, bucket,
                                          f"{prefix}/blobs/" if prefix else "blobs/",
                                          float(older_than))

    # -- internals --------------------------------------------------------------------------

    def _fs(self) -> Any:
        """The filesystem, made again in a forked child (an async client's event loop does
        not survive a fork; fsspec refuses to use it there)."""
        with self._lock:
            if self._fs_obj is None or self._pid != os.getpid():
                fs = import_filesystem(self.location, self._options)
                if self.location.protocol == "s3":
                    fs.retries = 1  # s3fs's own retry loop off: ours (Retrying) is the bound
                self._fs_obj, self._pid = fs, os.getpid()
            return self._fs_obj

    def _ensure_location(self) -> None:
        """Once per backend: the bucket exists and we may use it. Without this a missing
        bucket would look like an empty store (every ``exists`` False)."""
        if self._checked or self.location.protocol == "file":
            return
        bucket = self.location.bucket
        with self._errors("opening the store"):
            try:
                if self.location.protocol == "s3":
                    # (ListObjectsV2 under our prefix, not HeadBucket: a bucket shared by
                    # teams often grants ListBucket for one prefix only)
                    prefix = self.location.root.partition("/")[2]
                    self._retry("checking the bucket", lambda: self._fs().call_s3(
                        "list_objects_v2", Bucket=bucket, MaxKeys=1,
                        **({"Prefix": prefix + "/"} if prefix else {})))
                else:
                    self._retry("checking the bucket", lambda: self._fs().info(bucket))
            except FileNotFoundError:
                raise StorageError(
                    f"bucket {bucket!r} of {self.url} does not exist: create it (for S3: "
                    f"aws s3 mb {self.location.scheme}://{bucket}) or fix the URL",
                    path=self.url) from None
        self._checked = True

    def _stat(self, key: str) -> dict[str, Any] | None:
        self._ensure_location()
        with self._errors("looking up a blob"):
            try:
                info = self._retry("looking up a blob", lambda: self._fs().info(key))
            except FileNotFoundError:
                return None
        return info if info.get("type") == "file" else None

    def _head(self, key: str) -> _blob_s3.Head | None:
        """S3 only: the object's size and our mark (``HeadObject``), or None."""
        self._ensure_location()
        with self._errors("looking up a blob"):
            return self._retry("looking up a blob", lambda: _blob_s3.head(self._fs(), key))

    def _holds_blob(self, key: str, content_hash: str, size: int) -> bool:
        """Whether an upload may be skipped: only for an object a verified upload of this
        digest published (S3: our mark and the file's size)."""
        if self.location.protocol != "s3":
            self._ensure_location()
            return False
        found = self._head(key)
        return found is not None and found.is_blob(content_hash, size)

    def _open_blob(self, key: str, content_hash: str, expected_size: int | None) -> _Chunks:
        """The blob's bytes, never more than one past ``expected_size`` (or, without one,
        past the size the store reports when the read starts); a size that is not the
        expected one is refused here, before any byte is read."""
        if self.location.protocol == "s3":
            found = self._head(key)
            if found is None:
                raise ArtifactNotFoundError(f"blob {content_hash} is not in {self.url}",
                                            key=content_hash)
            size = found.size
            stream: _Chunks = _blob_s3.S3Stream(self._fs(), key, self._retry, size=size,
                                                chunk=constants.REMOTE_READ_CHUNK)
        else:
            remote = self._open_read(key, content_hash)
            size = int(getattr(remote, "size", None) or 0)
            stream = _FileStream(remote, self._retry, size + 1)
        if expected_size is not None and size != expected_size:
            stream.close()
            raise wrong_size(f"{self.location.scheme}://{key}", content_hash, expected_size,
                             size)
        return stream

    def _open_read(self, key: str, content_hash: str) -> Any:
        self._ensure_location()
        with self._errors("opening a blob"):
            try:
                return self._retry("opening a blob", lambda: self._fs().open(
                    key, "rb", block_size=constants.REMOTE_READ_CHUNK, cache_type="none"))
            except FileNotFoundError:
                raise ArtifactNotFoundError(f"blob {content_hash} is not in {self.url}",
                                            key=content_hash) from None

    def _translated(self, chunks: Iterable[bytes | memoryview], what: str
                    ) -> Iterator[bytes | memoryview]:
        """``chunks`` with a library's errors turned into ``StorageError`` (see ``_errors``)."""
        with self._errors(what):
            yield from chunks

    def _send(self, fd: int, path: Path, size: int, key: str, content_hash: str) -> None:
        """Hash each block as it goes up; publish only if the digest matches."""
        hasher = new_hasher(parse_digest(content_hash)[0], parallel=True)
        block_size = max(self.block_size, math.ceil(size / _S3_MAX_PARTS / _MIB) * _MIB)
        with self._errors("starting an upload"):
            sink = self._open_sink(key, size, block_size, content_hash)
        try:
            with self._errors("uploading a blob"):
                while True:
                    buffer = sink.buffer()
                    got = _read_into(fd, path, buffer)
                    if got:
                        hasher.update(buffer[:got])
                        sink.write(buffer[:got])
                    if got < len(buffer):  # the end of the file
                        break
            _check_upload(path, hasher.digest(), content_hash)
            with self._errors("uploading a blob"):
                sink.commit()
        except BaseException:  # a mismatch, an error, Ctrl-C: the parts are dropped
            sink.abort()
            raise
        self._check_published(key, size, content_hash)

    def _check_published(self, key: str, size: int, content_hash: str) -> None:
        """What the store holds now has the file's size (a request that sent less than its
        block would otherwise leave a short object under the digest) and, on S3, our mark:
        else it is removed."""
        if self.location.protocol == "s3":
            found = self._head(key)
            if found is not None and found.is_blob(content_hash, size):
                return
            held = None if found is None else found.size
        else:
            info = self._stat(key)
            if info is not None and info.get("size") == size:
                return
            held = None if info is None else info.get("size")
        with contextlib.suppress(Exception):
            self._fs().rm_file(key)
        raise IntegrityError(f"{self.location.scheme}://{key} holds {held} bytes (or lacks "
                             f"the mark of this digest) after the upload, not {size}; "
                             "removed, upload again", digest=content_hash)

    def _open_sink(self, key: str, size: int, block_size: int, content_hash: str) -> Sink:
        fs, protocol = self._fs(), self.location.protocol
        if protocol == "s3":
            return S3Sink(fs, key, self._retry, block_size=block_size, digest=content_hash,
                          size=size, concurrency=self.max_concurrency)
        return BufferedFileSink(fs, key, block_size)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """The boundary: a library's error becomes one ``StorageError`` naming the URL."""
        try:
            yield
        except ReproError:
            raise
        except Exception as exc:
            raise self._translate(what, exc) from exc

    def _translate(self, what: str, exc: Exception) -> StorageError:
        names = {cls.__name__ for cls in type(exc).__mro__}
        if isinstance(exc, PermissionError) or names & _CREDENTIAL_ERRORS:
            where = ("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance "
                     "role" if self.location.protocol == "s3" else "the provider's settings")
            return StorageError(
                f"{what} at {self.url}: access denied ({type(exc).__name__}: {exc}); check "
                f"the credentials ({where}) and that they may use this bucket",
                path=self.url, errno=getattr(exc, "errno", None))
        return StorageError(f"{what} at {self.url} failed: {type(exc).__name__}: {exc}",
                            path=self.url, errno=getattr(exc, "errno", None))


class _FileStream:
    """A file of any fsspec filesystem, ``REMOTE_READ_CHUNK`` at a time and ``limit`` bytes at
    most; a failed read is retried from the same offset (the position moves on success)."""

    def __init__(self, remote: Any, retry: Retrying, limit: int) -> None:
        self._remote, self._retry, self._left = remote, retry, limit

    def __iter__(self) -> Iterator[bytes]:
        while self._left > 0:
            want = min(constants.REMOTE_READ_CHUNK, self._left)
            data: bytes = self._retry("downloading a blob",
                                      functools.partial(self._remote.read, want))
            if not data:
                return
            self._left -= len(data)
            yield data

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._remote.close()


def _read_into(fd: int, path: Path, buffer: memoryview) -> int:
    """Fill ``buffer`` from the local file; fewer bytes only at its end (S3 wants every part
    but the last at least 5 MiB)."""
    try:
        return readinto_full(fd, buffer)
    except OSError as exc:
        raise StorageError(f"reading {path} failed: {exc}", path=path, errno=exc.errno) from exc


def _check_upload(path: Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise IntegrityError(f"{path} hashes to {actual}, not {expected}; nothing was stored",
                             digest=expected, path=path, expected=expected, actual=actual)
