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
from backend_suite import (
    FAST,
    HARNESS_KINDS,
    MIB,
    TEST_BLOCK,
    BackendSuite,
    Harness,
    layout_key,
    make_harness,
    write_file,
)
from s3_support import MotoS3

from repro_core import IntegrityError, InvalidArgumentError, ReproError, StorageError, constants
from repro_core.hashing import hash_bytes, hash_file
from repro_core.store import FsspecStorageBackend, LocalStorageBackend, _remote, _uploads


@pytest.fixture(params=HARNESS_KINDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    return make_harness(request, tmp_path)


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
    ("gs://user:hunter2@bucket/p", "never stores credentials"), ("gs://", "names no bucket"),
    ("gs://bucket/p?X-Goog-Signature=hunter2", "query"), ("gcs://b/../x", "'..'"),
    ("gs://bucket/p#hunter2", "query"),
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
    ({"max_concurrency": 0}, "max_concurrency"), ({"max_concurrency": 2.0}, "max_concurrency"),
    ({"max_concurrency": True}, "max_concurrency"), ({"max_concurrency": 65}, "max_concurrency"),
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


@pytest.mark.parametrize("url", ["gs://bucket/p", "gcs://bucket/p"])
def test_gs_without_gcsfs_names_the_package(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """gcsfs is not a dependency (nor installed here): a gs:// store says how to get it."""
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` fails, installed or not
    with pytest.raises(ModuleNotFoundError) as info:
        FsspecStorageBackend(url)
    assert info.value.name == "gcsfs" and "pip install gcsfs" in str(info.value)
    assert str(info.value).startswith(url.split(":")[0] + "://")


@pytest.mark.parametrize(("url", "shown"), [
    ("gs://user:hunter2@bucket/p?X-Goog-Signature=hunter2", "gs://<credentials>@bucket/p"),
    ("gs://bucket/p/obj#hunter2", "gs://bucket/p/obj"), ("gs://bucket", "gs://bucket"),
    ("s3://AKIA:hunter2@b/k?X-Amz-Signature=hunter2", "s3://<credentials>@b/k"),
])
def test_redacted_urls(url: str, shown: str) -> None:
    assert _remote.redact_url(url) == shown


def test_gs_url_is_parsed_without_io() -> None:
    location = _remote.parse_url("gs://bucket/a/b/")
    assert (location.protocol, location.module, location.root, location.bucket) == (
        "gcs", "gcsfs", "bucket/a/b", "bucket")


def test_publish_guard_excludes_gc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gc lock (now ``store/_gc_lock.py``) behind ``publish_guard``: a writer in another
    process holds it shared, gc's exclusive hold gives up after its deadline, writers share."""
    store = LocalStorageBackend(tmp_path / "s")
    monkeypatch.setattr(constants, "SQLITE_BUSY_TIMEOUT_MS", 300)
    code = ("import sys, time; from repro_core.store import LocalStorageBackend\n"
            "with LocalStorageBackend(sys.argv[1]).publish_guard():\n"
            "    print('held', flush=True); time.sleep(30)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s")],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout and child.stdout.readline().strip() == "held"
        with pytest.raises(StorageError, match="the store is busy"), \
                store.publish_guard(exclusive=True):
            pass
        with store.publish_guard():  # writers share it
            pass
    finally:
        child.kill()
        child.wait()
    with store.publish_guard(exclusive=True):  # and once the writer is gone, gc gets it
        pass


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
    """A part refused by the server (sent from a worker thread, others in flight beside it)
    or Ctrl-C in the main thread after the first parts: the multipart upload is aborted, not
    completed, and nothing is visible."""
    src = tmp_path / "f"
    src.write_bytes(os.urandom(27 * MIB))  # 6 parts of 5 MiB
    digest = hash_file(src)
    backend = FsspecStorageBackend(f"s3://{s3_bucket}/p", block_size=TEST_BLOCK,
                                   max_concurrency=4, **FAST)
    fs = backend._fs()
    real_call, sent = fs.call_s3, []

    def call(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part":
            sent.append(kwargs["PartNumber"])
            if kwargs["PartNumber"] == 3 and isinstance(failure, OSError):
                raise failure
        return real_call(method, *args, **kwargs)

    monkeypatch.setattr(fs, "call_s3", call)
    if isinstance(failure, KeyboardInterrupt):
        real_submit = _uploads.S3Sink._submit

        def submit(self: _uploads.S3Sink, block: memoryview) -> None:
            if self._next_part == 4:
                raise failure
            real_submit(self, block)

        monkeypatch.setattr(_uploads.S3Sink, "_submit", submit)
    with pytest.raises(StorageError if isinstance(failure, OSError) else KeyboardInterrupt):
        backend.upload(src, digest)
    client = s3_env.client()
    assert 3 in sent and 6 not in sent and not backend.exists(digest)
    assert client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=s3_bucket).get("Contents", []) == []


def test_s3_transient_failures_are_retried_per_request(s3_bucket: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       sleeps: list[float]) -> None:
    """A connection reset on one part (or in the middle of a download's stream) costs that
    request, not the transfer: it is retried after a backoff and the rest goes on (a download
    from the byte it had reached)."""
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
    ranges: list[str] = []

    def breaking_get(method: str, *args: Any, **kwargs: Any) -> Any:
        out = real_call(method, *args, **kwargs)
        if method == "get_object":
            ranges.append(kwargs["Range"])
            if len(ranges) == 1:  # the first stream breaks after 3 MiB
                out["Body"] = _BreakingBody(out["Body"], 3 * MIB)
        return out

    monkeypatch.setattr(fs, "call_s3", breaking_get)
    out = backend.download(digest, tmp_path / "out")
    assert out.read_bytes() == src.read_bytes() and len(sleeps) == 2
    size = 12 * MIB
    assert ranges == [f"bytes=0-{size}", f"bytes={3 * MIB}-{size}"]  # resumed where it broke


class _BreakingBody:
    """A response body whose connection resets after ``after`` bytes."""

    def __init__(self, body: Any, after: int) -> None:
        self.body, self.left = body, after

    async def readinto(self, buffer: memoryview) -> int:
        if self.left <= 0:
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        n: int = await self.body.readinto(buffer[:self.left])
        self.left -= n
        return n

    def close(self) -> None:
        self.body.close()


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
