"""LocalStorageBackend: the seed methods, atomic publish, dedup, read-only blobs, tmp sweeping."""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest

from repro_core import ArtifactNotFoundError, IntegrityError, LocalStorageBackend, constants
from repro_core.hashing import hash_bytes
from repro_core.registry import detect_network_fs
from repro_core.store import _identity


@pytest.fixture
def store(tmp_path: Path) -> LocalStorageBackend:
    return LocalStorageBackend(tmp_path / "cache")


def test_upload_download_exists_delete(store: LocalStorageBackend, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"hello")
    digest = hash_bytes(b"hello")
    assert not store.exists(digest)
    location = store.upload(src, digest)
    assert Path(location) == store.blob_path(digest) and store.exists(digest)
    mode = store.blob_path(digest).stat().st_mode
    assert not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)  # read-only blob
    out = store.download(digest, tmp_path / "out" / "f.bin")
    assert out.read_bytes() == b"hello"
    assert list(store.iter_digests()) == [digest]
    store.verify(digest)
    assert store.delete(digest) and not store.delete(digest)
    with pytest.raises(ArtifactNotFoundError):
        store.download(digest, tmp_path / "again")


def test_upload_refuses_wrong_digest(store: LocalStorageBackend, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"hello")
    wrong = hash_bytes(b"other")
    with pytest.raises(IntegrityError) as info:
        store.upload(src, wrong)
    assert info.value.expected == wrong and info.value.actual == hash_bytes(b"hello")
    assert list(store.iter_digests()) == [] and list(store.tmp_dir.iterdir()) == []


def test_sha256_store(tmp_path: Path) -> None:
    store = LocalStorageBackend(tmp_path / "s", algorithm="sha256")
    with store.open_writer() as w:
        w.write(b"abc")
        digest, size = w.commit()
    assert digest == hash_bytes(b"abc", "sha256") and size == 3
    assert store.blob_path(digest).parent.parent.name == "sha256"


def test_dedup_discards_second_copy(store: LocalStorageBackend) -> None:
    for _ in range(2):
        with store.open_writer() as w:
            w.write(b"same bytes")
            digest, _ = w.commit()
    assert list(store.iter_digests()) == [digest]
    assert list(store.tmp_dir.iterdir()) == []


def test_wrong_sized_existing_blob_is_replaced(store: LocalStorageBackend) -> None:
    digest = hash_bytes(b"payload")
    path = store.blob_path(digest)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"pay")  # a truncated leftover (e.g. restored from a bad backup)
    with store.open_writer() as w:
        w.write(b"payload")
        w.commit()
    assert path.read_bytes() == b"payload"


def test_aborted_writer_leaves_nothing(store: LocalStorageBackend) -> None:
    with pytest.raises(RuntimeError), store.open_writer() as w:
        w.write(b"partial")
        raise RuntimeError("serializer failed")
    assert list(store.iter_digests()) == [] and list(store.tmp_dir.iterdir()) == []


def test_sweep_spares_live_writers(store: LocalStorageBackend) -> None:
    live = store.open_writer()
    live.write(b"in flight")
    store.ensure_layout()
    dead = store.tmp_dir / "12345-deadbeef.part"
    dead.write_bytes(b"left by kill -9")
    assert store.sweep_tmp() == 1
    assert not dead.exists() and live.temp_path.exists()
    digest, _ = live.commit()
    assert store.exists(digest)


