"""Every storage backend passes ``backend_suite``; then what is particular to FsspecStorageBackend:
URLs and arguments checked before any I/O, the install hint, and the faults of a remote
(unreachable endpoint, missing bucket, wrong credentials) against a real S3 server (moto)."""

from __future__ import annotations

import errno
import os
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backend_suite import MIB, BackendSuite, Harness, layout_key, write_file
from s3_support import MotoS3

from repro_core import IntegrityError, InvalidArgumentError, ReproError, StorageError, constants
from repro_core.hashing import hash_bytes, hash_file
from repro_core.store import FsspecStorageBackend, LocalStorageBackend, _remote, _uploads

FAST: dict[str, Any] = {"retries": 1, "backoff": 0.01}  # keeps the suite's fault paths quick
TEST_BLOCK = 5 * MIB  # S3's smallest part: files of a few MiB already go multipart


class _TreeHarness(Harness):
    """A store whose objects are files under ``root`` (local, and fsspec on file://)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def raw_keys(self) -> list[str]:
        blobs = self.root / "blobs"
        if not blobs.exists():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in blobs.rglob("*")
                      if p.is_file())

    def put_raw(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def corrupt(self, digest: str) -> None:
        path = self.root / layout_key(digest)
        path.chmod(0o644)  # (local blobs are read-only)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def stamp(self, digest: str) -> object:
        st = (self.root / layout_key(digest)).stat()
        return st.st_ino, st.st_size


class LocalHarness(_TreeHarness):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.backend = LocalStorageBackend(root)
        self.spec = {"kind": "local", "root": str(root)}


class FileHarness(_TreeHarness):
    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.spec = {"kind": "fsspec", "url": f"file://{root}", "block_size": TEST_BLOCK, **FAST}
        self.backend = FsspecStorageBackend(f"file://{root}", block_size=TEST_BLOCK, **FAST)


class S3Harness(Harness):
    multipart = True

    def __init__(self, moto: MotoS3, bucket: str) -> None:
        self.client, self.bucket, self.prefix = moto.client(), bucket, "store/p"
        url = f"s3://{bucket}/{self.prefix}"
        self.spec = {"kind": "fsspec", "url": url, "block_size": TEST_BLOCK, **FAST}
        self.backend = FsspecStorageBackend(url, block_size=TEST_BLOCK, **FAST)

    def raw_keys(self) -> list[str]:
        """Every object under the prefix, not just blobs/: we write nothing else there."""
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "/")
        return sorted(obj["Key"][len(self.prefix) + 1:]
                      for page in pages for obj in page.get("Contents", []))

    def put_raw(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}", Body=data)

    def corrupt(self, digest: str) -> None:
        key = f"{self.prefix}/{layout_key(digest)}"
        data = bytearray(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        self.client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data))

    def stamp(self, digest: str) -> object:
        """moto's own record of the object: S3's LastModified has whole seconds only."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        key = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].get_object(
            self.bucket, f"{self.prefix}/{layout_key(digest)}")
        assert key is not None
        return key.last_modified, id(key)

    def pending_uploads(self) -> int:
        out = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=self.prefix + "/")
        return len(out.get("Uploads", []))


@pytest.fixture(params=["local", "fsspec-file", "fsspec-s3"])
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    if request.param == "local":
        return LocalHarness(tmp_path / "store")
    if request.param == "fsspec-file":
        return FileHarness(tmp_path / "remote")
    return S3Harness(request.getfixturevalue("s3_env"), request.getfixturevalue("s3_bucket"))


class TestBackends(BackendSuite):
    """The shared suite on local, fsspec-on-file:// and fsspec-on-moto-S3."""


# -- FsspecStorageBackend: URLs and arguments, checked before any I/O ----------------------


@pytest.mark.parametrize(("url", "normal"), [
    ("s3://bucket/a/b/", "s3://bucket/a/b"), ("s3://bucket", "s3://bucket"),
    ("S3://bucket/x", "s3://bucket/x"), ("gs://bucket/p", "gs://bucket/p"),
    ("file:///tmp//store/", "file:///tmp/store"),
])
def test_url_forms(url: str, normal: str) -> None:
    assert _remote.parse_url(url).url == normal


