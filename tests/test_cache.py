"""What ``use_artifact`` hands out: named, stable, checked paths (``repro_core._cache``).

- a served directory never disappears under a reader in another process, even when its blobs
  are republished (a new inode) and it must be rebuilt: the new build goes beside it;
- writing into a served path (possible as root despite mode 0444) is noticed before the next
  use serves the bytes, also with ``verify=False``; copy mode gives private writable copies;
- single files keep the name they were logged under (issue 9).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from repro_core import (
    ArtifactManager,
    IntegrityError,
    InvalidArgumentError,
    LocalStorageBackend,
    constants,
)

# -- a directory stays valid while it is read -----------------------------------------------------

_READER = textwrap.dedent("""
    import os, sys
    root, stop = sys.argv[1], sys.argv[2]
    missing = passes = 0
    while not os.path.exists(stop):
        for dirpath, _, names in os.walk(root):
            for name in names:
                try:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        f.read()
                except FileNotFoundError:
                    missing += 1
        if not os.path.isdir(root):
            missing += 1
        passes += 1
        print(passes, flush=True)  # the parent waits for one pass per round: no sleeps
    print("done", missing, passes, flush=True)
""")


@pytest.mark.slow
def test_served_directory_survives_republish_and_rebuild(manager: ArtifactManager, run: object,
                                                         tmp_path: Path,
                                                         store_root: Path) -> None:
    src = tmp_path / "src"
    for i in range(40):
        (src / f"d{i % 4}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 4}" / f"f{i}.bin").write_bytes(os.urandom(2048))
    meta = manager.log_artifact("ds", "dataset", file_path=src)
    first = manager.use_artifact(meta.key).path
    assert first is not None
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(first), str(stop)],
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout is not None
    try:
        reader.stdout.readline()  # one full pass done: it is reading
        paths = set()
        for _ in range(15):
            # Forget what the store knows about its blobs (a fresh clone, a lost cache) so each
            # re-log really republishes them as new inodes and the tree must be rebuilt.
            shutil.rmtree(store_root / "cache" / "identity", ignore_errors=True)
            assert manager.log_artifact("ds", "dataset", file_path=src).version == meta.version
            used = manager.use_artifact(meta.key).path
            assert used is not None
            paths.add(used)
            reader.stdout.readline()
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=120)
    done = out.strip().splitlines()[-1].split()
    assert done[0] == "done" and int(done[1]) == 0, out[-500:]
    assert len(paths) > 1  # it was rebuilt, beside the old one
    for path in [first, *paths]:  # every path handed out is still there, complete
        assert sorted(p.relative_to(path) for p in path.rglob("*.bin")) == \
            sorted(p.relative_to(src) for p in src.rglob("*.bin"))


def test_relogging_identical_files_keeps_the_blob_inode(manager: ArtifactManager, run: object,
                                                        tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 1000)
    meta = manager.log_artifact("f", "dataset", file_path=src)
    blob = LocalStorageBackend(manager.root).blob_path(meta.hash)  # type: ignore[arg-type]
    before = blob.stat().st_ino
    manager.log_artifact("g", "dataset", file_path=src)
    assert blob.stat().st_ino == before  # not republished: cached links stay valid
    used = manager.use_artifact(meta.key).path
    assert used is not None and used.stat().st_ino == before


def test_stale_generations_are_listed_only_after_grace(manager: ArtifactManager, run: object,
                                                       tmp_path: Path, store_root: Path) -> None:
    from repro_core import _cache

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    meta = manager.log_artifact("ds", "dataset", file_path=src)
    old = manager.use_artifact(meta.key).path
    shutil.rmtree(store_root / "cache" / "identity")
    manager.log_artifact("other", "dataset", file_path=src / "a.txt")  # republishes the blob
    new = manager.use_artifact(meta.key).path
    assert old is not None and new is not None and old != new and old.is_dir()
    store = LocalStorageBackend(store_root)
    assert [e for e in _cache.stale_entries(store, 3600) if e.kind == "tree"] == []
    stale = _cache.stale_entries(store, 0)
    assert [store_root / e.path for e in stale if e.kind == "tree"] == [old]
    for entry in stale:
        _cache.remove_stale(store, entry)
    assert not old.exists() and (new / "a.txt").read_bytes() == b"alpha"
    assert manager.use_artifact(meta.key).path == new


# -- writes into a served path --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["data", "file", "directory"])
def test_write_into_served_path_is_never_served(manager: ArtifactManager, run: object,
                                                tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"A" * 4096)
    if kind == "data":
        meta = manager.log_artifact("w", "model", data=b"A" * 4096)
    else:
        meta = manager.log_artifact("w", "model", file_path=src if kind == "directory"
                                    else src / "w.bin")
    used = manager.use_artifact(meta.key).path
    assert used is not None
    target = used / "w.bin" if kind == "directory" else used
    with open(target, "r+b") as f:  # root writes despite mode 0444; same size, same inode
        f.write(b"B")
    with pytest.raises(IntegrityError):
        manager.use_artifact(meta.key, verify=False)
    with pytest.raises(IntegrityError):
        manager.use_artifact(meta.key, verify=True)


def test_size_only_use_trusts_an_unchanged_blob(manager: ArtifactManager, run: object,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """verify=False re-hashes only when the blob's identity changed (no hashing otherwise)."""
    from repro_core.store import local

    meta = manager.log_artifact("w", "model", data=b"A" * 4096)
    calls: list[object] = []
    real = local.hash_file
    monkeypatch.setattr(local, "hash_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    manager.use_artifact(meta.key, verify=False)
    assert calls == []
    manager.use_artifact(meta.key, verify=True)
    assert len(calls) == 1


@pytest.mark.parametrize("kind", ["data", "directory"])
def test_copy_mode_gives_a_private_writable_copy(manager: ArtifactManager, run: object,
                                                 tmp_path: Path, kind: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "w.bin").write_bytes(b"A" * 4096)
    (src / "run.sh").write_bytes(b"#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    meta = (manager.log_artifact("w", "model", data=b"A" * 4096) if kind == "data"
            else manager.log_artifact("w", "model", file_path=src))
    monkeypatch.setattr(constants, "REPRO_MATERIALIZE", "copy")
    copy = manager.use_artifact(meta.key).path
    assert copy is not None
    target = copy / "w.bin" if kind == "directory" else copy
    assert target.stat().st_mode & stat.S_IWUSR
    target.write_bytes(b"edited")
    if kind == "directory":
        assert os.access(copy / "run.sh", os.X_OK)
    again = manager.use_artifact(meta.key).path  # another, fresh private copy
    assert again is not None and again != copy
    monkeypatch.setattr(constants, "REPRO_MATERIALIZE", "link")
    shared = manager.use_artifact(meta.key, verify=True).path
    assert shared is not None
    assert (shared / "w.bin" if kind == "directory" else shared).read_bytes() == b"A" * 4096


def test_copy_to_a_chosen_directory(manager: ArtifactManager, run: object,
                                    tmp_path: Path, store_root: Path) -> None:
    from repro_core import _cache

    meta = manager.log_artifact("cfg", "config", data={"lr": 1})
    store = LocalStorageBackend(store_root)
    seen: list[int] = []
    out = _cache.serve_file(store, meta.hash, meta.size_bytes,  # type: ignore[arg-type]
                            "cfg.json", copy=True, dest=tmp_path / "mine" / "cfg.json",
                            progress=seen.append)
    assert out == tmp_path / "mine" / "cfg.json" and out.read_bytes() == b'{"lr":1}'
    assert sum(seen) == 8
    with pytest.raises(InvalidArgumentError, match="already exists"):
        _cache.serve_file(store, meta.hash, meta.size_bytes,  # type: ignore[arg-type]
                          "cfg.json", copy=True, dest=out)


# -- file names (issue 9) -------------------------------------------------------------------------


def test_single_files_keep_their_name(manager: ArtifactManager, run: object,
                                      tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    np = pytest.importorskip("numpy")
    src = tmp_path / "weights.ckpt"
    src.write_bytes(b"ckpt bytes")
    cases = {
        "model.safetensors": manager.log_artifact("model", "model", data={"w": torch.ones(2)}),
        "arr.npy": manager.log_artifact("arr", "dataset", data=np.arange(3)),
        "cfg.json": manager.log_artifact("cfg", "config", data={"lr": 0.1}),
        "notes.txt": manager.log_artifact("notes", "config", data="hello"),
        "raw.bin": manager.log_artifact("raw", "dataset", data=b"\x00\x01"),
        "weights.ckpt": manager.log_artifact("ckpt", "checkpoint", file_path=src),
    }
    for name, meta in cases.items():
        assert meta.path is not None and meta.path.name == name, meta.path
        used = manager.use_artifact(meta.key).path
        assert used is not None and used.name == name and not used.is_symlink()
        assert not used.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
    assert torch.equal(manager.load_artifact(cases["model.safetensors"].key)["w"], torch.ones(2))
    assert np.array_equal(manager.load_artifact(cases["arr.npy"].key), np.arange(3))
    assert manager.load_artifact(cases["cfg.json"].key) == {"lr": 0.1}
    assert manager.use_artifact(cases["weights.ckpt"].key).path.read_bytes() == b"ckpt bytes"


@pytest.mark.parametrize("forged", ["../evil", "a/b", "x\x00y", ".", "..", "", "n" * 256,
                                    "é" * 128])
def test_forged_file_name_falls_back_to_the_digest(manager: ArtifactManager, run: object,
                                                   store_root: Path, forged: str) -> None:
    meta = manager.log_artifact("raw", "dataset", data=b"\x00\x01")
    con = sqlite3.connect(store_root / "registry.sqlite")
    with con:
        con.execute("UPDATE versions SET filename = ? WHERE digest = ?", (forged, meta.hash))
    con.close()
    used = manager.use_artifact(meta.key).path
    assert used is not None and used.name == meta.hash.split(":")[1]  # type: ignore[union-attr]
    assert used.resolve().is_relative_to(store_root.resolve())


def test_planted_symlink_in_the_file_cache_is_replaced(manager: ArtifactManager, run: object,
                                                       tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    meta = manager.log_artifact("raw", "dataset", data=b"\x00\x01")
    assert meta.path is not None
    meta.path.unlink()
    meta.path.symlink_to(victim)
    used = manager.use_artifact(meta.key).path
    assert used == meta.path and not used.is_symlink() and used.read_bytes() == b"\x00\x01"
    assert victim.read_bytes() == b"precious"


def test_planted_symlink_in_a_tree_is_not_served(manager: ArtifactManager, run: object,
                                                 tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    meta = manager.log_artifact("ds", "dataset", file_path=src)
    assert meta.path is not None
    (meta.path / "a.txt").unlink()
    (meta.path / "a.txt").symlink_to(victim)
    used = manager.use_artifact(meta.key).path
    assert used is not None and used != meta.path
    assert not (used / "a.txt").is_symlink() and (used / "a.txt").read_bytes() == b"alpha"
    assert victim.read_bytes() == b"precious"


def test_gc_removes_planted_links_without_following_them(manager: ArtifactManager, run: object,
                                                         tmp_path: Path,
                                                         store_root: Path) -> None:
    from repro_core import _cache

    victim_dir = tmp_path / "outside"
    victim_dir.mkdir()
    (victim_dir / "keep.txt").write_bytes(b"precious")
    manager.log_artifact("raw", "dataset", data=b"\x00\x01")
    planted = store_root / "cache" / "trees" / "blake3" / ("0" * 64)
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.symlink_to(victim_dir, target_is_directory=True)
    legacy = store_root / "cache" / "dirs" / "blake3" / ("1" * 64)
    legacy.mkdir(parents=True)
    (legacy / "old.txt").write_bytes(b"old layout")
    store = LocalStorageBackend(store_root)
    stale = _cache.stale_entries(store, 0)
    kinds = {store_root / e.path: e.kind for e in stale}
    assert kinds[planted] == "foreign" and kinds[legacy] == "legacy"
    for entry in stale:
        _cache.remove_stale(store, entry)
    assert not planted.is_symlink() and not legacy.exists()
    assert (victim_dir / "keep.txt").read_bytes() == b"precious"


def test_read_only_store_serves_the_blob_itself(manager: ArtifactManager, run: object,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the cache cannot be written (read-only mount, someone else's store) a file is
    served as its blob, which this user cannot write either."""
    import errno

    from repro_core import _cache

    meta = manager.log_artifact("raw", "dataset", data=b"\x00\x01")

    def refuse(*args: object) -> Path:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(_cache, "_linked_file", refuse)
    used = manager.use_artifact(meta.key).path
    assert used == LocalStorageBackend(manager.root).blob_path(meta.hash)  # type: ignore[arg-type]


def test_planted_generation_link_is_not_served(manager: ArtifactManager, run: object,
                                               tmp_path: Path, store_root: Path) -> None:
    """A symlink named like a (newer) generation, pointing at a look-alike tree outside, is
    never handed out."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"alpha")
    meta = manager.log_artifact("ds", "dataset", file_path=src)
    served = manager.use_artifact(meta.key).path
    assert served is not None
    fake = tmp_path / "fake"
    fake.mkdir()
    os.link(served / "a.txt", fake / "a.txt")  # even the blob's own inode
    newer = served.parent / ("g" + "f" * 16 + "-00000000")
    newer.symlink_to(fake, target_is_directory=True)
    shutil.copy(served.parent / f"{served.name}.json", served.parent / f"{newer.name}.json")
    assert manager.use_artifact(meta.key).path == served