def test_sweep_removes_old_files_even_when_locked(store: LocalStorageBackend,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    store.ensure_layout()
    old = store.tmp_dir / "1-old.part"
    old.write_bytes(b"x")
    fd = os.open(old, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.utime(old, (1, 1))
    monkeypatch.setattr(constants, "REPRO_STALE_TMP_SECONDS", 60.0)
    try:
        assert store.sweep_tmp() == 1
    finally:
        os.close(fd)


def test_fsync_none_still_publishes(store: LocalStorageBackend,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(constants, "REPRO_FSYNC", "none")
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    with store.open_writer() as w:
        w.write(b"scratch")
        digest, _ = w.commit()
    assert store.exists(digest) and calls == []
    monkeypatch.setattr(constants, "REPRO_FSYNC", "full")
    with store.open_writer() as w:
        w.write(b"durable")
        w.commit()
    assert len(calls) == 2  # the file and its directory


MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /mnt/nfs rw,relatime shared:20 - nfs4 server:/export rw
41 22 0:36 / /mnt/lustre rw - lustre 10.0.0.1@tcp:/fs rw
42 22 0:37 / /mnt/fuse rw - fuse.sshfs host: rw
43 40 8:2 / /mnt/nfs/local rw - xfs /dev/sdb rw
"""


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/home/u/store", None), ("/mnt/nfs/store", "nfs4"), ("/mnt/lustre", "lustre"),
     ("/mnt/fuse/x/y", "fuse.sshfs"), ("/mnt/nfs/local/store", None), ("/mnt/nfsx", None)],
)
def test_detect_network_fs(path: str, expected: str | None) -> None:
    assert detect_network_fs(path, MOUNTINFO) == expected


def test_network_fs_warns_and_avoids_wal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from repro_core import registry as registry_module
    from repro_core.registry import engine_sqlite

    monkeypatch.setattr(engine_sqlite, "detect_network_fs", lambda path: "nfs4")
    reg = registry_module.Registry(tmp_path / "registry.sqlite")
    with pytest.warns(RuntimeWarning, match="network filesystem"):
        mode = reg._read("PRAGMA journal_mode")[0][0]
    assert mode == "delete"
    reg.close()


def test_republish_keeps_a_good_blob_and_repairs_a_bad_one(store: LocalStorageBackend,
                                                           tmp_path: Path) -> None:
    """Publishing bytes already stored keeps the blob's inode while its recorded identity
    vouches for it (cached hard links stay valid), and replaces it once it is known bad —
    also after "silent" rot that left its identity intact, once a check has seen the rot."""
    src = tmp_path / "f.bin"
    src.write_bytes(b"important bytes")
    digest, size = store.ingest_file(src)
    blob = store.blob_path(digest)
    inode = blob.stat().st_ino
    assert store.ingest_file(src) == (digest, size) and blob.stat().st_ino == inode
    blob.chmod(0o644)
    blob.write_bytes(b"hmportant bytes")  # silent rot: pretend the identity did not change
    _identity.save(store.root, digest, os.lstat(blob))
    assert store.check(digest, size, full=False) == blob  # size-only trusts the identity
    with pytest.raises(IntegrityError):
        store.check(digest, size, full=True)  # a hash sees it, and forgets the identity
    store.ingest_file(src)  # so re-logging repairs it
    assert blob.read_bytes() == b"important bytes" and blob.stat().st_ino != inode
    assert store.check(digest, size, full=False) == blob


def test_blob_identity_ignores_new_links_but_not_writes(store: LocalStorageBackend,
                                                        tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 100)
    digest, _ = store.ingest_file(src)
    blob = store.blob_path(digest)
    known = _identity.load(store.root, digest)
    assert known is not None and known.vouches_for(os.lstat(blob))
    os.link(blob, tmp_path / "link")  # ctime and nlink change together: not a write
    assert known.vouches_for(os.lstat(blob))
    with open(tmp_path / "link", "r+b") as f:  # root writes despite 0444
        f.write(b"y")
    assert not known.vouches_for(os.lstat(blob))


def test_big_writes_are_hashed_while_written(store: LocalStorageBackend) -> None:
    """Chunks of 4 MiB and more are hashed in another thread while they are written: the
    digest must still be the content's, in order, small and big chunks mixed, also in a
    forked child (which has none of the parent's hashing threads)."""
    chunks = [os.urandom(5 << 20), b"small", os.urandom(4 << 20), bytearray(os.urandom(9 << 20))]
    expected = hash_bytes(b"".join(chunks))
    with store.open_writer() as writer:
        for chunk in chunks:
            assert writer.write(chunk) == len(chunk)
        digest, size = writer.commit()
    assert (digest, size) == (expected, sum(map(len, chunks)))
    assert store.blob_path(digest).read_bytes() == b"".join(chunks)
    pid = os.fork()
    if pid == 0:  # the child writes a new big blob and reports through its exit status
        code = 1
        try:
            data = os.urandom(6 << 20)
            with store.open_writer() as child:
                child.write(data)
                code = 0 if child.commit()[0] == hash_bytes(data) else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
