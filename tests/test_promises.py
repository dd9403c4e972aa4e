"""README promises that span modules (issue 9, "the suite proves what README promises").

Each test here was written against a mutation that left the suite green before it: settings
read from the environment (``REPRO_VERIFY``, ``REPRO_HASH``, ``REPRO_FSYNC``,
``REPRO_STALE_TMP_SECONDS``) and gc's publish guard. Settings are set the way users set them —
in the environment, parsed by ``constants`` — never by patching ``constants.X``.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from repro_core import (
    ArtifactManager,
    IntegrityError,
    InvalidArgumentError,
    LocalStorageBackend,
    collect_garbage,
    constants,
    hash_bytes,
    verify_store,
)
from repro_core.registry import Registry
from repro_core.store import local

SetEnv = Callable[[str, str], None]


@pytest.fixture
def setenv() -> Iterator[SetEnv]:
    """Set a variable and make ``constants`` parse it afresh; everything is undone (and parsed
    afresh again) after the test, whatever order the other fixtures tear down in."""
    with pytest.MonkeyPatch.context() as mp:
        def set_(name: str, value: str) -> None:
            mp.setenv(name, value)
            constants.reload()

        yield set_
    constants.reload()


def _hash_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every re-hash of a blob (``check`` hashes through ``store.local.hash_file``)."""
    calls: list[object] = []
    real = local.hash_file

    def counted(*args: Any, **kwargs: Any) -> str:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(local, "hash_file", counted)
    return calls


# -- REPRO_VERIFY --------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "hashes"), [("size", 0), ("full", 1), ("", 1)])
def test_repro_verify_from_the_environment(manager: ArtifactManager, run: object,
                                           setenv: SetEnv, monkeypatch: pytest.MonkeyPatch,
                                           value: str, hashes: int) -> None:
    """``use_artifact()`` without ``verify=`` re-hashes under ``full`` (and by default) and
    does not under ``size`` (the blob's recorded identity is unchanged)."""
    meta = manager.log_artifact("w", "model", data=b"A" * 4096)
    setenv("REPRO_VERIFY", value)
    calls = _hash_calls(monkeypatch)
    assert manager.use_artifact(meta.key).hash == meta.hash
    assert len(calls) == hashes


def test_repro_verify_size_still_catches_a_write(manager: ArtifactManager, run: object,
                                                 setenv: SetEnv) -> None:
    """``size`` is no licence to serve changed bytes: a same-size write is still caught
    (the blob's identity changed, so it is re-hashed)."""
    meta = manager.log_artifact("w", "model", data=b"A" * 4096)
    assert meta.hash is not None
    blob = LocalStorageBackend(manager.root).blob_path(meta.hash)
    setenv("REPRO_VERIFY", "size")
    os.chmod(blob, 0o644)
    with open(blob, "r+b") as f:
        f.write(b"B")
    with pytest.raises(IntegrityError):
        manager.use_artifact(meta.key)


# -- REPRO_HASH ----------------------------------------------------------------------------------


def test_repro_hash_picks_the_digest_of_a_new_store(manager: ArtifactManager, store_root: Path,
                                                    setenv: SetEnv) -> None:
    setenv("REPRO_HASH", "sha256")
    manager.init_run("sha")
    meta = manager.log_artifact("d", "dataset", data=b"interop")
    manager.finalize_run()
    assert meta.hash == hash_bytes(b"interop", "sha256")
    assert sorted(p.name for p in (store_root / "blobs").iterdir()) == ["sha256"]
    registry = Registry(store_root / "registry.sqlite", readonly=True)
    try:
        assert registry.hash_algorithm() == "sha256"
    finally:
        registry.close()
    assert verify_store(store_root).ok


def test_repro_hash_never_changes_an_existing_store(manager: ArtifactManager, store_root: Path,
                                                    setenv: SetEnv) -> None:
    manager.init_run("first")
    first = manager.log_artifact("d", "dataset", data=b"one")
    manager.finalize_run()
    assert first.hash is not None and first.hash.startswith("blake3:")
    setenv("REPRO_HASH", "sha256")
    fresh = ArtifactManager.reset_instance()
    fresh.set_root(store_root)
    fresh.init_run("second")
    second = fresh.log_artifact("d", "dataset", data=b"two")
    fresh.finalize_run()
    assert second.hash == hash_bytes(b"two", "blake3")
    assert sorted(p.name for p in (store_root / "blobs").iterdir()) == ["blake3"]