@pytest.mark.parametrize(("url", "says"), [
    ("ftp://host/x", "unknown store URL scheme 'ftp'"), ("hdfs://nn/x", "unknown"),
    ("bucket/prefix", "no scheme"), ("s3://", "names no bucket"), ("s3:///x", "no bucket"),
    ("s3://bucket/../x", "'..'"), ("s3://bucket//x", "empty"), ("s3://b/p?versionId=1", "query"),
    ("file://relative/path", "absolute"), ("file:///a/../b", "'..'"),
    ("s3://AKIAEXAMPLE:hunter2@bucket/p", "never stores credentials"), (42, "string"),
    # the secret must not be echoed by an earlier check either (review finding)
    ("s3://AKIA:hunter2@bucket/p?x=1", "query"), ("https://user:hunter2@host/p", "unknown"),
    ("user:hunter2@bucket/p", "no scheme"), ("file://u:hunter2@host/x", "absolute"),
    ("s3://bucket/p?X-Amz-Signature=hunter2", "query"),
])
def test_bad_urls_are_refused(url: Any, says: str) -> None:
    with pytest.raises(InvalidArgumentError, match=None) as info:
        FsspecStorageBackend(url)
    assert says in str(info.value) and "hunter2" not in str(info.value)
    assert info.value.argument == "url"


