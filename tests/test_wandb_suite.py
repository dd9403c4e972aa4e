"""``backend_suite`` for ``WandBStorageBackend`` in W&B offline mode, test by test.

``BackendSuite`` round-trips through ``download`` and looks at a ``blobs/…`` tree; an offline
W&B run can do neither (reads need the server, and W&B keeps artifacts, not a blob tree), so
its tests are restated here for what offline W&B *does* promise, with the suite's own helpers
(``write_file``, ``BAD_DIGESTS``, sizes):

========================================  =================================================
BackendSuite                              W&B offline
========================================  =================================================
test_round_trip, test_sha256_digests      the upload's artifact record in the offline run
                                          names the digest and holds the file, and the
                                          staged copy ``wandb sync`` uploads is byte-exact
test_same_digest_twice_…                  one location, and records W&B dedups at sync
                                          (same manifest digest: one artifact version)
test_content_not_matching_its_digest_…    ``IntegrityError`` (expected/actual), no record,
test_wrong_content_is_refused_…           nothing staged
test_unreadable_source_is_refused         ``StorageError``, no record
test_concurrent_uploads_from_threads      every upload logged, all one W&B version
test_invalid_digest_is_refused_…          ``InvalidArgumentError`` on every call, before
                                          any I/O (no run opened, nothing staged)
test_missing_digest, test_corrupt_…,      download / exists / delete / iter_digests /
test_iter_digests_…, test_delete,         verify: ``StorageError`` naming ``wandb sync``
test_interrupted_download_…               and the local store; the target is never created
                                          or changed (online reads: test_wandb_backend)
killed upload, large file, processes      not restated: W&B stages and uploads on its own
========================================  =================================================

The offline run is read back as ``wandb sync`` reads it (``read_records``: W&B's record log,
checksums checked, records parsed with W&B's own protobuf classes); that reader and the
offline environment (``offline_env``) are shared with ``test_wandb_backend``.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from backend_suite import BAD_DIGESTS, MIB, upload_from_threads, write_file

from repro_core import (
    IntegrityError,
    InvalidArgumentError,
    StorageError,
    WandBStorageBackend,
    constants,
)
from repro_core.hashing import hash_bytes, hash_file
from repro_core.store.wandb_backend import artifact_name

wandb = pytest.importorskip("wandb")

# -- the offline run, read back as `wandb sync` reads it --------------------------------------

_HEADER = b":W&B" + (0xBEE1).to_bytes(2, "little") + b"\x00"
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    """Every record of a ``.wandb`` file (blocks of 32 KiB, 7-byte chunk headers: CRC-32 of
    type byte + payload, length, type), parsed with W&B's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:7] == _HEADER, data[:7]
    payloads, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # the block's tail is padding
            pos += room
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad checksum at {pos} in {path}"
        pos += 7 + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            payloads.append(pending)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # (generated)
        record.ParseFromString(payload)
        records.append(record)
    return records


def finish(run: Any, timeout: float = 30.0) -> Path:
    """Finish ``run`` and wait for its ``.wandb`` file to end in the exit record: wandb 0.31
    returns from ``finish`` before wandb-core has written the file (the backend's ``close``
    waits for the same thing; this is the test's own check of it)."""
    run.finish()
    path = Path(run.settings.sync_file)
    deadline = time.monotonic() + timeout
    while not (path.exists() and _ends_in_exit(path)):
        assert time.monotonic() < deadline, f"{path} was not written in {timeout} s"
        time.sleep(0.05)
    return path


def _ends_in_exit(path: Path) -> bool:
    try:
        records = read_records(path)
    except AssertionError:  # a chunk still being written
        return False
    return bool(records) and records[-1].WhichOneof("record_type") == "exit"


def run_files(root: Path) -> list[Path]:
    return sorted(root.rglob("offline-run-*/run-*.wandb"))


def logged_artifacts(root: Path) -> list[Any]:
    """The artifact records of every offline run under ``root``."""
    return [r.artifact for f in run_files(root) for r in read_records(f)
            if r.WhichOneof("record_type") == "artifact"]


def run_record(run_file: Path) -> Any:
    (record,) = [r.run for r in read_records(run_file) if r.WhichOneof("record_type") == "run"]
    return record


