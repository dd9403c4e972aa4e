"""Fault-tolerance tests: the store stays correct when processes race, die, or hit I/O errors.

What each test proves (the failure it would catch):

- ``test_concurrent_writers_get_consecutive_versions``: 4 processes x 50 ``log_artifact`` calls
  under one name get versions exactly 0..199 (a deferred transaction would lose or duplicate one).
- ``test_kill9_during_log_large_artifact``: SIGKILL anywhere inside ``log_large_artifact`` never
  leaves a visible half-written blob, a corrupt registry or a row without its blob, and the next
  open sweeps the dead writer's temp file.
- ``test_flipped_byte_*`` / truncated / deleted blob: corrupt content is never served silently,
  and ``verify_store`` names the digest and the versions that need it.
- ``test_file_size_limit_*``: a write that runs out of room (``RLIMIT_FSIZE`` → EFBIG, as a full
  disk gives ENOSPC) is a typed ``StorageError`` and leaves no partial artifact.
- ``test_io_fault_loop``: as SQLite tests itself, the Nth I/O call (write, fsync, rename, directory
  fsync, registry commit) fails, for N = 1, 2, … until the operation completes untouched; after
  every iteration the store is sound and usable, and the error was typed.

Child processes run ``tests/helpers/fault_worker.py`` in a fresh interpreter, so a SIGKILL or an
rlimit there cannot touch pytest.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.damage import flip_byte
from helpers.kill_loop import seeded_rng

from repro_core import (
    ArtifactManager,
    IntegrityError,
    ReproError,
    StorageError,
    _fsio,
    constants,
    hash_file,
    verify_store,
)
from repro_core.registry import Registry
from repro_core.store.local import LocalStorageBackend
from repro_core.types import RunState

WORKER = Path(__file__).parent / "helpers" / "fault_worker.py"
MiB = 1024 * 1024


# -- shared helpers -----------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    """Environment for worker processes: rank 0, full fsync and verify, whatever the caller set."""
    env = dict(os.environ)
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "WORLD_SIZE", "REPRO_HOME"):
        env.pop(var, None)
    # Whole-file blobs: these tests kill writers mid-blob (a chunked log's kill is in
    # test_chunks.py), which needs one temp file growing to the file's size.
    env.update(REPRO_FSYNC="full", REPRO_VERIFY="full", PYTHONUNBUFFERED="1",
               REPRO_CHUNK_MIN_BYTES="off")
    return env


def _spawn(*args: object, stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_child_env(),
    )


def _expect_line(proc: subprocess.Popen[str], expected: str) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if line != expected:
        _, err = proc.communicate(timeout=30)
        pytest.fail(f"worker said {line!r} instead of {expected!r}; stderr:\n{err}")


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> dict[str, Any]:
    """Wait for a worker, fail with its stderr if it crashed, return its last JSON line."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"worker exited {proc.returncode}; stderr:\n{err}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


@contextmanager
def _registry(root: Path) -> Iterator[Registry]:
    registry = Registry(root / "registry.sqlite")
    try:
        yield registry
    finally:
        registry.close()


def _part_files(root: Path) -> list[Path]:
    tmp = root / "tmp"
    return sorted(tmp.glob("*.part")) if tmp.is_dir() else []


def _assert_store_sound(root: Path) -> None:
    """The invariants no fault may break: SQLite is intact, no visible blob mismatches its
    digest, and every registry row's blobs exist (unreferenced blobs are allowed)."""
    report = verify_store(root)
    assert report.problems == [], f"verify_store found {report.problems}"
    assert report.registry_integrity == "ok"
    assert report.ok
    with _registry(root) as registry:
        assert registry.integrity_check() == "ok"
        store = LocalStorageBackend(root, algorithm=registry.hash_algorithm())
        for row in registry.list_versions():
            for digest, size in registry.blobs_of(row.id):
                path = store.blob_path(digest)
                assert path.is_file(), f"{row.key} needs {digest}, which is missing"
                assert path.stat().st_size == size


