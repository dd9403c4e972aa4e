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
(``_uploads.py`` says how each kind of store keeps partial objects invisible); every download
is hashed while it streams into a temp file beside the target and renamed only when it matches
(``_stream.py``). Memory holds one block, whatever the file size.

Credentials are never ours: s3fs/botocore find them through the standard provider chain
(``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, an
instance or container role; ``AWS_ENDPOINT_URL`` for S3-compatible servers), and nothing of
them is stored, logged or put in a message. Transient failures are retried with backoff
(``REPRO_REMOTE_RETRIES``, ``REPRO_REMOTE_BACKOFF``); everything else is one ``StorageError``
naming the URL and what to fix.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .. import constants
from ..errors import (
    ArtifactNotFoundError,
    IntegrityError,
    InvalidArgumentError,
    ReproError,
    StorageError,
)
from ..hashing import new_hasher, parse_digest
from ._remote import Retrying, import_filesystem, parse_url
from ._stream import receive_into
from ._uploads import BufferedFileSink, S3Sink, Sink
from .base import StorageBackend
from .local import LocalStorageBackend

__all__ = ["FsspecStorageBackend"]

_MIB = 1024 * 1024
_S3_MAX_PARTS = 10_000
_PART_LIMITS = (5 * _MIB, 5 * 1024 * _MIB)  # S3's smallest and largest part
_BLOB = re.compile(r"(blake3|sha256)/([0-9a-f]{2})/([0-9a-f]{62})")
# Credentials in storage_options would travel with the backend object (pickles, reprs, a
# store config someone saves): S3 credentials come from the provider chain instead.
_S3_SECRET_OPTIONS = {"key", "secret", "token", "username", "password"}
_S3_SECRET_CLIENT_KWARGS = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError",
                      "CredentialRetrievalError", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