# -- REPRO_FSYNC -------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "synchronous"), [("full", 2), ("none", 0), ("", 2)])
def test_repro_fsync_from_the_environment(manager: ArtifactManager, store_root: Path,
                                          setenv: SetEnv, monkeypatch: pytest.MonkeyPatch,
                                          value: str, synchronous: int) -> None:
    """``full`` (the default) fsyncs the blob, its directory and runs SQLite with
    ``synchronous=FULL`` (2); ``none`` makes no fsync call at all and runs ``OFF`` (0)."""
    setenv("REPRO_FSYNC", value)
    synced: list[int] = []
    real = os.fsync

    def counted(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counted)
    manager.init_run("durability")
    before = len(synced)
    manager.log_artifact("d", "dataset", data=os.urandom(4096))
    logged = len(synced) - before
    assert manager.registry()._read("PRAGMA synchronous")[0][0] == synchronous
    manager.finalize_run()
    if synchronous:
        assert logged >= 2  # the blob and its shard directory, at least
    else:
        assert synced == []  # not one, anywhere: blobs, directories, exports, journal
    other = Registry(store_root / "registry.sqlite")  # every connection, not just the first
    try:
        assert other._read("PRAGMA synchronous")[0][0] == synchronous
    finally:
        other.close()


# -- REPRO_STALE_TMP_SECONDS ---------------------------------------------------------------------


def _locked_temp(store: LocalStorageBackend, name: str, age: float) -> int:
    """A temp file whose writer looks alive (its flock is held) and ``age`` seconds old."""
    path = store.tmp_dir / name
    path.write_bytes(b"partial")
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    then = time.time() - age
    os.utime(path, (then, then))
    return fd


def test_stale_tmp_seconds_from_the_environment(tmp_path: Path, setenv: SetEnv) -> None:
    """Older than ``REPRO_STALE_TMP_SECONDS``: swept even though locked; younger: kept."""
    store = LocalStorageBackend(tmp_path / "s")
    store.ensure_layout()
    old = _locked_temp(store, "1-old.part", 600)
    young = _locked_temp(store, "2-young.part", 60)
    try:
        setenv("REPRO_STALE_TMP_SECONDS", " 300 ")
        assert constants.REPRO_STALE_TMP_SECONDS == 300.0
        assert store.sweep_tmp() == 1
        assert [p.name for p in store.tmp_dir.iterdir()] == ["2-young.part"]
        setenv("REPRO_STALE_TMP_SECONDS", "0.5")
        assert store.sweep_tmp() == 1 and list(store.tmp_dir.iterdir()) == []
    finally:
        os.close(old)
        os.close(young)


# -- bad values: an InvalidArgumentError naming the variable, where the setting is first used --


@pytest.mark.parametrize(("var", "raw"), [
    ("REPRO_STALE_TMP_SECONDS", "0"), ("REPRO_STALE_TMP_SECONDS", "-5"),
    ("REPRO_STALE_TMP_SECONDS", "inf"), ("REPRO_STALE_TMP_SECONDS", "a day"),
    ("REPRO_GIT_TIMEOUT", "0"), ("REPRO_GIT_TIMEOUT", "nan"), ("REPRO_GIT_TIMEOUT", "10s"),
    ("REPRO_MAX_PATCH_BYTES", "0"), ("REPRO_MAX_PATCH_BYTES", "-1"),
    ("REPRO_MAX_PATCH_BYTES", "1.5"), ("REPRO_MAX_PATCH_BYTES", "1MiB"),
    ("REPRO_MATERIALIZE", "hardlink"),
])
def test_bad_setting_names_the_variable(setenv: SetEnv, var: str, raw: str) -> None:
    setenv(var, raw)
    with pytest.raises(InvalidArgumentError, match=var) as caught:
        getattr(constants, var)
    assert caught.value.argument == var and repr(raw) in str(caught.value)


