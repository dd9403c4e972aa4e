"""Buffered metrics are never lost when the registry refuses writes: retried with backoff,
spilled to ``<root>/spill/`` at finalize, imported exactly once by the next open.

The failure these guard against: a full disk at finalize lost 1,000,000 buffered points and
left the run RUNNING after space was freed. I/O failures are simulated at the real boundary,
the writer's ``COMMIT`` (``sqlite3.OperationalError("database or disk is full")``).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from repro_core import ArtifactManager, StorageError
from repro_core.types import RunState


def _disk_full(times: int | None) -> tuple[Callable[[Any, sqlite3.Connection], None], list[int]]:
    """A ``_commit`` that fails ``times`` times (None: always), then commits."""
    left = [times if times is not None else -1]

    def commit(real: Any, conn: sqlite3.Connection) -> None:
        if left[0] != 0:
            left[0] -= 1
            raise sqlite3.OperationalError("database or disk is full")
        real(conn)

    return commit, left


def _refuse(monkeypatch: pytest.MonkeyPatch, writer: Any, times: int | None) -> list[int]:
    commit, left = _disk_full(times)
    real = writer._registry._commit
    monkeypatch.setattr(writer._registry, "_commit", lambda conn: commit(real, conn))
    return left


def _log(manager: ArtifactManager, run_id: str, n: int) -> None:
    writer = manager.metrics_writer()
    assert writer is not None
    for i in range(n):
        manager.log_metrics({"loss": float(i), "odd": math.nan if i % 2 else math.inf})
    for i in range(50):
        writer.record({}, "online_updates", (run_id, f"{run_id}-u{i}", f"e{i}", "nan", 0.5,
                                              None, None, json.dumps({"i": i}), float(i)))


def _check_all_there(manager: ArtifactManager, run_id: str, n: int) -> None:
    got = manager.get_metrics(run_id)
    assert [v for _, v, _ in got["loss"]] == [float(i) for i in range(n)]
    assert [s for s, _, _ in got["odd"]] == list(range(n))
    assert all(math.isnan(v) if i % 2 else v == math.inf
               for i, (_, v, _) in enumerate(got["odd"]))
    updates = manager.registry().online_updates(run_id, None)
    assert [u["metadata"]["i"] for u in updates] == list(range(50))
    assert all(math.isnan(u["reward"]) for u in updates)


def test_finalize_retries_a_full_disk_and_lands_every_row(
        manager: ArtifactManager, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _log(manager, run.id, 1000)
    left = _refuse(monkeypatch, manager.metrics_writer(), 3)
    manager.finalize_run()  # before: the writer was dropped, its rows lost, the run FAILED
    assert left == [0]
    _check_all_there(manager, run.id, 1000)
    assert manager.registry().get_run(run.id).state == RunState.COMPLETED.value


def _spill_run(manager: ArtifactManager, run: Any, monkeypatch: pytest.MonkeyPatch,
               store_root: Path) -> list[Path]:
    """Log, then finalize against a registry that refuses every write: a spill."""
    from repro_core import metrics as metrics_module

    monkeypatch.setattr(metrics_module, "CLOSE_RETRY_S", 0.0, raising=False)
    _log(manager, run.id, 1000)
    _refuse(monkeypatch, manager.metrics_writer(), None)
    with pytest.warns(RuntimeWarning, match=r"2000 points and 50 rows .* spill file") as info:
        manager.finalize_run()
    spills = sorted((store_root / "spill").glob("*.jsonl"))
    assert spills and all(p.name in str(info[0].message) for p in spills)
    assert spills[0].name.startswith(f"{run.id}-")
    assert manager.registry().get_run(run.id).state == RunState.COMPLETED.value
    assert manager.get_metrics(run.id) == {}  # nothing has reached the registry yet
    return spills


def test_a_refusing_registry_gets_a_spill_that_the_next_open_imports(
        manager: ArtifactManager, run: Any, monkeypatch: pytest.MonkeyPatch,
        store_root: Path) -> None:
    from repro_core.metrics import SpillReport, import_spills

    spills = _spill_run(manager, run, monkeypatch, store_root)
    report = import_spills(store_root / "registry.sqlite")
    assert (report.points, report.rows, report.files) == (2000, 50, tuple(spills))
    assert list((store_root / "spill").iterdir()) == []
    _check_all_there(manager, run.id, 1000)
    assert import_spills(store_root / "registry.sqlite") == SpillReport()  # nothing twice
    assert import_spills(manager.registry()) == SpillReport()  # an open Registry works too


def test_the_next_manager_that_opens_the_store_imports_the_spill(
        manager: ArtifactManager, run: Any, monkeypatch: pytest.MonkeyPatch,
        store_root: Path) -> None:
    _spill_run(manager, run, monkeypatch, store_root)
    fresh = ArtifactManager.reset_instance()  # as a new process would
    fresh.set_root(store_root)
    fresh.init_run("next")  # opening the store for writing imports what was spilled
    assert list((store_root / "spill").iterdir()) == []
    _check_all_there(fresh, run.id, 1000)


def test_an_import_killed_between_commit_and_delete_is_not_imported_twice(
        manager: ArtifactManager, run: Any, monkeypatch: pytest.MonkeyPatch,
        store_root: Path) -> None:
    from repro_core.metrics import import_spills

    spills = _spill_run(manager, run, monkeypatch, store_root)
    saved = {p: p.read_bytes() for p in spills}
    assert import_spills(store_root / "registry.sqlite").points == 2000
    for path, data in saved.items():  # as if kill -9 struck after COMMIT, before unlink
        path.write_bytes(data)
    again = import_spills(store_root / "registry.sqlite")
    assert (again.points, again.rows, again.files) == (0, 0, ())
    assert list((store_root / "spill").iterdir()) == []  # the leftover is deleted
    _check_all_there(manager, run.id, 1000)


def test_two_processes_importing_at_once_import_once(
        manager: ArtifactManager, run: Any, monkeypatch: pytest.MonkeyPatch,
        store_root: Path) -> None:
    from repro_core.metrics import import_spills

    _spill_run(manager, run, monkeypatch, store_root)
    path = store_root / "registry.sqlite"
    with ThreadPoolExecutor(2) as pool:  # separate connections, like two processes
        reports = list(pool.map(import_spills, [path, path]))
    assert sum(r.points for r in reports) == 2000 and sum(r.rows for r in reports) == 50
    _check_all_there(manager, run.id, 1000)


def test_when_even_the_spill_fails_close_raises_and_keeps_the_data(
        manager: ArtifactManager, run: Any, monkeypatch: pytest.MonkeyPatch,
        store_root: Path) -> None:
    from repro_core import _metrics_spill
    from repro_core import metrics as metrics_module
    from repro_core.metrics import MetricsWriter

    monkeypatch.setattr(metrics_module, "CLOSE_RETRY_S", 0.0)
    writer = MetricsWriter(store_root / "registry.sqlite", run.id, interval=3600)
    for i in range(100):
        writer.log({"a": float(i)})
    commit = writer._registry._commit
    _refuse(monkeypatch, writer, None)

    def no_space(path: Any, data: bytes) -> Path:
        raise StorageError(f"cannot write {path}: [Errno 28] No space left on device")

    monkeypatch.setattr(_metrics_spill._fsio, "write_file_atomic", no_space)
    with pytest.raises(StorageError, match="neither written nor spilled"):
        writer.close()
    with pytest.raises(Exception, match="closed"):
        writer.log({"a": 1.0})  # closed for logging, but the data is still held
    monkeypatch.setattr(writer._registry, "_commit", commit)  # space freed
    assert not writer.close()  # landed: no spill
    assert [v for _, v, _ in manager.get_metrics(run.id)["a"]] == [float(i) for i in range(100)]


def _valid_spill(store_root: Path, run_id: str) -> bytes:
    from repro_core._metrics_batch import Batch
    from repro_core._metrics_spill import write_spill

    batch = Batch()
    batch.rows["online_updates"] = [(run_id, "u", "e", 1.0, 1.0, None, None, "{}", 0.0)]
    path = write_spill(store_root, run_id, batch, 0)
    data = path.read_bytes()
    path.unlink()
    return data


def test_forged_or_truncated_spills_are_set_aside_with_a_warning(
        manager: ArtifactManager, run: Any, store_root: Path) -> None:
    from repro_core.metrics import import_spills

    good = _valid_spill(store_root, run.id)
    header, record, end = good.decode().splitlines()
    forged = {
        "garbage": b"not json\n",
        "truncated": (header + "\n" + record + "\n").encode(),
        "injection": "\n".join([header, json.dumps(
            {"table": "runs; DROP TABLE runs; --", "rows": []}), end, ""]).encode(),
        "other-run": good.replace(f'"{run.id}"'.encode(), b'"someone-else"'),
        "null-metadata": good.replace(b'"{}"', b"null"),  # NOT NULL in the registry
        "bad-step": "\n".join([header.replace('"points": 0', '"points": 1'), json.dumps(
            {"metric": "m", "steps": "//////////8=", "vals": "AAAAAAAAAAA=",
             "times": "AAAAAAAAAAA="}), end, ""]).encode(),
    }
    for name, data in forged.items():
        (store_root / "spill" / f"{name}.jsonl").write_bytes(data)
    with pytest.warns(RuntimeWarning, match="not valid") as info:
        report = import_spills(store_root / "registry.sqlite")
    assert len(info) == len(forged) and (report.points, report.rows) == (0, 0)
    assert sorted(p.name for p in report.invalid) == sorted(f"{n}.invalid" for n in forged)
    assert manager.registry().get_run(run.id).id == run.id  # nothing was dropped
    assert manager.registry().online_updates(run.id, None) == []
