"""One test suite every ``StorageBackend`` passes (as fsspec ships ``fsspec/tests/abstract``).

A test module subclasses :class:`BackendSuite` and provides a ``harness`` fixture
(``make_harness`` builds the local, fsspec-on-file:// and fsspec-on-S3 ones): the backend
under test plus a few ways to look behind its back (list the raw objects, flip a byte in a
stored object, tell whether an object was rewritten, count uploads in flight) and a JSON
``spec`` that rebuilds the same backend in a child process (``helpers/backend_worker.py``).
What the suite pins, for every backend:

- round trips are byte-exact and use the ``blobs/<algo>/<ab>/<rest>`` layout;
- storing a digest twice keeps one object and does not rewrite it;
- content that does not hash to its digest is refused (``IntegrityError``), nothing stored;
- a missing digest is ``ArtifactNotFoundError``; a corrupt object is an ``IntegrityError`` on
  download and ``verify``, and nothing is left at the target;
- an interrupted download or a killed upload leaves nothing visible on either side;
- a large file streams with flat memory; concurrent uploads of one digest give one object;
- ``iter_digests`` lists exactly the blobs; ``delete`` says whether there was one;
- an invalid digest is an ``InvalidArgumentError`` before any I/O.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from s3_support import MotoS3

from repro_core import (
    ArtifactNotFoundError,
    IntegrityError,
    InvalidArgumentError,
    StorageError,
    constants,
)
from repro_core.hashing import hash_bytes, hash_file, parse_digest
from repro_core.store import FsspecStorageBackend, LocalStorageBackend, StorageBackend, _stream

WORKER = Path(__file__).parent / "helpers" / "backend_worker.py"
MIB = 1024 * 1024
LARGE_FILE_BYTES = 256 * MIB
RSS_GROWTH_LIMIT_MB = 100
FAST: dict[str, Any] = {"retries": 1, "backoff": 0.01}  # keeps the suite's fault paths quick
TEST_BLOCK = 5 * MIB  # S3's smallest part: files of a few MiB already go multipart
HARNESS_KINDS = ["local", "fsspec-file", "fsspec-s3"]
BAD_DIGESTS = ["sha1:xyz", "blake3:../../x", "blake3:../../" + "0" * 58, "blake3:" + "A" * 64,
               "blake3:" + "0" * 63, "md5:" + "0" * 64, "", "blake3:" + "0" * 64 + "/x"]


class Harness:
    """The backend under test and what the suite needs to see behind its back."""

    backend: StorageBackend
    #: JSON-able description ``helpers/backend_worker.py`` rebuilds the backend from.
    spec: dict[str, Any]
    #: Whether a big upload is a multipart upload that ``pending_uploads`` can see.
    multipart: bool = False

    def raw_keys(self) -> list[str]:
        """Every object under the store's ``blobs/``, as ``blobs/…`` keys, sorted."""
        raise NotImplementedError

    def put_raw(self, key: str, data: bytes) -> None:
        """Write an object behind the backend's back (``key`` relative to the store root)."""
        raise NotImplementedError

    def corrupt(self, digest: str) -> None:
        """Flip one byte of the stored object (same size)."""
        raise NotImplementedError

    def stamp(self, digest: str) -> object:
        """Changes whenever the stored object is written again."""
        raise NotImplementedError

    def pending_uploads(self) -> int:
        """Uploads started and neither completed nor aborted (S3 multipart); 0 elsewhere."""
        return 0


def layout_key(digest: str) -> str:
    algorithm, hexdigest = parse_digest(digest)
    return f"blobs/{algorithm}/{hexdigest[:2]}/{hexdigest[2:]}"


def write_file(path: Path, size: int, seed: int = 0) -> str:
    """A file of ``size`` bytes (distinct per seed) written in 1 MiB slices; its digest."""
    block = os.urandom(MIB) if seed == 0 else bytes([seed % 256]) * MIB
    with open(path, "wb") as f:
        for i in range(0, size, MIB):
            f.write((i.to_bytes(8, "little") + block[8:])[:min(MIB, size - i)])
    return hash_file(path)


def worker(harness: Harness, *args: str, stdin: int | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKER), json.dumps(harness.spec), *args],
                            stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


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

    def __init__(self, moto: MotoS3, bucket: str, **options: Any) -> None:
        self.client, self.bucket, self.prefix = moto.client(), bucket, "store/p"
        self.url = f"s3://{bucket}/{self.prefix}"
        options = {"block_size": TEST_BLOCK, **FAST, **options}
        self.spec = {"kind": "fsspec", "url": self.url, **options}
        self.backend = FsspecStorageBackend(self.url, **options)

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