@pytest.mark.parametrize(("var", "raw", "parsed"), [
    ("REPRO_STALE_TMP_SECONDS", "", 86400.0), ("REPRO_STALE_TMP_SECONDS", " 120 ", 120.0),
    ("REPRO_STALE_TMP_SECONDS", "1e3", 1000.0), ("REPRO_GIT_TIMEOUT", "", 10.0),
    ("REPRO_GIT_TIMEOUT", "2.5", 2.5), ("REPRO_MAX_PATCH_BYTES", "", 1 << 20),
    ("REPRO_MAX_PATCH_BYTES", " 4096 ", 4096), ("REPRO_HASH", " SHA256 ", "sha256"),
    ("REPRO_FSYNC", "None", "none"), ("REPRO_OFFLINE", "yes", True),
    ("REPRO_OFFLINE", "0", False),
])
def test_good_settings_parse(setenv: SetEnv, var: str, raw: str, parsed: object) -> None:
    setenv(var, raw)
    value = getattr(constants, var)
    assert value == parsed and type(value) is type(parsed)


def test_bad_stale_seconds_surfaces_at_the_sweep(tmp_path: Path, setenv: SetEnv) -> None:
    """The first use — here opening a store that has a temp file to judge — raises."""
    store = LocalStorageBackend(tmp_path / "s")
    store.ensure_layout()
    (store.tmp_dir / "1-x.part").write_bytes(b"x")
    setenv("REPRO_STALE_TMP_SECONDS", "-1")
    with pytest.raises(InvalidArgumentError, match="REPRO_STALE_TMP_SECONDS"):
        store.sweep_tmp()


# -- gc's publish guard --------------------------------------------------------------------------


def test_gc_waits_for_a_writer_between_blob_and_row(manager: ArtifactManager, run: object,
                                                    store_root: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer is paused after its blob is published and before its registry row commits:
    at that moment no row names the blob. ``gc --delete --grace 0`` started then must wait
    for the writer (the publish guard) rather than delete the blob under it."""
    payload = b"between blob and row" * 1000
    digest = hash_bytes(payload)
    published, release, gc_blocked = threading.Event(), threading.Event(), threading.Event()
    real_add, real_flock = Registry.add_version, fcntl.flock

    def paused_add(self: Registry, new: object) -> object:
        published.set()  # the blob is in blobs/; its row is not in the registry
        assert release.wait(60)
        return real_add(self, new)  # type: ignore[arg-type]

    def watched_flock(fd: int, operation: int) -> None:
        try:
            real_flock(fd, operation)
        except BlockingIOError:  # gc asked for the guard and a writer holds it
            if operation & fcntl.LOCK_EX and os.readlink(f"/proc/self/fd/{fd}").endswith(
                    ".gc.lock"):
                gc_blocked.set()
            raise

    monkeypatch.setattr(Registry, "add_version", paused_add)
    monkeypatch.setattr(fcntl, "flock", watched_flock)
    outcome: dict[str, object] = {}

    def log() -> None:
        try:
            outcome["meta"] = manager.log_artifact("w", "dataset", data=payload)
        except BaseException as exc:  # reported by the asserts below
            outcome["log_error"] = exc

    def gc() -> None:
        try:
            outcome["gc"] = collect_garbage(store_root, dry_run=False, grace_seconds=0)
        except BaseException as exc:
            outcome["gc_error"] = exc

    writer = threading.Thread(target=log)
    collector = threading.Thread(target=gc)
    writer.start()
    try:
        assert published.wait(60)
        blob = LocalStorageBackend(store_root).blob_path(digest)
        assert blob.is_file()
        collector.start()
        deadline = time.monotonic() + 60
        while not gc_blocked.wait(0.01) and collector.is_alive():
            assert time.monotonic() < deadline, "gc neither waited nor finished"
        assert collector.is_alive() and "gc" not in outcome, \
            f"gc ran while a writer was between blob and row: {outcome}"
        assert blob.is_file()
    finally:
        release.set()
        writer.join(60)
        collector.join(120)
    assert "log_error" not in outcome and "gc_error" not in outcome, outcome
    assert outcome["gc"].blobs == []  # type: ignore[attr-defined]
    assert blob.is_file()
    assert manager.use_artifact("w", verify=True).hash == digest
    assert verify_store(store_root).ok