def md5_b64(data: bytes) -> str:
    """W&B's digest of a manifest entry."""
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def manifest(record: Any) -> dict[str, tuple[int, str, bytes]]:
    """path → (size, W&B digest, bytes of the staged copy ``wandb sync`` will upload)."""
    return {c.path: (c.size, c.digest, Path(c.local_path).read_bytes())
            for c in record.manifest.contents}


def offline_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B offline with every directory under ``tmp_path``; a server it could reach by
    mistake is a closed local port, so a wrongly online run fails fast instead of hanging."""
    for name, sub in (("WANDB_DIR", "wandb"), ("WANDB_DATA_DIR", "data"),
                      ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(name, str(tmp_path / sub))
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "20")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setattr(constants, "REPRO_OFFLINE", False)  # (parsed settings: restored after)
    return tmp_path


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return offline_env(tmp_path, monkeypatch)


@dataclass
class OfflineHarness:
    """The backend on a real offline run, and what the run recorded (read back after
    ``finish``, as ``wandb sync`` would read it)."""

    backend: WandBStorageBackend
    run: Any
    root: Path

    def artifacts(self) -> list[Any]:
        finish(self.run)
        return logged_artifacts(self.root / "wandb")

    def staged(self) -> list[Path]:
        return [p for p in (self.root / "data").rglob("*") if p.is_file()]


@pytest.fixture
def harness(tmp_path: Path, wandb_env: Path) -> Iterator[OfflineHarness]:
    run = wandb.init(project="repro-blobs", dir=str(tmp_path / "wandb"), reinit="create_new")
    try:
        yield OfflineHarness(WandBStorageBackend(run), run, tmp_path)
    finally:
        run.finish()


def _assert_holds(record: Any, digest: str, content: bytes) -> None:
    """``record`` is the artifact of ``digest`` and ``wandb sync`` would upload ``content``."""
    assert (record.name, record.type) == (artifact_name(digest), "repro-blob")
    assert "latest" in record.aliases
    assert manifest(record) == {artifact_name(digest): (len(content), md5_b64(content),
                                                        content)}


# -- uploads land in the offline run ----------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 3 * MIB + 17, 12 * MIB])
def test_round_trip_into_the_offline_run(harness: OfflineHarness, tmp_path: Path,
                                         size: int) -> None:
    src = tmp_path / "src.bin"
    if size:
        digest = write_file(src, size)
    else:
        src.write_bytes(b"")
        digest = hash_file(src)
    location = harness.backend.upload(src, digest)
    assert location == f"wandb-artifact://repro-blobs/{artifact_name(digest)}:latest"
    (record,) = harness.artifacts()
    _assert_holds(record, digest, src.read_bytes())


def test_sha256_digests(harness: OfflineHarness, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"interop with the HF Hub")
    digest = hash_file(src, "sha256")
    harness.backend.upload(src, digest)
    (record,) = harness.artifacts()
    assert record.name.startswith("sha256-")
    _assert_holds(record, digest, src.read_bytes())


def test_same_digest_twice_is_one_wandb_version(harness: OfflineHarness,
                                                tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    digest = write_file(src, 7 * MIB)
    first = harness.backend.upload(src, digest)
    copy = tmp_path / "copy.bin"
    copy.write_bytes(src.read_bytes())
    assert harness.backend.upload(copy, digest) == first
    records = harness.artifacts()
    assert len(records) == 2 and len({r.digest for r in records}) == 1  # W&B dedups at sync
    for record in records:
        _assert_holds(record, digest, src.read_bytes())


# -- refusing wrong content ------------------------------------------------------------------


@pytest.mark.parametrize("size", [100, 12 * MIB])
def test_content_not_matching_its_digest_is_refused(harness: OfflineHarness, tmp_path: Path,
                                                    size: int) -> None:
    src = tmp_path / "src.bin"
    actual = write_file(src, size)
    claimed = hash_bytes(b"something else")
    with pytest.raises(IntegrityError) as info:
        harness.backend.upload(src, claimed)
    assert info.value.expected == claimed and info.value.actual == actual
    assert harness.artifacts() == [] and harness.staged() == []


def test_wrong_content_is_refused_when_the_digest_is_logged(harness: OfflineHarness,
                                                            tmp_path: Path) -> None:
    good = tmp_path / "good.bin"
    good.write_bytes(b"A" * 4096)
    digest = hash_file(good)
    harness.backend.upload(good, digest)
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"B" * 4096)  # same size: a size-only check would let it pass
    with pytest.raises(IntegrityError):
        harness.backend.upload(bad, digest)
    (record,) = harness.artifacts()
    _assert_holds(record, digest, b"A" * 4096)


def test_unreadable_source_is_refused(harness: OfflineHarness, tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        harness.backend.upload(tmp_path / "no-such-file", hash_bytes(b"x"))
    with pytest.raises(StorageError, match="not a regular file"):
        harness.backend.upload(tmp_path, hash_bytes(b"x"))
    assert harness.artifacts() == []


def test_concurrent_uploads_from_threads(harness: OfflineHarness, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    digest = write_file(src, 11 * MIB)
    assert upload_from_threads(harness.backend, src, digest) == []
    records = harness.artifacts()
    assert len(records) == 4 and len({r.digest for r in records}) == 1
    _assert_holds(records[0], digest, src.read_bytes())


# -- invalid digests: refused before any I/O --------------------------------------------------


@pytest.mark.parametrize("bad", BAD_DIGESTS)
def test_invalid_digest_is_refused_before_any_io(tmp_path: Path, wandb_env: Path,
                                                 bad: str) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x")
    target = tmp_path / "sub" / "out"
    backend = WandBStorageBackend.from_url("wandb://repro-blobs")  # would open its own run
    good = hash_bytes(b"x")
    calls: list[Callable[[], Any]] = [
        lambda: backend.upload(src, bad), lambda: backend.download(bad, target),
        lambda: backend.exists(bad), lambda: backend.delete(bad), lambda: backend.verify(bad),
        lambda: backend.mirror_version(src, digest=bad, project="p", name="n", version=1,
                                       type="model"),
        lambda: backend.mirror_version(src, digest=good, project="p", name="n", version=1,
                                       type="model", parents=[bad])]
    for call in calls:
        with pytest.raises(InvalidArgumentError):
            call()
    assert not target.parent.exists()
    assert list((tmp_path / "wandb").iterdir()) == []  # no run was opened
    assert list((tmp_path / "data").rglob("*.*")) == []  # nothing staged


# -- what offline W&B cannot do: one StorageError, nothing at the target ---------------------


def _reads(backend: WandBStorageBackend, digest: str,
           target: Path) -> list[Callable[[], Any]]:
    return [lambda: backend.download(digest, target), lambda: backend.exists(digest),
            lambda: backend.delete(digest), lambda: list(backend.iter_digests()),
            lambda: backend.verify(digest)]


@pytest.mark.parametrize("logged", [True, False], ids=["logged", "never-logged"])
def test_offline_reads_name_wandb_sync_and_the_local_store(harness: OfflineHarness,
                                                           tmp_path: Path,
                                                           logged: bool) -> None:
    src = tmp_path / "src.bin"
    digest = write_file(src, 3 * MIB)
    if logged:
        harness.backend.upload(src, digest)
    target = tmp_path / "out" / "f.bin"
    for call in _reads(harness.backend, digest, target):
        with pytest.raises(StorageError, match="wandb sync") as info:
            call()
        assert "local repro store" in str(info.value)
    assert not target.parent.exists()  # never an empty file at the target
    existing = tmp_path / "kept.bin"
    existing.write_bytes(b"mine")
    with pytest.raises(StorageError, match="wandb sync"):
        harness.backend.download(digest, existing)
    assert existing.read_bytes() == b"mine"


def test_offline_reads_without_a_run(tmp_path: Path, wandb_env: Path) -> None:
    """A ``wandb://`` remote's backend before any push: offline by W&B's settings alone."""
    backend = WandBStorageBackend.from_url("wandb://team/repro-blobs")
    target = tmp_path / "out" / "f.bin"
    for call in _reads(backend, hash_bytes(b"x"), target):
        with pytest.raises(StorageError, match="wandb sync"):
            call()
    assert not target.parent.exists() and list((tmp_path / "wandb").iterdir()) == []