@pytest.mark.parametrize(("kwargs", "argument"), [
    ({"block_size": MIB}, "block_size"), ({"block_size": 6 * 1024**3}, "block_size"),
    ({"block_size": 5.5 * MIB}, "block_size"), ({"retries": -1}, "retries"),
    ({"backoff": -1.0}, "backoff"), ({"storage_options": "anon=True"}, "storage_options"),
    ({"storage_options": {"key": "AKIA", "secret": "hunter2"}}, "storage_options"),
    ({"storage_options": {"client_kwargs": {"aws_secret_access_key": "hunter2"}}},
     "storage_options"),
])
def test_bad_arguments_are_refused(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        FsspecStorageBackend("s3://bucket/p", **kwargs)
    assert info.value.argument == argument and "hunter2" not in str(info.value)


@pytest.mark.parametrize("missing", ["s3fs", "fsspec"])
def test_missing_package_names_the_extra(missing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # `import <missing>` now fails
    with pytest.raises(ModuleNotFoundError) as info:
        FsspecStorageBackend("s3://bucket/p")
    assert info.value.name == missing
    assert "pip install 'repro-lightning[s3]'" in str(info.value)


def test_repr_and_pickle(tmp_path: Path) -> None:
    backend = FsspecStorageBackend(f"file://{tmp_path}/r", **FAST)
    assert repr(backend) == f"FsspecStorageBackend('file://{tmp_path}/r')"
    src = tmp_path / "f"
    src.write_bytes(b"pickled")
    digest = hash_file(src)
    backend.upload(src, digest)
    clone = pickle.loads(pickle.dumps(backend))  # a DataLoader worker, a spawned rank
    assert clone.exists(digest) and clone.url == backend.url


def test_remote_settings_come_from_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "REPRO_REMOTE_RETRIES", 7)
    monkeypatch.setattr(constants, "REPRO_REMOTE_BACKOFF", 0.25)
    retry = _remote.Retrying("s3://b", None, None)
    assert (retry.retries, retry.backoff) == (7, 0.25)
    assert _remote.Retrying("s3://b", 0, 0).retries == 0


@pytest.mark.parametrize(("exc", "transient"), [
    (ConnectionRefusedError(), True), (TimeoutError(), True),
    (OSError(errno.EBUSY, "SlowDown"), True), (OSError(errno.EREMOTEIO, "500"), True),
    (PermissionError("Forbidden"), False), (FileNotFoundError("NoSuchKey"), False),
    (OSError(errno.EINVAL, "InvalidArgument"), False), (ValueError("bad"), False),
])
def test_transient_errors(exc: BaseException, transient: bool) -> None:
    assert _remote.is_transient(exc) is transient


def test_botocore_connection_errors_are_transient() -> None:
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    assert _remote.is_transient(EndpointConnectionError(endpoint_url="http://x"))
    assert _remote.is_transient(ReadTimeoutError(endpoint_url="http://x"))


# -- faults of a remote ---------------------------------------------------------------------


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The backoff delays the retry loop asked for (it does not really sleep)."""
    recorded: list[float] = []
    monkeypatch.setattr(_remote.time, "sleep", recorded.append)
    yield recorded


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_endpoint(s3_env: MotoS3, monkeypatch: pytest.MonkeyPatch,
                              tmp_path: Path, sleeps: list[float]) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    backend = FsspecStorageBackend("s3://bucket/prefix", retries=3, backoff=0.2)
    src = tmp_path / "f"
    src.write_bytes(b"x")
    digest = hash_file(src)
    target = tmp_path / "sub" / "out"
    for call in (lambda: backend.exists(digest), lambda: backend.upload(src, digest),
                 lambda: backend.download(digest, target)):
        sleeps.clear()
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert "s3://bucket/prefix" in message and "4 attempts" in message, message
        assert "testing" not in message  # (the secret's value)
        assert len(sleeps) == 3 and 0.1 <= sleeps[0] <= 0.2 and sleeps[2] <= 0.8
        assert sleeps == sorted(sleeps)  # exponential backoff
    assert not target.parent.exists()


def test_missing_bucket(s3_env: MotoS3, tmp_path: Path, sleeps: list[float]) -> None:
    backend = FsspecStorageBackend("s3://no-such-bucket-here/p", **FAST)
    src = tmp_path / "f"
    src.write_bytes(b"x")
    digest = hash_file(src)
    for call in (lambda: backend.exists(digest), lambda: backend.upload(src, digest),
                 lambda: list(backend.iter_digests()),
                 lambda: backend.download(digest, tmp_path / "out")):
        with pytest.raises(StorageError, match="bucket 'no-such-bucket-here' of "
                           "s3://no-such-bucket-here/p does not exist"):
            call()
    assert sleeps == []  # a permanent answer is not retried
    assert not (tmp_path / "out").exists()


def test_wrong_credentials(s3_bucket: str, monkeypatch: pytest.MonkeyPatch,
                           tmp_path: Path, sleeps: list[float]) -> None:
    """moto checks signatures only with IAM auth switched on (INITIAL_NO_AUTH_ACTION_COUNT=0):
    then an access key no IAM user owns is refused (403 InvalidAccessKeyId)."""
    from moto import settings

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value-123")
    backend = FsspecStorageBackend(f"s3://{s3_bucket}/p", **FAST)
    src = tmp_path / "f"
    src.write_bytes(b"x")
    saved = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # (not monkeypatch: the bucket's teardown
    try:  # runs before monkeypatch's and needs auth off again)
        for call in (lambda: backend.exists(hash_file(src)),
                     lambda: backend.upload(src, hash_file(src))):
            with pytest.raises(StorageError, match="access denied") as info:
                call()
            assert f"s3://{s3_bucket}/p" in str(info.value)
            assert "wrong-secret-value-123" not in str(info.value)
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
    assert sleeps == []


def test_bad_digest_never_reaches_the_network(s3_env: MotoS3, monkeypatch: pytest.MonkeyPatch,
                                              sleeps: list[float]) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    backend = FsspecStorageBackend("s3://bucket/p", retries=3, backoff=0.2)
    with pytest.raises(InvalidArgumentError):
        backend.exists("blake3:../../x")
    assert sleeps == []  # no request was even tried


def test_s3_upload_is_multipart_with_full_parts(s3_bucket: str, tmp_path: Path,
                                                s3_env: MotoS3) -> None:
    src = tmp_path / "f"
    src.write_bytes(os.urandom(12 * MIB))
    digest = hash_file(src)
    backend = FsspecStorageBackend(f"s3://{s3_bucket}/p", block_size=TEST_BLOCK, **FAST)
    backend.upload(src, digest)
    head = s3_env.client().head_object(Bucket=s3_bucket, Key=f"p/{layout_key(digest)}")
    assert head["ContentLength"] == 12 * MIB and head["ETag"].endswith('-3"')  # 5 + 5 + 2 MiB


def test_forked_child_uses_its_own_connection(s3_bucket: str, tmp_path: Path) -> None:
    """An async client does not survive fork(): the child makes its own filesystem."""
    backend = FsspecStorageBackend(f"s3://{s3_bucket}/p", **FAST)
    src = tmp_path / "f"
    src.write_bytes(b"forked")
    digest = hash_file(src)
    backend.upload(src, digest)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0 if backend.exists(digest) and not backend.exists(hash_bytes(b"no")) else 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_import_does_not_load_fsspec() -> None:
    code = ("import sys, repro_core, repro_core.store; "
            "from repro_core.store import FsspecStorageBackend; "
            "print([m for m in ('fsspec', 's3fs', 'botocore', 'aiobotocore', 'boto3') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_retry_settings_apply_to_real_calls(s3_env: MotoS3,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """REPRO_REMOTE_RETRIES / REPRO_REMOTE_BACKOFF (through constants) bound a real call."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "REPRO_REMOTE_RETRIES", 2)
    monkeypatch.setattr(constants, "REPRO_REMOTE_BACKOFF", 0.05)
    start = time.monotonic()
    with pytest.raises(StorageError, match="3 attempts"):
        FsspecStorageBackend("s3://bucket/p").exists(hash_bytes(b"x"))
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("failure", [OSError(errno.EINVAL, "InvalidPart"), KeyboardInterrupt()])
def test_s3_upload_failing_midway_is_aborted(s3_bucket: str, s3_env: MotoS3, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             failure: BaseException) -> None:
    """An error or Ctrl-C after the first part: the multipart upload is aborted, not
    completed, and nothing is visible."""
    src = tmp_path / "f"
    src.write_bytes(os.urandom(12 * MIB))
    digest = hash_file(src)
    backend = FsspecStorageBackend(f"s3://{s3_bucket}/p", block_size=TEST_BLOCK, **FAST)
    real = _uploads.S3Sink._send_part
    parts: list[int] = []

    def send_part(self: _uploads.S3Sink, block: bytes) -> None:
        parts.append(len(block))
        if len(parts) == 2:
            raise failure
        real(self, block)

    monkeypatch.setattr(_uploads.S3Sink, "_send_part", send_part)
    with pytest.raises(StorageError if isinstance(failure, OSError) else KeyboardInterrupt):
        backend.upload(src, digest)
    client = s3_env.client()
    assert len(parts) == 2 and not backend.exists(digest)
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=s3_bucket).get("Contents", []) == []