class FsspecStorageBackend(StorageBackend):
    """Content-addressed blobs under a URL prefix, through fsspec (s3fs for ``s3://``).

    ``storage_options`` go to the fsspec filesystem (e.g. ``{"endpoint_url": …}`` or
    ``{"client_kwargs": {"region_name": …}}``); ``block_size`` is the multipart part size
    (default 64 MiB, raised automatically so a file never needs more than 10,000 parts);
    ``retries`` / ``backoff`` bound the retries of transient failures.
    """

    def __init__(self, url: str, *, storage_options: Mapping[str, Any] | None = None,
                 block_size: int | None = None, retries: int | None = None,
                 backoff: float | None = None) -> None:
        self.location = parse_url(url)
        self.url = self.location.url
        self.block_size = _check_block_size(block_size)
        self._retry = Retrying(self.url, retries, backoff)
        self._options = _filesystem_options(self.location.protocol, storage_options)
        self._lock = threading.Lock()
        self._fs_obj: Any = None
        self._pid = -1
        self._checked = False
        # file:// is a local directory: the local store's primitives (no-follow opens, checked
        # directories, flocked temp files that are swept, fsync + rename) make it safe against
        # planted symlinks and crashes, as fsspec's LocalFileSystem (shutil.move) is not.
        self._local = LocalStorageBackend(self.location.root) \
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
        if self._local is not None:
            return self._local.exists(content_hash)
        return self._stat(self.blob_key(content_hash)) is not None

    def upload(self, file_path: Path, content_hash: str) -> str:
        """Stream ``file_path`` up while hashing it; return the blob's URL.

        An object already there with the file's size is kept (no transfer; the file is still
        hashed, so content that is not ``content_hash`` is refused all the same).
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
            info = self._stat(key)
            if info is not None and info.get("size") == size:
                hasher = new_hasher(parse_digest(content_hash)[0], parallel=True)
                while block := _read_block(fd, path, constants.IO_CHUNK):
                    hasher.update(block)
                _check_upload(path, hasher.digest(), content_hash)
            else:
                self._send(fd, path, size, key, content_hash)
        finally:
            os.close(fd)
        return f"{self.location.scheme}://{key}"

    def download(self, content_hash: str, target_path: Path) -> Path:
        """Stream the blob into ``target_path`` (temp file + rename), verifying its digest."""
        key = self.blob_key(content_hash)
        if self._local is not None:
            return self._local.download(content_hash, target_path)
        remote = self._open_read(key, content_hash)
        try:
            return receive_into(target_path, self._read_chunks(remote), content_hash,
                                source=f"{self.location.scheme}://{key}")
        finally:
            with contextlib.suppress(Exception):
                remote.close()

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
            remote = self._open_read(key, content_hash)
        except ArtifactNotFoundError:
            raise IntegrityError(f"blob {content_hash} is missing from {self.url}",
                                 digest=content_hash, path=self.url, expected=content_hash,
                                 actual=None) from None
        hasher = new_hasher(parse_digest(content_hash)[0], parallel=True)
        try:
            for chunk in self._read_chunks(remote):
                hasher.update(chunk)
        finally:
            with contextlib.suppress(Exception):
                remote.close()
        actual = hasher.digest()
        if actual != content_hash:
            raise IntegrityError(f"blob {content_hash} at {self.url} is corrupt: its content "
                                 f"hashes to {actual}", digest=content_hash, path=self.url,
                                 expected=content_hash, actual=actual)

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

    def _open_read(self, key: str, content_hash: str) -> Any:
        self._ensure_location()
        with self._errors("opening a blob"):
            try:
                return self._retry("opening a blob", lambda: self._fs().open(
                    key, "rb", block_size=constants.REMOTE_READ_CHUNK, cache_type="none"))
            except FileNotFoundError:
                raise ArtifactNotFoundError(f"blob {content_hash} is not in {self.url}",
                                            key=content_hash) from None

    def _read_chunks(self, remote: Any) -> Iterator[bytes]:
        """``REMOTE_READ_CHUNK`` at a time (one ranged GET each on S3); a failed read is retried
        from the same offset (the file's position moves only on success)."""
        chunk = constants.REMOTE_READ_CHUNK
        with self._errors("downloading a blob"):
            while True:
                data = self._retry("downloading a blob", lambda: remote.read(chunk))
                if not data:
                    return
                yield data

    def _send(self, fd: int, path: Path, size: int, key: str, content_hash: str) -> None:
        """Hash each block as it goes up; publish only if the digest matches."""
        hasher = new_hasher(parse_digest(content_hash)[0], parallel=True)
        block_size = max(self.block_size, math.ceil(size / _S3_MAX_PARTS / _MIB) * _MIB)
        with self._errors("starting an upload"):
            sink = self._open_sink(key, size, block_size)
        try:
            with self._errors("uploading a blob"):
                block: bytes | None = None
                while True:
                    block = None  # drop the last block before reading the next: memory holds one
                    block = _read_block(fd, path, block_size)
                    if not block:
                        break
                    hasher.update(block)
                    sink.write(block)
            _check_upload(path, hasher.digest(), content_hash)
            with self._errors("uploading a blob"):
                sink.commit()
        except BaseException:  # a mismatch, an error, Ctrl-C: the parts are dropped
            sink.abort()
            raise
        self._check_published(key, size, content_hash)

    def _check_published(self, key: str, size: int, content_hash: str) -> None:
        """What the store holds now has the file's size (a request that sent less than its
        block would otherwise leave a short object under the digest): else it is removed."""
        info = self._stat(key)
        if info is not None and info.get("size") == size:
            return
        with contextlib.suppress(Exception):
            self._fs().rm_file(key)
        raise IntegrityError(f"{self.location.scheme}://{key} holds "
                             f"{None if info is None else info.get('size')} bytes after the "
                             f"upload, not {size}; removed, upload again", digest=content_hash)

    def _open_sink(self, key: str, size: int, block_size: int) -> Sink:
        fs, protocol = self._fs(), self.location.protocol
        if protocol == "s3":
            return S3Sink(fs, key, self._retry, multipart=size > block_size)
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


def _read_block(fd: int, path: Path, block_size: int) -> bytes:
    """The next ``block_size`` bytes of the local file (fewer only at its end; S3 wants every
    part but the last at least 5 MiB), as one ``bytes`` object: no copy is made of it later."""
    try:
        block = os.read(fd, block_size)
        while block and len(block) < block_size:
            more = os.read(fd, block_size - len(block))
            if not more:
                break
            block += more
    except OSError as exc:
        raise StorageError(f"reading {path} failed: {exc}", path=path, errno=exc.errno) from exc
    return block


def _check_upload(path: Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise IntegrityError(f"{path} hashes to {actual}, not {expected}; nothing was stored",
                             digest=expected, path=path, expected=expected, actual=actual)


def _check_block_size(block_size: int | None) -> int:
    if block_size is None:
        return constants.REMOTE_BLOCK_SIZE
    low, high = _PART_LIMITS
    if isinstance(block_size, bool) or not isinstance(block_size, int) \
            or not low <= block_size <= high:
        raise InvalidArgumentError(
            f"block_size must be a whole number of bytes from 5 MiB to 5 GiB (S3's part "
            f"limits), got {block_size!r}", argument="block_size")
    return block_size


def _filesystem_options(protocol: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The caller's options plus ours: no listing cache (another process's uploads must be
    seen), and no retry loop inside botocore (ours is the one, see ``Retrying``)."""
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise InvalidArgumentError(f"storage_options must be a mapping, got "
                                   f"{type(storage_options).__name__}", argument="storage_options")
    options = dict(storage_options or {})
    if protocol == "s3":
        secrets = (_S3_SECRET_OPTIONS & set(options)) | (
            _S3_SECRET_CLIENT_KWARGS & set(options.get("client_kwargs") or {}))
        if secrets:
            raise InvalidArgumentError(
                f"storage_options {sorted(secrets)} carry credentials, which repro never "
                "holds: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
                "environment instead", argument="storage_options")
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        # botocore waits 60 s for a connection and for each read by default: a blackholed
        # endpoint would then take minutes per attempt, not the bounded retry we promise
        config.setdefault("connect_timeout", 10)
        config.setdefault("read_timeout", 60)
        options["config_kwargs"] = config
    if protocol != "file":
        options.setdefault("use_listings_cache", False)
    return options