def _version_count(root: Path) -> int:
    with _registry(root) as registry:
        return len(registry.list_versions())


def _log_and_verify(mgr: ArtifactManager, tag: str) -> None:
    """A normal write after a fault: log a fresh value, read it back with a full re-hash."""
    opened = mgr.current_run is None
    if opened:
        mgr.init_run(f"probe-{tag}")
    meta = mgr.log_artifact("probe", "config", data={"tag": tag, "nonce": os.urandom(8).hex()})
    used = mgr.use_artifact(f"probe:{meta.version}", verify=True)
    assert used.hash == meta.hash
    assert mgr.load_artifact(f"probe:{meta.version}")["tag"] == tag
    if opened:
        mgr.finalize_run()


@pytest.fixture
def full_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault tests must see every fsync: ``REPRO_FSYNC=none`` would skip the calls under test."""
    monkeypatch.setattr(constants, "REPRO_FSYNC", "full")
    monkeypatch.setattr(constants, "REPRO_VERIFY", "full")


# -- 1. concurrency -----------------------------------------------------------------------------


def _run_together(*commands: tuple[object, ...]) -> list[dict[str, Any]]:
    """Start one worker per command, wait until all are ready, release them at once."""
    procs = [_spawn(*cmd, stdin=True) for cmd in commands]
    try:
        for proc in procs:
            _expect_line(proc, "ready")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [_finish(proc) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_concurrent_writers_get_consecutive_versions(tmp_path: Path, manager: ArtifactManager,
                                                      full_fsync: None) -> None:
    """Version numbers are assigned inside ``BEGIN IMMEDIATE``: racing writers never lose or
    duplicate a version, and no content is lost. The store does not exist beforehand, so its
    creation is raced too.
    """
    root, writers, per_writer = tmp_path / "store", 4, 50
    results = _run_together(*[("concurrent", root, "shared", i, per_writer)
                              for i in range(writers)])

    seen = [v for r in results for v in r["versions"]]
    assert sorted(seen) == list(range(1, writers * per_writer + 1))
    for r in results:  # each writer sees its own versions in the order it logged them
        assert r["versions"] == sorted(r["versions"])
    assert any(r["versions"] != list(range(r["versions"][0], r["versions"][0] + per_writer))
               for r in results), "writers never interleaved: the test did not race"

    manager.set_root(root)
    listed = manager.list_artifacts("shared")
    assert [m.version for m in listed] == [f"v{i}" for i in range(1, writers * per_writer + 1)]
    assert len({m.hash for m in listed}) == writers * per_writer
    assert manager.use_artifact("shared", "latest").version == "v200"
    assert "latest" in listed[-1].aliases
    payloads = {(d["writer"], d["seq"])
                for d in (manager.load_artifact(f"shared:v{i}") for i in range(1, 201))}
    assert payloads == {(w, s) for w in range(writers) for s in range(per_writer)}
    report = verify_store(root)
    assert report.ok and report.problems == []
    assert report.blobs_checked == writers * per_writer
    with _registry(root) as registry:
        runs = [r for r in registry.list_runs() if r.name.startswith("writer-")]
    assert [r.state for r in runs] == [RunState.COMPLETED.value] * writers


@pytest.mark.timeout(60)
def test_registry_open_waits_for_a_concurrent_creator(tmp_path: Path, full_fsync: None) -> None:
    """``SQLITE_BUSY_TIMEOUT_MS`` promises an opener waits for a competing writer. The first
    opener of a fresh store holds the registry's lock while it switches it to WAL; a second
    process opening the store at that moment (4 writers starting together on a new store fail
    this way in about a third of runs) must wait, not crash. The lock holder here is a plain
    connection that keeps the lock for 0.3 s, which makes the race deterministic (the check is
    an ordering, not a duration: a slow machine cannot fail it)."""
    path = tmp_path / "store" / "registry.sqlite"
    path.parent.mkdir()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, as a creator switching to WAL holds it
    holder.execute("CREATE TABLE IF NOT EXISTS creating (x INTEGER)")
    releasing = threading.Event()

    def commit() -> None:
        releasing.set()  # before COMMIT: whoever opens before this is set opened under the lock
        holder.execute("COMMIT")

    release = threading.Timer(0.3, commit)
    release.start()
    registry = Registry(path)
    try:
        assert registry.hash_algorithm() == "blake3"
        assert releasing.is_set(), "opened while another connection held the lock"
        assert registry.integrity_check() == "ok"
    finally:
        release.join()
        holder.close()
        registry.close()


def _layout_once(root: Path, i: int) -> None:
    LocalStorageBackend(root / f"s{i}").ensure_layout()


def _blob_once(root: Path, i: int) -> None:
    with LocalStorageBackend(root / "s0").open_writer() as writer:
        writer.write(i.to_bytes(8, "little"))
        writer.commit()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("what", "trials"), [("layout", 100), ("blob", 6000)])
def test_sweep_spares_live_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   what: str, trials: int) -> None:
    """Opening a store sweeps dead writers' temp files while other processes may be writing:
    the sweep must never take a live writer's file. A thread sweeps in a loop while this one
    creates stores (``layout``) or writes blobs (``blob``); the window is microseconds, so the
    GIL switch interval is shortened and the operation repeated (each trial hits it with a
    probability of roughly 0.5-15%, so a false pass is vanishingly unlikely)."""
    monkeypatch.setattr(constants, "REPRO_FSYNC", "none")  # speed: durability is not the point
    interval = sys.getswitchinterval()
    operation = _layout_once if what == "layout" else _blob_once
    base = tmp_path / "stores"
    LocalStorageBackend(base / "s0").ensure_layout()
    stop = threading.Event()

    def sweep_forever() -> None:
        while not stop.is_set():
            for tmp_dir in base.glob("s*/tmp"):
                LocalStorageBackend(tmp_dir.parent).sweep_tmp()

    sweeper = threading.Thread(target=sweep_forever, daemon=True)
    sys.setswitchinterval(1e-6)
    sweeper.start()
    try:
        for i in range(1, trials + 1):
            operation(base, i)
    finally:
        stop.set()
        sweeper.join()
        sys.setswitchinterval(interval)
    assert _part_files(base / "s0") == []


# -- 2. kill -9 during log_large_artifact -------------------------------------------------------


@dataclass
class _KillOutcome:
    """Where one SIGKILL landed: mid-write (a temp file was left) or after the log finished."""

    mid_write: int = 0
    completed: int = 0
    other: int = 0
    delays: list[str] = field(default_factory=list)


def _stamp(path: Path, iteration: int) -> None:
    """Make the big file's content (and digest) unique per iteration, cheaply, in place."""
    with path.open("r+b") as f:
        f.seek(-8, os.SEEK_END)
        f.write(iteration.to_bytes(8, "little"))


