"""What a remote can do to the blob store, against real servers (moto on loopback).

- a forged object under a digest: a huge one is refused before a byte is read, and never
  costs more than one byte past the recorded size; a same-size one is never taken for the
  blob (only our mark on a verified upload is) and an upload replaces it;
- a lost answer to ``CompleteMultipartUpload``, an upload aborted under our feet;
- abandoned multipart uploads, swept by age;
- parts sent in parallel: byte-exact, and memory flat for 1 GB (server in its own process);
- the server dying mid-upload, then coming back on the same port.

The one patch here wraps the client's call to lose an answer the server did send (or drop a
request): the server is real, and so is what it holds.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
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
    WORKER,
    Harness,
    S3Harness,
    layout_key,
    make_harness,
    write_file,
)
from s3_support import MotoProcess, MotoS3, moto_process  # noqa: F401 (a fixture)

from repro_core import IntegrityError, InvalidArgumentError, StorageError, constants
from repro_core.hashing import hash_file
from repro_core.store import FsspecStorageBackend, _remote, _stream

GB = 1024 * MIB
BIG_RSS_LIMIT_MB = 200


@pytest.fixture(params=HARNESS_KINDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    return make_harness(request, tmp_path)


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float]]:
    """The backoff delays the retry loop asked for (it does not really sleep)."""
    recorded: list[float] = []
    monkeypatch.setattr(_remote.time, "sleep", recorded.append)
    yield recorded


def _plant(harness: Harness, digest: str, data: bytes, mark: str | None = None) -> None:
    """Put ``data`` under the digest's key behind the backend's back (S3: with ``mark`` as
    our metadata, when given)."""
    if isinstance(harness, S3Harness):
        extra = {"Metadata": {"repro-digest": mark}} if mark else {}
        harness.client.put_object(Bucket=harness.bucket, Key=f"{harness.prefix}/"
                                  f"{layout_key(digest)}", Body=data, **extra)
        return
    path = harness.root / layout_key(digest)  # type: ignore[attr-defined]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.chmod(0o644)  # (local blobs are read-only)
    path.write_bytes(data)


def _requests(backend: FsspecStorageBackend) -> dict[str, list[Any]]:
    """Every S3 request the backend sends from now on, by operation (botocore's events)."""
    seen: dict[str, list[Any]] = {}

    def record(event_name: str = "", request: Any = None, **_: Any) -> None:
        seen.setdefault(event_name.rsplit(".", 1)[-1], []).append(request)

    backend._fs().s3.meta.events.register("before-send.s3", record)
    return seen


# -- 1. a forged huge object ----------------------------------------------------------------


def test_forged_huge_object_is_refused_before_a_byte_is_read(harness: Harness,
                                                             tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    digest = write_file(src, 1000)
    harness.backend.upload(src, digest)
    _plant(harness, digest, b"\0" * (8 * MIB), mark=digest)  # marked, even: size decides
    seen = _requests(harness.backend) if isinstance(harness, S3Harness) else {}
    target = tmp_path / "sub" / "out.bin"
    with pytest.raises(IntegrityError) as info:
        harness.backend.download(digest, target, expected_size=1000)  # type: ignore[call-arg]
    assert (info.value.expected, info.value.actual) == (1000, 8 * MIB)
    assert "8388608 bytes, not the 1000 recorded" in str(info.value)
    assert not target.parent.exists()  # not even the directory: refused before any write
    assert "GetObject" not in seen  # (S3: the HEAD's size was enough)


@pytest.mark.parametrize("server_ignores_range", [False, True])
@pytest.mark.parametrize("expected", [1000, None])
def test_object_replaced_after_the_size_check_costs_one_byte(
        s3_bucket: str, s3_env: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        server_ignores_range: bool, expected: int | None) -> None:
    """The race a size check alone leaves open: the object is swapped for a huge one right
    after our HEAD. The GET asks for one byte past the size (the recorded one, else the
    HEAD's), and that is all that is read, even from a server that sends the whole object
    (here: the request loses its Range)."""
    harness = S3Harness(s3_env, s3_bucket)
    src = tmp_path / "src.bin"
    digest = write_file(src, 1000)
    harness.backend.upload(src, digest)
    fs, swapped, read = harness.backend._fs(), [], [0]
    real = fs.call_s3

    def call(method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "get_object":
            assert kwargs["Range"] == "bytes=0-1000"
            if server_ignores_range:
                del kwargs["Range"]
        out = real(method, *args, **kwargs)
        if method == "head_object" and not swapped:
            swapped.append(True)
            _plant(harness, digest, b"\xff" * (32 * MIB), mark=digest)
        if method == "get_object":
            out["Body"] = _CountingBody(out["Body"], read)
        return out

    monkeypatch.setattr(fs, "call_s3", call)
    target = tmp_path / "out.bin"
    with pytest.raises(IntegrityError, match="more than 1000 bytes" if expected else "hash"):
        harness.backend.download(digest, target,  # type: ignore[call-arg]
                                 expected_size=expected)
    assert swapped and read[0] == 1001 and not target.exists()
    assert os.listdir(tmp_path) == ["src.bin"]  # no temp file left either


class _CountingBody:
    """A response body that counts the bytes taken from it."""

    def __init__(self, body: Any, read: list[int]) -> None:
        self.body, self.read = body, read

    async def readinto(self, buffer: memoryview) -> int:
        n: int = await self.body.readinto(buffer)
        self.read[0] += n
        return n

    def close(self) -> None:
        self.body.close()


def test_local_reads_stop_one_byte_past_the_limit(tmp_path: Path) -> None:
    """The local side of the same bound: a blob that grows after its size was checked is
    read up to ``limit`` bytes, and ``receive_into`` stops at the first byte too many."""
    big = tmp_path / "big"
    big.write_bytes(b"x" * (5 * MIB))
    fd = os.open(big, os.O_RDONLY)
    try:
        assert sum(len(c) for c in _stream.read_fd_chunks(fd, 1001)) == 1001
    finally:
        os.close(fd)
    pulled: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(10):
            pulled.append(i)
            yield b"y" * 600

    with pytest.raises(IntegrityError, match="more than 1000 bytes"):
        _stream.receive_into(tmp_path / "out", chunks(), hash_file(big), source="test",
                             expected_size=1000)
    assert pulled == [0, 1] and sorted(os.listdir(tmp_path)) == ["big"]


@pytest.mark.parametrize("bad", [-1, 1.5, "1000", True])
def test_expected_size_is_checked_before_any_io(harness: Harness, tmp_path: Path,
                                                bad: object) -> None:
    target = tmp_path / "sub" / "out"
    with pytest.raises(InvalidArgumentError) as info:
        harness.backend.download("blake3:" + "0" * 64, target,  # type: ignore[call-arg]
                                 expected_size=bad)
    assert info.value.argument == "expected_size" and not target.parent.exists()


@pytest.mark.parametrize("size", [0, 1000, 12 * MIB + 5])
def test_expected_size_that_matches_round_trips(harness: Harness, tmp_path: Path,
                                                size: int) -> None:
    src = tmp_path / "src.bin"
    digest = write_file(src, size) if size else _empty_digest(src)
    harness.backend.upload(src, digest)
    out = harness.backend.download(digest, tmp_path / "out",  # type: ignore[call-arg]
                                   expected_size=size)
    assert out.read_bytes() == src.read_bytes()


def _empty_digest(path: Path) -> str:
    path.write_bytes(b"")
    return hash_file(path)


# -- 2. a same-size object that is not ours ------------------------------------------------


@pytest.mark.parametrize("size", [4096, 12 * MIB])
@pytest.mark.parametrize("mark", [None, "wrong"])
def test_same_size_object_without_our_mark_is_replaced(harness: Harness, tmp_path: Path,
                                                       size: int, mark: str | None) -> None:
    """An object of the file's size planted under its digest (no mark, or the mark of
    another digest): not taken for the blob; the upload replaces it with verified bytes."""
    src = tmp_path / "src.bin"
    digest = write_file(src, size)
    other = hash_file(_with_bytes(tmp_path / "other", b"other"))
    _plant(harness, digest, b"\0" * size, mark=other if mark else None)
    if isinstance(harness, S3Harness):
        assert not harness.backend.exists(digest)  # (local stores: the file is there)
    harness.backend.upload(src, digest)
    assert harness.backend.exists(digest)
    out = harness.backend.download(digest, tmp_path / "out")  # digest-checked
    assert out.read_bytes() == src.read_bytes()
    harness.backend.verify(digest)


def test_our_own_object_is_not_sent_again(s3_bucket: str, s3_env: MotoS3,
                                          tmp_path: Path) -> None:
    harness = S3Harness(s3_env, s3_bucket)
    src = tmp_path / "src.bin"
    digest = write_file(src, 12 * MIB)
    harness.backend.upload(src, digest)
    head = harness.client.head_object(Bucket=s3_bucket, Key=f"store/p/{layout_key(digest)}")
    assert head["Metadata"] == {"repro-digest": digest}  # set on multipart uploads too
    seen = _requests(harness.backend)
    harness.backend.upload(src, digest)
    assert sorted(seen) == ["HeadObject"]  # looked, and sent nothing


def _with_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- 3. a lost answer to CompleteMultipartUpload --------------------------------------------


def _complete_wrapper(backend: FsspecStorageBackend, monkeypatch: pytest.MonkeyPatch,
                      before: Any = None, after: Any = None) -> list[str]:
    """Wrap the first ``complete_multipart_upload``: ``before`` runs and drops the request
    (never sent) if it returns True; else the request is sent, ``after`` runs, and the
    answer is lost (a connection reset). Returns every request method from then on."""
    fs = backend._fs()
    real, calls = fs.call_s3, []

    def call(method: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(method)
        first = method == "complete_multipart_upload" and calls.count(method) == 1
        if first and before is not None and before():
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        out = real(method, *args, **kwargs)
        if first:
            if after is not None:
                after()
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        return out

    monkeypatch.setattr(fs, "call_s3", call)
    return calls


def _multipart_file(tmp_path: Path) -> tuple[Path, str]:
    src = tmp_path / "src.bin"
    return src, write_file(src, 12 * MIB)


def test_lost_complete_answer_is_not_a_failure(s3_bucket: str, s3_env: MotoS3,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               sleeps: list[float]) -> None:
    harness = S3Harness(s3_env, s3_bucket)
    src, digest = _multipart_file(tmp_path)
    calls = _complete_wrapper(harness.backend, monkeypatch)
    harness.backend.upload(src, digest)
    assert calls.count("complete_multipart_upload") == 1  # looked before sending it again
    assert len(sleeps) == 1 and harness.pending_uploads() == 0
    assert harness.backend.download(digest, tmp_path / "out").read_bytes() == src.read_bytes()


def test_complete_dropped_before_the_server_is_sent_again(
        s3_bucket: str, s3_env: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        sleeps: list[float]) -> None:
    harness = S3Harness(s3_env, s3_bucket)
    src, digest = _multipart_file(tmp_path)
    calls = _complete_wrapper(harness.backend, monkeypatch, before=lambda: True)
    harness.backend.upload(src, digest)
    assert calls.count("complete_multipart_upload") == 2 and "list_parts" in calls
    assert harness.pending_uploads() == 0
    assert harness.backend.download(digest, tmp_path / "out").read_bytes() == src.read_bytes()


def test_upload_gone_after_a_lost_complete_is_a_clear_error(
        s3_bucket: str, s3_env: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        sleeps: list[float]) -> None:
    """The complete went through, its answer was lost, and the object was deleted before we
    looked (another machine's gc): the upload is gone (NoSuchUpload) and so is the blob."""
    harness = S3Harness(s3_env, s3_bucket)
    src, digest = _multipart_file(tmp_path)
    key = f"{harness.prefix}/{layout_key(digest)}"
    _complete_wrapper(harness.backend, monkeypatch, after=lambda: harness.client.delete_object(
        Bucket=s3_bucket, Key=key))
    with pytest.raises(StorageError, match="the multipart upload is gone") as info:
        harness.backend.upload(src, digest)
    assert harness.url in str(info.value)
    assert not harness.backend.exists(digest) and harness.raw_keys() == []
    assert harness.pending_uploads() == 0


def test_upload_swept_before_its_complete_is_a_clear_error(
        s3_bucket: str, s3_env: MotoS3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        sleeps: list[float]) -> None:
    """``sweep_uploads(older_than=0)`` from another process aborts our upload just before we
    complete it: one clear error, nothing published."""
    harness = S3Harness(s3_env, s3_bucket)
    other = FsspecStorageBackend(harness.url, **FAST)
    src, digest = _multipart_file(tmp_path)
    swept: list[int] = []
    _complete_wrapper(harness.backend, monkeypatch,
                      before=lambda: swept.append(other.sweep_uploads(older_than=0)))
    with pytest.raises(StorageError, match="the multipart upload is gone"):
        harness.backend.upload(src, digest)
    assert swept == [1] and harness.raw_keys() == [] and harness.pending_uploads() == 0


# -- 4. abandoned multipart uploads ----------------------------------------------------------


def test_sweep_uploads_aborts_only_ours_and_only_old_ones(s3_bucket: str, s3_env: MotoS3,
                                                          tmp_path: Path) -> None:
    """moto reports every upload as initiated on 2010-11-10: "old" is any ``older_than``
    shorter than the time since, "fresh" one longer (10**10 s)."""
    harness = S3Harness(s3_env, s3_bucket)
    client = harness.client
    keys = [f"store/p/blobs/blake3/ab/{'c' * 62}", "store/p/meta/versions/x", "store/q/blobs/y",
            "store/pp/blobs/z"]
    for key in keys:
        client.create_multipart_upload(Bucket=s3_bucket, Key=key)
    assert harness.backend.sweep_uploads(older_than=10**10) == 0
    assert harness.pending_uploads() == 2  # (its listing: store/p/…)
    assert harness.backend.sweep_uploads(older_than=0) == 1
    left = client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert sorted(u["Key"] for u in left) == sorted(keys[1:])
    assert harness.backend.sweep_uploads(older_than=0) == 0


def test_sweep_uploads_after_a_killed_upload(s3_bucket: str, s3_env: MotoS3,
                                             tmp_path: Path) -> None:
    harness = S3Harness(s3_env, s3_bucket)
    src = tmp_path / "big.bin"
    digest = write_file(src, 24 * MIB)
    child = subprocess.Popen([sys.executable, str(WORKER), json.dumps(harness.spec), "stall",
                              str(src), digest, str(12 * MIB)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout and child.stdout.readline().strip() == "stalled"
    finally:
        child.kill()
        child.communicate(timeout=30)
    assert harness.pending_uploads() == 1
    assert harness.backend.sweep_uploads(older_than=0) == 1
    assert harness.pending_uploads() == 0 and harness.raw_keys() == []


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1", True])
def test_sweep_uploads_checks_its_argument(tmp_path: Path, bad: object) -> None:
    backend = FsspecStorageBackend(f"file://{tmp_path}/r")
    with pytest.raises(InvalidArgumentError):
        backend.sweep_uploads(older_than=bad)  # type: ignore[arg-type]
    assert backend.sweep_uploads(older_than=0) == 0  # file://: nothing to sweep


# -- 5. parts in parallel ----------------------------------------------------------------------


@pytest.mark.parametrize("concurrency", [1, 4])
def test_parallel_parts_are_byte_exact(s3_bucket: str, s3_env: MotoS3, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch,
                                       concurrency: int) -> None:
    harness = S3Harness(s3_env, s3_bucket, max_concurrency=concurrency)
    src = tmp_path / "src.bin"
    digest = write_file(src, 5 * TEST_BLOCK + 123)  # 6 parts, the last 123 bytes
    fs = harness.backend._fs()
    real, lock, flight = fs.call_s3, threading.Lock(), [0, 0]  # now, most

    def call(method: str, *args: Any, **kwargs: Any) -> Any:
        if method != "upload_part":
            return real(method, *args, **kwargs)
        with lock:
            flight[0] += 1
            flight[1] = max(flight)
        try:
            time.sleep(0.05)  # (moto on loopback answers faster than we read a block)
            return real(method, *args, **kwargs)
        finally:
            with lock:
                flight[0] -= 1

    monkeypatch.setattr(fs, "call_s3", call)
    harness.backend.upload(src, digest)
    assert flight[1] == concurrency  # as many in flight as allowed, never more
    head = harness.client.head_object(Bucket=s3_bucket, Key=f"store/p/{layout_key(digest)}")
    assert head["ETag"].endswith('-6"') and head["ContentLength"] == src.stat().st_size
    assert harness.backend.download(digest, tmp_path / "out").read_bytes() == src.read_bytes()
    assert harness.pending_uploads() == 0


# -- 6. memory, for 1 GB -------------------------------------------------------------------


@pytest.mark.slow
def test_one_gigabyte_round_trip_keeps_memory_flat(moto_process: MotoProcess,  # noqa: F811
                                                   tmp_path: Path) -> None:
    """Upload and download 1 GB with the defaults (16 MiB parts, 4 in flight) in a child
    process whose peak RSS growth is measured (``helpers/backend_worker.py rss``); the
    server runs in a process of its own, so its copy of the object is not counted."""
    moto_process.client().create_bucket(Bucket="big")
    src = tmp_path / "big.bin"
    digest = write_file(src, GB, seed=7)  # (a repeated pattern: quick to write)
    spec = {"kind": "fsspec", "url": "s3://big/p", "retries": 2, "backoff": 0.1}
    target = tmp_path / "back.bin"
    start = time.monotonic()
    child = subprocess.run([sys.executable, str(WORKER), json.dumps(spec), "rss", str(src),
                            digest, str(target)], capture_output=True, text=True, timeout=240)
    took = time.monotonic() - start
    assert child.returncode == 0, child.stderr[-3000:]
    report = json.loads(child.stdout.splitlines()[-1])
    assert report["growth_mb"] < BIG_RSS_LIMIT_MB, report
    assert target.stat().st_size == GB and hash_file(target) == digest
    assert took < 120, f"1 GB round trip took {took:.0f} s"


# -- 7. the server dies mid-upload -----------------------------------------------------------


@pytest.mark.slow
def test_server_dying_mid_upload(moto_process: MotoProcess, tmp_path: Path,  # noqa: F811
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPRO_REMOTE_RETRIES", "2")
    monkeypatch.setenv("REPRO_REMOTE_BACKOFF", "0.05")
    constants.reload()  # settings are parsed at their next use: from these values now, and
    try:  # from the restored environment after the test
        _die_and_come_back(moto_process, tmp_path)
    finally:
        constants.reload()


def _die_and_come_back(server: MotoProcess, tmp_path: Path) -> None:
    client = server.client()
    client.create_bucket(Bucket="dies")
    work = tmp_path / "work"
    work.mkdir()
    src = work / "src.bin"
    digest = write_file(src, 160 * MIB, seed=3)
    backend = FsspecStorageBackend("s3://dies/p", block_size=TEST_BLOCK)
    assert (backend._retry.retries, backend._retry.backoff) == (2, 0.05)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            backend.upload(src, digest)
        except BaseException as exc:  # examined below
            errors.append(exc)

    thread = threading.Thread(target=upload)
    thread.start()
    _wait_for_parts(client, "dies", 3, thread)
    server.kill()
    thread.join(120)
    assert not thread.is_alive() and len(errors) == 1, errors
    assert isinstance(errors[0], StorageError) and "3 attempts" in str(errors[0]), errors[0]
    assert os.listdir(work) == ["src.bin"]  # nothing of ours left on this side
    server.start()  # same port, new and empty: the bucket must be made again
    client.create_bucket(Bucket="dies")
    assert client.list_objects_v2(Bucket="dies").get("KeyCount") == 0
    assert not backend.exists(digest)
    backend.upload(src, digest)  # the same backend object: its dead connections are replaced
    out = backend.download(digest, work / "out.bin")
    assert hash_file(out) == digest
    assert client.list_multipart_uploads(Bucket="dies").get("Uploads", []) == []


def _wait_for_parts(client: Any, bucket: str, parts: int, thread: threading.Thread) -> None:
    """Until the upload in ``thread`` has ``parts`` parts on the server."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and thread.is_alive():
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            listed = client.list_parts(Bucket=bucket, Key=upload["Key"],
                                       UploadId=upload["UploadId"])
            if len(listed.get("Parts", [])) >= parts:
                return
        time.sleep(0.02)
    pytest.fail("the upload never got going (or finished before it could be cut)")