def make_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    """The harness of ``request.param`` (one of ``HARNESS_KINDS``); S3 on the session's moto."""
    if request.param == "local":
        return LocalHarness(tmp_path / "store")
    if request.param == "fsspec-file":
        return FileHarness(tmp_path / "remote")
    return S3Harness(request.getfixturevalue("s3_env"), request.getfixturevalue("s3_bucket"))


def upload_from_threads(backend: StorageBackend, src: Path, digest: str,
                        count: int = 4) -> list[BaseException]:
    """Upload one file from ``count`` threads released at once; the errors they raised."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def upload() -> None:
        try:
            barrier.wait()
            backend.upload(src, digest)
        except BaseException as exc:  # returned to the caller
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors


class BackendSuite:
    """The tests; a subclass provides the ``harness`` fixture."""

    # -- round trips and layout -------------------------------------------------------------

    @pytest.mark.parametrize("size", [0, 1, 3 * MIB + 17, 12 * MIB])
    def test_round_trip(self, harness: Harness, tmp_path: Path, size: int) -> None:
        src = tmp_path / "src.bin"
        digest = write_file(src, size) if size else hash_file(_empty(src))
        backend = harness.backend
        assert not backend.exists(digest)
        location = backend.upload(src, digest)
        assert isinstance(location, str) and backend.exists(digest)
        out = backend.download(digest, tmp_path / "deep" / "er" / "out.bin")
        assert out == tmp_path / "deep" / "er" / "out.bin"
        assert out.read_bytes() == src.read_bytes()
        assert harness.raw_keys() == [layout_key(digest)]
        backend.verify(digest)
        assert sorted(os.listdir(out.parent)) == ["out.bin"]  # no temp file left beside it

    def test_sha256_digests(self, harness: Harness, tmp_path: Path) -> None:
        src = tmp_path / "src.bin"
        src.write_bytes(b"interop with the HF Hub")
        digest = hash_file(src, "sha256")
        harness.backend.upload(src, digest)
        assert harness.backend.download(digest, tmp_path / "out").read_bytes() == src.read_bytes()
        assert list(harness.backend.iter_digests()) == [digest]

    def test_download_replaces_an_existing_target(self, harness: Harness,
                                                  tmp_path: Path) -> None:
        src = tmp_path / "src.bin"
        src.write_bytes(b"new")
        digest = hash_file(src)
        harness.backend.upload(src, digest)
        target = tmp_path / "target"
        target.write_bytes(b"old content")
        assert harness.backend.download(digest, target).read_bytes() == b"new"

    # -- dedup and refusing wrong content ---------------------------------------------------

    def test_same_digest_twice_stores_one_object(self, harness: Harness, tmp_path: Path) -> None:
        src = tmp_path / "src.bin"
        digest = write_file(src, 7 * MIB)
        first = harness.backend.upload(src, digest)
        stamp = harness.stamp(digest)
        copy = tmp_path / "copy.bin"
        copy.write_bytes(src.read_bytes())
        assert harness.backend.upload(copy, digest) == first
        assert harness.stamp(digest) == stamp  # not written again
        assert harness.raw_keys() == [layout_key(digest)]

    @pytest.mark.parametrize("size", [100, 12 * MIB])
    def test_content_not_matching_its_digest_is_refused(self, harness: Harness, tmp_path: Path,
                                                        size: int) -> None:
        src = tmp_path / "src.bin"
        actual = write_file(src, size)
        claimed = hash_bytes(b"something else")
        with pytest.raises(IntegrityError) as info:
            harness.backend.upload(src, claimed)
        assert info.value.expected == claimed and info.value.actual == actual
        assert not harness.backend.exists(claimed) and not harness.backend.exists(actual)
        assert harness.raw_keys() == [] and list(harness.backend.iter_digests()) == []
        assert harness.pending_uploads() == 0  # a multipart upload is aborted, not left

    def test_wrong_content_is_refused_when_the_digest_is_stored(self, harness: Harness,
                                                                tmp_path: Path) -> None:
        good = tmp_path / "good.bin"
        good.write_bytes(b"A" * 4096)
        digest = hash_file(good)
        harness.backend.upload(good, digest)
        bad = tmp_path / "bad.bin"
        bad.write_bytes(b"B" * 4096)  # same size: a size-only dedup check would let it pass
        with pytest.raises(IntegrityError):
            harness.backend.upload(bad, digest)
        assert harness.backend.download(digest, tmp_path / "out").read_bytes() == b"A" * 4096

    def test_unreadable_source_is_refused(self, harness: Harness, tmp_path: Path) -> None:
        with pytest.raises(StorageError):
            harness.backend.upload(tmp_path / "no-such-file", hash_bytes(b"x"))
        assert harness.raw_keys() == []

    # -- missing and corrupt objects --------------------------------------------------------

    def test_missing_digest(self, harness: Harness, tmp_path: Path) -> None:
        digest = hash_bytes(b"never stored")
        target = tmp_path / "sub" / "out"
        with pytest.raises(ArtifactNotFoundError) as info:
            harness.backend.download(digest, target)
        assert info.value.key == digest
        assert not target.parent.exists()  # nothing created on our side either
        assert not harness.backend.exists(digest)
        assert harness.backend.delete(digest) is False
        with pytest.raises(IntegrityError):
            harness.backend.verify(digest)

    @pytest.mark.parametrize("size", [10, 3 * MIB])
    def test_corrupt_object_is_detected(self, harness: Harness, tmp_path: Path,
                                        size: int) -> None:
        src = tmp_path / "src.bin"
        digest = write_file(src, size)
        harness.backend.upload(src, digest)
        harness.corrupt(digest)
        target = tmp_path / "out" / "f.bin"
        with pytest.raises(IntegrityError) as info:
            harness.backend.download(digest, target)
        assert info.value.expected == digest and info.value.actual != digest
        assert os.listdir(target.parent) == []  # no target, no temp file
        existing = tmp_path / "out" / "kept.bin"
        existing.write_bytes(b"mine")
        with pytest.raises(IntegrityError):
            harness.backend.download(digest, existing)
        assert existing.read_bytes() == b"mine"
        with pytest.raises(IntegrityError):
            harness.backend.verify(digest)

    # -- interrupted transfers --------------------------------------------------------------

    @pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                         KeyboardInterrupt()])
    def test_interrupted_download_leaves_nothing(self, harness: Harness, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 failure: BaseException) -> None:
        src = tmp_path / "src.bin"
        digest = write_file(src, 3 * MIB)
        harness.backend.upload(src, digest)
        monkeypatch.setattr(constants, "IO_CHUNK", MIB)  # three chunks: fail in the middle
        monkeypatch.setattr(constants, "REMOTE_READ_CHUNK", MIB)
        real_write, calls = _stream._write, [0]

        def failing_write(fd: int, view: memoryview) -> None:
            calls[0] += 1
            if calls[0] == 2:
                raise failure
            real_write(fd, view)

        monkeypatch.setattr(_stream, "_write", failing_write)
        target = tmp_path / "out" / "f.bin"
        with pytest.raises(StorageError if isinstance(failure, OSError) else KeyboardInterrupt):
            harness.backend.download(digest, target)
        assert calls[0] == 2 and os.listdir(target.parent) == []
        monkeypatch.undo()
        harness.backend.verify(digest)  # the stored side is untouched
        assert harness.raw_keys() == [layout_key(digest)]

    @pytest.mark.slow
    def test_killed_upload_leaves_nothing_visible(self, harness: Harness,
                                                  tmp_path: Path) -> None:
        src = tmp_path / "big.bin"
        digest = write_file(src, 24 * MIB)
        child = worker(harness, "stall", str(src), digest, str(12 * MIB))
        try:
            line = child.stdout.readline() if child.stdout else ""
            assert line.strip() == "stalled", (line, child.stderr.read() if child.stderr else "")
            in_flight = harness.pending_uploads()
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.communicate(timeout=30)
        assert not harness.backend.exists(digest)
        assert list(harness.backend.iter_digests()) == [] and harness.raw_keys() == []
        assert in_flight == harness.pending_uploads() == (1 if harness.multipart else 0)
        harness.backend.upload(src, digest)  # and the next upload simply works
        assert harness.raw_keys() == [layout_key(digest)]
        harness.backend.verify(digest)

    # -- big files and concurrency ----------------------------------------------------------

    @pytest.mark.slow
    def test_large_file_streams_with_flat_memory(self, harness: Harness,
                                                 tmp_path: Path) -> None:
        src = tmp_path / "large.bin"
        digest = write_file(src, LARGE_FILE_BYTES)
        target = tmp_path / "back.bin"
        spec = dict(harness.spec, block_size=None)  # the default part size, as users get it
        child = subprocess.run([sys.executable, str(WORKER), json.dumps(spec), "rss", str(src),
                                digest, str(target)], capture_output=True, text=True,
                               timeout=300)
        assert child.returncode == 0, child.stderr[-3000:]
        report = json.loads(child.stdout.splitlines()[-1])
        assert report["growth_mb"] < RSS_GROWTH_LIMIT_MB, report
        assert target.stat().st_size == LARGE_FILE_BYTES and hash_file(target) == digest
        assert layout_key(digest) in harness.raw_keys()  # (beside the warm-up's small file)
        assert harness.pending_uploads() == 0

    def test_concurrent_uploads_from_threads(self, harness: Harness, tmp_path: Path) -> None:
        src = tmp_path / "src.bin"
        digest = write_file(src, 11 * MIB)
        assert upload_from_threads(harness.backend, src, digest) == []
        self._one_complete_object(harness, tmp_path, src, digest)

    @pytest.mark.slow
    def test_concurrent_uploads_from_processes(self, harness: Harness, tmp_path: Path) -> None:
        src = tmp_path / "src.bin"
        digest = write_file(src, 11 * MIB)
        children = [worker(harness, "upload", str(src), digest, stdin=subprocess.PIPE)
                    for _ in range(3)]
        for child in children:  # all started and ready, then all go at once
            assert child.stdout and child.stdout.readline().strip() == "ready"
        for child in children:
            assert child.stdin
            child.stdin.write("go\n")
            child.stdin.flush()
        for child in children:
            out, err = child.communicate(timeout=120)
            assert child.returncode == 0 and out.strip() == "done", err[-3000:]
        self._one_complete_object(harness, tmp_path, src, digest)

    @staticmethod
    def _one_complete_object(harness: Harness, tmp_path: Path, src: Path, digest: str) -> None:
        assert harness.raw_keys() == [layout_key(digest)]
        assert list(harness.backend.iter_digests()) == [digest]
        assert harness.pending_uploads() == 0
        out = harness.backend.download(digest, tmp_path / "concurrent.out")
        assert out.read_bytes() == src.read_bytes()

    # -- listing, deleting, bad input -------------------------------------------------------

    def test_iter_digests_lists_exactly_the_blobs(self, harness: Harness, tmp_path: Path) -> None:
        digests = []
        for i, algorithm in enumerate(["blake3", "blake3", "sha256"]):
            src = tmp_path / f"f{i}"
            src.write_bytes(f"content {i}".encode())
            digest = hash_file(src, algorithm)
            harness.backend.upload(src, digest)
            digests.append(digest)
        shard = layout_key(digests[0]).rsplit("/", 1)[0]
        for stray in (f"{shard}/.DS_Store", f"{shard}/notes.txt", "blobs/blake3/README",
                      "blobs/md5/ab/" + "0" * 30, f"{shard}/{'0' * 61}"):
            harness.put_raw(stray, b"not a blob")
        assert list(harness.backend.iter_digests()) == sorted(digests)

    def test_delete(self, harness: Harness, tmp_path: Path) -> None:
        src = tmp_path / "src.bin"
        src.write_bytes(b"to be deleted")
        digest = hash_file(src)
        harness.backend.upload(src, digest)
        assert harness.backend.delete(digest) is True
        assert harness.backend.delete(digest) is False
        assert not harness.backend.exists(digest) and harness.raw_keys() == []
        with pytest.raises(ArtifactNotFoundError):
            harness.backend.download(digest, tmp_path / "out")
        harness.backend.upload(src, digest)  # and it can be stored again
        assert harness.backend.exists(digest)

    @pytest.mark.parametrize("bad", BAD_DIGESTS)
    def test_invalid_digest_is_refused_before_any_io(self, harness: Harness, tmp_path: Path,
                                                     bad: str) -> None:
        src = tmp_path / "src.bin"
        src.write_bytes(b"x")
        target = tmp_path / "sub" / "out"
        backend = harness.backend
        calls = [lambda: backend.upload(src, bad), lambda: backend.download(bad, target),
                 lambda: backend.exists(bad), lambda: backend.delete(bad),
                 lambda: backend.verify(bad)]
        for call in calls:
            with pytest.raises(InvalidArgumentError):
                call()
        assert not target.parent.exists() and harness.raw_keys() == []


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path