def _kill_when_part_reaches(proc: subprocess.Popen[str], root: Path, target: int,
                            deadline: float) -> bool:
    """Poll the child's temp file and SIGKILL it once it holds ``target`` bytes: a kill that
    certainly lands mid-copy. Returns False if the child finished first."""
    pattern = f"{proc.pid}-*.part"
    while time.monotonic() < deadline and proc.poll() is None:
        for part in (root / "tmp").glob(pattern):
            try:
                if part.stat().st_size >= target:
                    proc.send_signal(signal.SIGKILL)
                    return True
            except FileNotFoundError:
                pass
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    return False


def _check_after_kill(root: Path, tag: str) -> None:
    """After a SIGKILL: store sound; a fresh open sweeps the dead writer's temp file; a new
    version can be logged and verified."""
    _assert_store_sound(root)
    mgr = ArtifactManager.reset_instance()
    mgr.init_run(f"after-{tag}", root=root)  # opening the store sweeps tmp/
    assert _part_files(root) == [], "temp files of a dead writer survived the sweep"
    _log_and_verify(mgr, tag)
    mgr.finalize_run()
    _assert_store_sound(root)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill9_during_log_large_artifact(tmp_path: Path, manager: ArtifactManager,
                                         full_fsync: None) -> None:
    """``kill -9`` at any point of a large log: half the kills are timed at random over the
    whole call (they hit the copy, the fsync/rename, the commit), half fire once the child's
    temp file holds a random share of the bytes (certainly mid-copy)."""
    root, big, iterations = tmp_path / "store", tmp_path / "big.bin", 12
    big.write_bytes(os.urandom(48 * MiB))
    rng = seeded_rng("kill9 during log_large_artifact")
    chunk = str(1 * MiB)  # many small copies in the child: a wide window to land in

    # Calibration run (not killed): also proves the child path works and gives a v0.
    _stamp(big, 10_000)
    proc = _spawn("large", root, big, "weights", chunk)
    _expect_line(proc, "ready")
    duration = max(float(_finish(proc)["seconds"]), 0.02)
    versions = _version_count(root)

    outcome = _KillOutcome()
    for i in range(iterations):
        _stamp(big, i)
        digest = hash_file(big)
        proc = _spawn("large", root, big, "weights", chunk)
        try:
            _expect_line(proc, "ready")
            if i % 2 == 0:  # stratified random delay over [0, 1.5 x duration)
                delay = duration * 1.5 * (i // 2 + rng.random()) / (iterations // 2)
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
                outcome.delays.append(f"{delay * 1000:.0f}ms")
            else:
                target = int(big.stat().st_size * rng.uniform(0.05, 0.9))
                _kill_when_part_reaches(proc, root, target, time.monotonic() + 60)
                outcome.delays.append(f"{target // MiB}MiB")
        finally:
            proc.kill()
            proc.communicate(timeout=60)
        left = [p for p in _part_files(root) if p.name.startswith(f"{proc.pid}-")]
        now = _version_count(root)
        if left:
            outcome.mid_write += 1
            assert now == versions, "a version row appeared while its blob was still a temp file"
            assert not LocalStorageBackend(root).exists(digest), "blob visible before its rename"
        elif now > versions:
            outcome.completed += 1
        else:
            outcome.other += 1
        _check_after_kill(root, f"kill{i}")
        versions = _version_count(root)

    assert outcome.mid_write >= 1, f"no kill landed mid-write: {outcome}"

    # Logging the big file again works in-process and yields a verifiable version.
    _stamp(big, 99_999)
    mgr = ArtifactManager.reset_instance()
    mgr.init_run("final", root=root)
    meta = mgr.log_large_artifact("weights", big)
    assert mgr.use_artifact(f"weights:{meta.version}", verify=True).hash == meta.hash
    mgr.finalize_run()
    _assert_store_sound(root)


# -- 3. flipped, truncated, deleted blobs -------------------------------------------------------


def _blob(mgr: ArtifactManager, digest: str | None) -> Path:
    assert digest is not None
    store = LocalStorageBackend(mgr.root, algorithm=digest.split(":")[0])
    return store.blob_path(digest)




def _problems(root: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    report = verify_store(root)
    assert not report.ok
    return {p.digest: (p.kind, p.versions) for p in report.problems}


@pytest.mark.parametrize("kind", ["bytes", "directory"])
def test_flipped_byte_is_detected(tmp_path: Path, manager: ArtifactManager, full_fsync: None,
                                  kind: str) -> None:
    """One flipped bit keeps the size, so only the digest check can see it: ``use_artifact``
    must refuse the content and ``verify_store`` must name the blob and the version."""
    manager.init_run("flip")
    if kind == "bytes":
        meta = manager.log_artifact("blob", "dataset", data=os.urandom(64 * 1024))
        victim = meta.hash
    else:
        src = tmp_path / "src"
        (src / "sub").mkdir(parents=True)
        (src / "a.txt").write_text("alpha\n")
        (src / "sub" / "b.bin").write_bytes(os.urandom(10_000))
        meta = manager.log_artifact("blob", "dataset", file_path=src)
        victim = hash_file(src / "sub" / "b.bin")  # one file's blob, not the manifest
    flip_byte(_blob(manager, victim), 4321)

    with pytest.raises(IntegrityError) as info:
        manager.use_artifact("blob", meta.version)
    assert info.value.digest == victim
    assert info.value.expected == victim and info.value.actual not in (None, victim)
    problems = _problems(manager.root)
    assert problems == {victim: ("digest", ("default/blob:v1",))}


def test_truncated_blob_is_detected_without_verify(manager: ArtifactManager,
                                                   full_fsync: None) -> None:
    """The size is checked on every use, even with ``verify=False`` (a cheap stat)."""
    manager.init_run("truncate")
    meta = manager.log_artifact("blob", "dataset", data=os.urandom(50_000))
    path = _blob(manager, meta.hash)
    path.chmod(0o644)
    os.truncate(path, 20_000)
    path.chmod(0o444)

    with pytest.raises(IntegrityError) as info:
        manager.use_artifact("blob", "v1", verify=False)
    assert info.value.digest == meta.hash
    assert (info.value.expected, info.value.actual) == (50_000, 20_000)
    assert _problems(manager.root) == {meta.hash: ("size", ("default/blob:v1",))}


def test_deleted_blob_is_detected(manager: ArtifactManager, full_fsync: None) -> None:
    """A registry row whose blob vanished is an ``IntegrityError`` (missing), never a crash."""
    manager.init_run("delete")
    meta = manager.log_artifact("blob", "dataset", data={"x": list(range(100))})
    _blob(manager, meta.hash).unlink()

    for verify in (True, False):
        with pytest.raises(IntegrityError, match="missing") as info:
            manager.use_artifact("blob", "latest", verify=verify)
        assert info.value.digest == meta.hash and info.value.actual is None
    assert _problems(manager.root) == {meta.hash: ("missing", ("default/blob:v1",))}


# -- 4. disk full (RLIMIT_FSIZE) ----------------------------------------------------------------


def _largest_blob(root: Path) -> int:
    return max((p.stat().st_size for p in (root / "blobs").rglob("*") if p.is_file()), default=0)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["file", "data"])
def test_file_size_limit_gives_storage_error(tmp_path: Path, manager: ArtifactManager,
                                             full_fsync: None, mode: str) -> None:
    """A write past the file-size limit fails with EFBIG mid-blob: the child gets a clear
    ``StorageError``, nothing partial becomes visible, and the store keeps working."""
    root, big, limit = tmp_path / "store", tmp_path / "big.bin", 2 * MiB
    big.write_bytes(os.urandom(6 * MiB))

    result = _finish(_spawn("fsize", root, big, "too-big", limit, mode))
    error = result.get("error")
    assert error is not None, f"logging {6 * MiB} bytes under a {limit}-byte limit succeeded"
    assert error["type"] == "StorageError", error
    assert {"ReproError", "OSError"} <= set(error["mro"])
    assert error["errno"] == errno.EFBIG
    assert os.strerror(errno.EFBIG) in error["message"] and "failed" in error["message"]
    assert result["after"] == "v1", "the same process could not log after the failure"

    with _registry(root) as registry:
        assert registry.list_versions("too-big") == []
    assert _largest_blob(root) <= limit
    assert _part_files(root) == [], "the failed write left its temp file behind"
    _assert_store_sound(root)

    manager.set_root(root)
    _log_and_verify(manager, "after-efbig")
    manager.init_run("retry-unlimited")
    meta = manager.log_artifact("too-big", "dataset", file_path=big)
    assert manager.use_artifact(f"too-big:{meta.version}").size_bytes == 6 * MiB
    manager.finalize_run()
    _assert_store_sound(root)


# -- 5. I/O fault-injection loop ----------------------------------------------------------------

_FSIO_CALLS = ("write_all", "fsync", "fsync_dir", "replace", "copy_range")


class FaultInjector:
    """Counts every patched I/O call (one sequence across all of them, threads included) and
    fails the ``fail_at``-th; in ``forever`` mode every later call fails too."""

    def __init__(self, fail_at: int, mode: str) -> None:
        self.fail_at, self.mode = fail_at, mode
        self.calls: list[str] = []
        self.failed: list[str] = []
        self._lock = threading.Lock()

    def _should_fail(self, label: str) -> bool:
        with self._lock:
            self.calls.append(label)
            n = len(self.calls)
            fail = n == self.fail_at or (self.mode == "forever" and n > self.fail_at)
            if fail:
                self.failed.append(label)
            return fail

    def _wrap(self, label: str, fn: Callable[..., Any],
              error: Callable[[str], BaseException]) -> Callable[..., Any]:
        def injected(*args: Any, **kwargs: Any) -> Any:
            if self._should_fail(label):
                raise error(label)
            return fn(*args, **kwargs)

        return injected

    def install(self, mp: pytest.MonkeyPatch) -> None:
        for name in _FSIO_CALLS:
            mp.setattr(_fsio, name, self._wrap(name, getattr(_fsio, name), _eio))
        mp.setattr(Registry, "_commit", self._wrap("_commit", Registry._commit, _sqlite_ioerr))


def _eio(label: str) -> OSError:
    return OSError(errno.EIO, f"injected I/O error in {label}")


def _sqlite_ioerr(label: str) -> sqlite3.OperationalError:
    return sqlite3.OperationalError(f"disk I/O error (injected in {label})")


@dataclass(frozen=True)
class _Op:
    """One logical operation, run with content unique to iteration ``k`` so every iteration
    walks the same sequence of I/O calls. Returns what to check afterwards."""

    run: Callable[[ArtifactManager, int], str]
    needs_run: bool
    sites: frozenset[str]


_PUBLISH_SITES = frozenset({"fsync", "replace", "fsync_dir", "_commit"})
_DATA_SITES = _PUBLISH_SITES | {"write_all"}  # serializers write through the BlobWriter
_FILE_SITES = _PUBLISH_SITES | {"copy_range"}  # files are ingested by kernel copy


def _make_op(kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _Op:
    if kind == "dict":
        def log_dict(mgr: ArtifactManager, k: int) -> str:
            meta = mgr.log_artifact("cfg", "config", data={"iteration": k, "lr": 0.1})
            return f"cfg:{meta.version}"

        return _Op(log_dict, True, _DATA_SITES)
    if kind == "directory":
        def log_dir(mgr: ArtifactManager, k: int) -> str:
            src = tmp_path / f"dir{k}"
            (src / "sub").mkdir(parents=True, exist_ok=True)
            (src / "a.txt").write_text(f"alpha {k}\n")
            (src / "sub" / "b.bin").write_bytes(k.to_bytes(4, "little") * 1000)
            (src / "c.json").write_text(json.dumps({"k": k}))
            meta = mgr.log_artifact("ds", "dataset", file_path=src)
            return f"ds:{meta.version}"

        return _Op(log_dir, True, _FILE_SITES | _DATA_SITES)  # files + manifest
    if kind == "large":
        big = tmp_path / "large.bin"
        big.write_bytes(os.urandom(3 * MiB + 123))
        monkeypatch.setattr(constants, "IO_CHUNK", 1 * MiB)  # several writes per blob

        def log_large(mgr: ArtifactManager, k: int) -> str:
            _stamp(big, k)
            meta = mgr.log_large_artifact("weights", big)
            return f"weights:{meta.version}"

        return _Op(log_large, True, _FILE_SITES)

    def run_lifecycle(mgr: ArtifactManager, k: int) -> str:
        run = mgr.init_run(f"life-{k}", config={"k": k})
        assert run is not None and run.id is not None
        mgr.finalize_run()
        return f"run:{run.id}"

    return _Op(run_lifecycle, False, frozenset({"_commit", "replace"}))


def _check_result(mgr: ArtifactManager, ref: str) -> None:
    """The retried operation's result is really there: a verified artifact, or a finished run."""
    if ref.startswith("run:"):
        run_id = ref.removeprefix("run:")
        assert mgr.get_run(run_id)["state"] == RunState.COMPLETED.value
        assert (mgr.root / "runs" / run_id / "run.json").is_file()
    else:
        mgr.use_artifact(ref, verify=True)


class _JournalWarned(Exception):
    """The op succeeded and said, as a RuntimeWarning, that its journal line was not written
    (the journal is the registry's spare copy: its failure is reported, not fatal)."""


def _run_injected(mgr: ArtifactManager, op: _Op, k: int,
                  injector: FaultInjector) -> Exception | None:
    """Run ``op`` with the injector installed; return its typed error, fail on any other."""
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        injector.install(mp)
        try:
            op.run(mgr, k)
        except ReproError as exc:
            return exc
        except Exception as exc:
            pytest.fail(f"fault #{injector.fail_at} ({injector.mode}, {injector.failed}) leaked "
                        f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
    if any("journal line was not" in str(w.message) for w in seen):
        return _JournalWarned()
    return None


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("mode", ["once", "forever"])
@pytest.mark.parametrize("kind", ["dict", "directory", "large",
                                  "lifecycle"])
def test_io_fault_loop(tmp_path: Path, manager: ArtifactManager, full_fsync: None,
                       monkeypatch: pytest.MonkeyPatch, kind: str, mode: str) -> None:
    """Fail the 1st, 2nd, 3rd, … I/O call of one operation until it runs without reaching the
    fault. Every iteration must end in success or a typed ``ReproError``, a failed operation
    must leave no row, an injected error must never be swallowed, and afterwards the store is
    sound and the same operation succeeds when retried."""
    root = manager.root
    op = _make_op(kind, tmp_path, monkeypatch)
    if op.needs_run:
        manager.init_run("faults")
    else:
        _log_and_verify(manager, "warmup")  # create the store outside the loop

    assert constants.REPRO_FSYNC == "full"
    for n in range(1, 500):
        injector = FaultInjector(n, mode)
        before = _version_count(root)
        error = _run_injected(manager, op, n, injector)
        assert injector.calls, "the injector saw no I/O call: the test would pass vacuously"
        done = not injector.failed
        if done:  # the whole sequence ran: every kind of call, and no position skipped
            assert error is None, f"{error!r} raised without an injected fault"
            assert op.sites <= set(injector.calls), f"unexpected I/O sequence {injector.calls}"
            assert len(injector.calls) == n - 1, f"sequence changed: {injector.calls}"
        else:
            assert error is not None, f"injected {injector.failed} was swallowed (op succeeded)"
            if isinstance(error, _JournalWarned):  # logged, and the missing journal line said
                _assert_store_sound(root)
                _log_and_verify(manager, f"{kind}-{mode}-{n}-journal")
                continue
            assert isinstance(error, StorageError), f"fault became {type(error).__name__}: {error}"
            assert not op.needs_run or _version_count(root) == before, "failed log left a row"
        assert (manager.current_run is not None) == op.needs_run

        _assert_store_sound(root)
        assert _part_files(root) == [], "a failed write left its temp file in tmp/"
        if not done:
            _check_result(manager, op.run(manager, n))  # retry without faults: must succeed
        _log_and_verify(manager, f"{kind}-{mode}-{n}")
        _assert_store_sound(root)
        if done:
            break
    else:
        pytest.fail("the operation never completed without reaching the fault")
    assert n > len(op.sites), f"only {n - 1} fault points for {kind}: {injector.calls}"