def test_s3_transient_failures_are_retried_per_request(s3_bucket: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       sleeps: list[float]) -> None:
    """A connection reset on one part (or one ranged read) costs that request, not the
    transfer: it is retried after a backoff and the rest goes on."""
    src, digest, backend = _retrying_s3(s3_bucket, tmp_path, 12 * MIB)
    fs = backend._fs()
    real_call = fs.call_s3
    failed: list[str] = []

    def flaky_call(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part" and kwargs.get("PartNumber") == 2 and not failed:
            failed.append(method)
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return real_call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", flaky_call)
    backend.upload(src, digest)
    assert failed == ["upload_part"] and len(sleeps) == 1

    import s3fs.core

    real_fetch = s3fs.core.S3File._fetch_range
    fetches: list[int] = []

    def flaky_fetch(self: Any, start: int, end: int) -> bytes:
        fetches.append(start)
        if len(fetches) == 2:
            raise TimeoutError("read timed out")
        return bytes(real_fetch(self, start, end))

    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", flaky_fetch)
    out = backend.download(digest, tmp_path / "out")
    assert out.read_bytes() == src.read_bytes() and len(sleeps) == 2
    assert fetches[1] == fetches[2]  # the failed range was asked for again


@pytest.mark.parametrize("planted", ["blobs", "tmp"])
def test_file_url_never_writes_through_a_planted_symlink(tmp_path: Path, planted: str) -> None:
    """A ``file://`` remote is a directory anyone may have touched: a ``blobs`` or ``tmp``
    that is a symlink elsewhere is refused, and nothing lands where it points."""
    root, outside = tmp_path / "remote", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / planted).symlink_to(outside, target_is_directory=True)
    src = tmp_path / "src.bin"
    digest = write_file(src, 1000)
    backend = FsspecStorageBackend(f"file://{root}", **FAST)
    with pytest.raises(ReproError):
        backend.upload(src, digest)
    assert list(outside.rglob("*")) == []


