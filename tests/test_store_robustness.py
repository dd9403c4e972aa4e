"""What a final review of issues 8/9 found: each case failed before its fix."""

from __future__ import annotations

import gc as pygc
import json
import os
import sqlite3
from pathlib import Path

import pytest

from repro_core import (
    ArtifactManager,
    InvalidArgumentError,
    LineageTracker,
    StorageError,
    collect_garbage,
    recover_store,
)
from repro_core import metrics as metrics_module
from repro_core.registry import RunRow, is_crashed, process_namespace
from repro_core.types import utc_now


def _blob_count(root: Path) -> int:
    return sum(1 for p in (root / "blobs").rglob("*") if p.is_file())


def test_a_type_clash_is_refused_before_the_content_is_written(manager: ArtifactManager,
                                                              run: object) -> None:
    manager.log_artifact("weights", "model", data=b"model bytes")
    before = _blob_count(manager.root)
    with pytest.raises(InvalidArgumentError, match="has type 'model'"):
        manager.log_artifact("weights", "dataset", data=b"other bytes never stored")
    assert _blob_count(manager.root) == before


def test_a_writer_that_could_not_write_nor_spill_survives_for_the_exit_retry(
        manager: ArtifactManager, run: object, monkeypatch: pytest.MonkeyPatch) -> None:
    manager.log_metrics({"loss": 1.0})
    writer = manager.metrics_writer()
    assert writer is not None

    def refuse(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(metrics_module, "CLOSE_RETRY_S", 0.0)
    monkeypatch.setattr(metrics_module, "write_part", refuse)
    monkeypatch.setattr(metrics_module, "write_spill", refuse)
    with pytest.raises(StorageError):
        manager.finalize_run()
    ident = id(writer)
    del writer
    pygc.collect()
    assert ident in {id(w) for w in metrics_module._LIVE}  # not lost with its last reference
    monkeypatch.undo()
    for live in list(metrics_module._LIVE):
        if id(live) == ident:
            live.close()  # what the exit hook does: now it lands
    assert ident not in {id(w) for w in metrics_module._LIVE}  # durable now: released


def test_recover_rebuilds_no_edge_the_registry_refused(manager: ArtifactManager,
                                                      store_root: Path) -> None:
    """A run that reads back what it logged, and re-logs content another of its inputs
    descends from: the registry adds no edge that would close a cycle, and neither may
    `repro recover` (the journal records exactly the edges that were added)."""
    manager.init_run("r")
    x = manager.log_artifact("x", "dataset", data=b"x")
    for _ in range(3):
        manager.use_artifact(x.key)  # its own output: no input edge, no journal line
    manager.log_artifact("x", "dataset", data=b"x")  # dedup: already linked
    manager.finalize_run()
    manager.init_run("s")
    manager.use_artifact(x.key)
    manager.log_artifact("y", "dataset", data=b"y", parent_artifacts=[x.key])
    manager.log_artifact("x", "dataset", data=b"x")  # s used x: no output edge (a cycle)
    manager.finalize_run()
    journal = [json.loads(line) for run_dir in (store_root / "runs").iterdir()
               for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert sum(e["event"] == "use" for e in journal) == 1
    live = LineageTracker.from_store(store_root)
    ArtifactManager.reset_instance()
    registry = store_root / "registry.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{registry}{suffix}").unlink(missing_ok=True)
    report = recover_store(store_root)
    assert report.problems == []
    rebuilt = LineageTracker.from_store(store_root)
    assert rebuilt.detect_cycles() == []
    assert sorted(rebuilt.graph.edges) == sorted(live.graph.edges)


def test_untrusted_spill_and_journal_files_cannot_stall_or_break_an_open(
        manager: ArtifactManager, store_root: Path) -> None:
    manager.init_run("r")
    manager.log_artifact("a", "dataset", data=b"a")
    run_id = manager.run_id
    manager.finalize_run()
    ArtifactManager.reset_instance()
    spill = store_root / "spill"
    spill.mkdir()
    (spill / "deep.jsonl").write_text("[" * 200_000 + "\n")
    os.mkfifo(spill / "fifo.jsonl")  # would block a plain open() for ever
    (spill / "zero.jsonl").symlink_to("/dev/zero")  # would never end
    journal = store_root / "runs" / str(run_id) / "events.jsonl"
    with open(journal, "a") as handle:
        handle.write("[" * (17 * 1024 * 1024) + "\n")  # one huge forged line
    manager = ArtifactManager.reset_instance()
    with pytest.warns(RuntimeWarning):
        manager.init_run("next", root=store_root)  # imports spills: none of these
    manager.finalize_run()
    assert sorted(p.name for p in spill.iterdir()) == ["deep.invalid", "fifo.invalid",
                                                       "zero.invalid"]
    ArtifactManager.reset_instance()
    (store_root / "registry.sqlite").unlink()
    report = recover_store(store_root)
    assert any("unreadable journal line" in p for p in report.problems)
    assert report.versions == 1


def test_a_stray_file_among_the_blobs_does_not_stop_gc(manager: ArtifactManager,
                                                      run: object) -> None:
    manager.log_artifact("a", "dataset", data=b"a")
    shard = next(p for p in (manager.root / "blobs" / "blake3").iterdir() if any(p.iterdir()))
    (shard / ".DS_Store").write_bytes(b"finder")
    report = collect_garbage(manager.root, dry_run=False, grace_seconds=0)
    assert report.blobs == [] and (shard / ".DS_Store").exists()


def _running(pid: int, namespace: str | None) -> RunRow:
    import socket

    return RunRow(id="r", name="r", project="default", state="running", tags=[], config={},
                  created_at=utc_now(), ended_at=None, host=socket.gethostname(), pid=pid,
                  world_size=1, pid_started=None, process_ns=namespace)


def test_a_run_in_another_pid_namespace_of_this_host_is_not_judged() -> None:
    """Two containers on one host share its name, not its pids: a pid that is gone here
    says nothing about a run started in another container."""
    here = process_namespace()
    assert here is not None and "/" in here
    boot, _ = here.split("/")
    gone = 2**22 + 12345  # above pid_max: no such process here
    assert is_crashed(_running(gone, here)) is True
    assert is_crashed(_running(gone, f"{boot}/1")) is False  # another pid namespace
    assert is_crashed(_running(gone, f"not-this-boot/{here.split('/')[1]}")) is True
    assert is_crashed(_running(gone, None)) is True  # rows from before: the pid decides