@pytest.mark.parametrize(("size", "method"), [(3 * MIB, "put_object"), (12 * MIB, "upload_part")])
def test_a_retry_after_a_half_sent_body_sends_it_whole(
        s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int,
        method: str) -> None:
    """An attempt that read part of its body before the connection dropped: the retry must
    send the whole block (botocore takes the length from the reader's position, so a reused
    half-read body would publish a short object that S3 accepts)."""
    src, digest, backend = _retrying_s3(s3_bucket, tmp_path, size)
    fs = backend._fs()
    real_call = fs.call_s3
    failed: list[str] = []

    def half_sent(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == method and not failed:
            failed.append(name)
            kwargs["Body"].read(MIB)  # a first MiB went out, then the peer reset
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return real_call(name, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", half_sent)
    backend.upload(src, digest)
    assert failed == [method]
    got = tmp_path / "got"
    backend.download(digest, got)  # digest-checked: a short object would fail here
    assert got.stat().st_size == size


@pytest.mark.parametrize("kind", ["local", "file"])
def test_a_fifo_planted_as_a_blob_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """A FIFO where a blob should be: opening it for reading would block for ever (and a
    device would stream without end); refused as not a regular file, nothing written."""
    root = tmp_path / "store"
    backend = (LocalStorageBackend(root) if kind == "local"
               else FsspecStorageBackend(f"file://{root}", **FAST))
    src = tmp_path / "src.bin"
    digest = write_file(src, 1000)
    backend.upload(src, digest)
    blob = root / layout_key(digest)
    blob.unlink()
    os.mkfifo(blob)
    target = tmp_path / "out"
    start = time.monotonic()
    with pytest.raises(IntegrityError, match="not a regular file"):
        backend.download(digest, target)
    assert time.monotonic() - start < 10 and not target.exists()


@pytest.mark.parametrize(("status", "transient"), [(502, True), (504, True), (429, True),
                                                   (500, True), (403, False), (404, False)])
def test_http_status_behind_an_oserror_decides_a_retry(status: int, transient: bool) -> None:
    """s3fs turns some statuses into errnos and leaves the others as ``OSError(EIO)`` raised
    from botocore's ``ClientError``: the status behind it decides."""
    from botocore.exceptions import ClientError

    cause = ClientError({"Error": {"Code": str(status)},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    try:
        try:
            raise cause
        except ClientError as exc:
            raise OSError(errno.EIO, "Bad Gateway") from exc
    except OSError as wrapped:
        assert _remote.is_transient(wrapped) is transient


def _retrying_s3(bucket: str, tmp_path: Path, size: int
                 ) -> tuple[Path, str, FsspecStorageBackend]:
    """A random file of ``size`` bytes, its digest, and an S3 backend that retries twice."""
    src = tmp_path / "f"
    src.write_bytes(os.urandom(size))
    backend = FsspecStorageBackend(f"s3://{bucket}/p", block_size=TEST_BLOCK, retries=2,
                                   backoff=0.01)
    return src, hash_file(src), backend
