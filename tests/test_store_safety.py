"""A registry is never invented, a lost one is recovered, a replaced store is noticed, a
read-only store is readable, and a killed run is shown CRASHED (issue 8, items 2, 8, 10, 11)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from repro_core import ArtifactManager, collect_garbage
from repro_core.errors import RegistryDamagedError, StoreNotFoundError
from repro_core.recover import recover_store
from repro_core.registry import Registry
from repro_core.types import RunState


def _populate(manager: ArtifactManager, root: Path) -> dict[str, Any]:
    """Two projects, a dataset used by a later run, parents, aliases, a dedup'd re-log."""
    manager.init_run("prep", project="vision", root=root)
    ds = manager.log_artifact("ds", "dataset", data={"rows": [1, 2, 3]}, aliases=["gold"])
    manager.log_artifact("notes", "dataset", data="free text")
    manager.finalize_run()
    manager.init_run("train", project="vision")
    manager.use_artifact("ds:gold")
    first = manager.log_artifact("model", "model", data=b"w1", parent_artifacts=[ds.key])
    manager.log_artifact("model", "model", data=b"w2", parent_artifacts=[ds.key, first.key],
                         aliases=["best"])
    manager.finalize_run()
    manager.init_run("other", project="nlp")
    manager.log_artifact("model", "model", data=b"w2")  # same name, another project
    manager.log_artifact("model", "model", data=b"w2")  # dedup: no new version
    manager.finalize_run()
    return _snapshot(root)


def _snapshot(root: Path) -> dict[str, Any]:
    registry = Registry(root / "registry.sqlite", readonly=True)
    try:
        runs = registry.list_runs()
        return {
            "runs": sorted((r.id, r.name, r.project, r.state, json.dumps(r.config)) for r in runs),
            "versions": [(v.key, v.digest, v.size, v.format, v.type, v.filename, v.metadata,
                          sorted(registry.aliases_of(v.id)),
                          sorted(p.key for p in registry.parents_of(v.id)),
                          sorted(registry.blobs_of(v.id)))
                         for v in registry.list_versions()],
            "inputs": {r.id: [v.key for v in registry.inputs_of(r.id)] for r in runs},
            "outputs": {r.id: sorted(v.key for v in registry.outputs_of(r.id)) for r in runs},
        }
    finally:
        registry.close()


def _cli(*args: str, root: Path | None = None, env: dict[str, str] | None = None,
         prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    extra = ["--root", str(root)] if root is not None else []
    return subprocess.run([*prefix, sys.executable, "-m", "repro_core.cli", *args, *extra],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def _blob_count(root: Path) -> int:
    return sum(1 for p in (root / "blobs").rglob("*") if p.is_file())


def _damage(registry: Path, how: str) -> None:
    for suffix in ("-wal", "-shm"):
        Path(f"{registry}{suffix}").unlink(missing_ok=True)
    if how == "deleted":
        registry.unlink()
    elif how == "truncated":
        registry.write_bytes(b"")
    else:
        registry.write_bytes(b"this is not SQLite at all" * 100)


@pytest.fixture
def populated(manager: ArtifactManager, store_root: Path) -> Iterator[dict[str, Any]]:
    snapshot = _populate(manager, store_root)
    ArtifactManager.reset_instance()  # close every connection before the registry is damaged
    yield snapshot


@pytest.mark.parametrize("how", ["deleted", "truncated", "corrupted"])
def test_damaged_registry_is_never_replaced_by_an_empty_one(
        populated: dict[str, Any], store_root: Path, how: str) -> None:
    registry = store_root / "registry.sqlite"
    _damage(registry, how)
    blobs = _blob_count(store_root)
    manager = ArtifactManager.reset_instance()
    manager.set_root(store_root)
    with pytest.raises(RegistryDamagedError, match="repro recover"):
        manager.init_run("after-the-loss")
    with pytest.raises(RegistryDamagedError, match="repro recover"):
        manager.use_artifact("vision/ds")
    for command in (["runs"], ["artifacts"], ["verify"], ["gc", "--delete", "--grace", "0"],
                    ["lineage", "vision/ds:v1"], ["show", "abcdef"]):
        proc = _cli(*command, root=store_root)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "repro recover" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    assert _blob_count(store_root) == blobs  # gc --delete deleted nothing
    assert (registry.exists() and registry.stat().st_size > 0) == (how == "corrupted")


@pytest.mark.parametrize("how", ["deleted", "truncated", "corrupted"])
def test_recover_rebuilds_what_was_lost(populated: dict[str, Any], store_root: Path,
                                        how: str) -> None:
    registry = store_root / "registry.sqlite"
    _damage(registry, how)
    if how == "corrupted":
        registry.rename(store_root / "registry.sqlite.bad")  # recover never overwrites
    report = recover_store(store_root)
    assert report.problems == []
    assert (report.runs, report.versions) == (3, 5)
    assert _snapshot(store_root) == populated
    manager = ArtifactManager.reset_instance()
    manager.set_root(store_root)
    assert manager.use_artifact("vision/model:best").version == "v2"
    assert manager.load_artifact("nlp/model") == b"w2"


def test_recover_refuses_to_overwrite_and_skips_forged_journal_lines(
        populated: dict[str, Any], store_root: Path) -> None:
    with pytest.raises(Exception, match="move it aside"):
        recover_store(store_root)
    registry = store_root / "registry.sqlite"
    _damage(registry, "deleted")
    run_dir = next(p for p in (store_root / "runs").iterdir())
    with open(run_dir / "events.jsonl", "a") as journal:
        journal.write('{"event": "version", "project": "../../etc", "name": "x", "version": 1}\n')
        journal.write('{"event": "version", "project": "p", "name": "x", "version": 1, '
                      '"type": "model", "digest": "../../x", "size": 1, "format": "bytes"}\n')
        journal.write("{torn line")
    report = recover_store(store_root)
    assert len(report.problems) == 3 and all("skipped" in p for p in report.problems)
    assert any("unreadable journal line" in p for p in report.problems)
    assert _snapshot(store_root) == populated
    assert not any("etc" in str(p) for p in store_root.parent.iterdir())


def test_gc_keeps_blobs_a_run_journal_names(populated: dict[str, Any],
                                            store_root: Path) -> None:
    """A fresh registry forced over a lost one (`repro init --force`) names no blob: gc must
    still keep every blob a run's journal names, so recover remains possible."""
    _damage(store_root / "registry.sqlite", "deleted")
    fresh = Registry(store_root / "registry.sqlite", create=True)
    fresh.open()
    fresh.close()
    blobs = _blob_count(store_root)
    report = collect_garbage(store_root, dry_run=False, grace_seconds=0)
    assert report.blobs == [] and _blob_count(store_root) == blobs


def test_a_registry_is_created_only_in_an_empty_store(manager: ArtifactManager,
                                                      tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    manager.init_run("first", root=fresh)  # nothing there: created
    manager.finalize_run()
    assert (fresh / "registry.sqlite").stat().st_size > 0
    # A directory holding run exports but no registry is not "empty".
    (tmp_path / "half" / "runs" / "0123456789ab").mkdir(parents=True)
    (tmp_path / "half" / "runs" / "0123456789ab" / "run.json").write_text("{}")
    with pytest.raises(RegistryDamagedError):
        manager.init_run("refused", root=tmp_path / "half")
    run = manager.init_run("explicit", root=tmp_path / "half", create=True)
    assert run.id is not None


def test_read_calls_never_create_a_store(manager: ArtifactManager, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    fresh = ArtifactManager.reset_instance()  # default root: ./repro_store
    for call in (lambda: fresh.use_artifact("data"), lambda: fresh.list_artifacts(),
                 lambda: fresh.get_run("abcdef"), lambda: fresh.get_lineage("data"),
                 lambda: fresh.load_artifact("data")):
        with pytest.raises(StoreNotFoundError):
            call()
    assert list(empty.iterdir()) == []


def test_store_removed_under_a_live_process_is_reopened(manager: ArtifactManager,
                                                       store_root: Path) -> None:
    manager.init_run("before", root=store_root)
    manager.log_artifact("a", "dataset", data=b"a")
    manager.finalize_run()
    shutil.rmtree(store_root)  # `rm -rf repro_store` in a notebook between runs
    with pytest.warns(RuntimeWarning, match="removed or replaced"):
        run = manager.init_run("after")
    manager.log_artifact("b", "dataset", data=b"b")
    manager.finalize_run()
    assert (store_root / "registry.sqlite").is_file()  # a new store, not the unlinked file
    assert [r.id for r in Registry(store_root / "registry.sqlite",
                                   readonly=True).list_runs()] == [run.id]


def test_store_replaced_under_a_live_process_is_noticed(manager: ArtifactManager,
                                                       tmp_path: Path) -> None:
    root, other = tmp_path / "store", tmp_path / "other"
    manager.init_run("mine", root=root)
    manager.finalize_run()
    second = ArtifactManager.reset_instance()
    second.init_run("theirs", root=other)
    second.log_artifact("theirs", "dataset", data=b"t")
    second.finalize_run()
    ArtifactManager.reset_instance()
    manager = ArtifactManager.reset_instance()
    manager.init_run("one", root=root)
    manager.finalize_run()
    shutil.rmtree(root)
    shutil.copytree(other, root)  # a different store now lives at the same path
    with pytest.warns(RuntimeWarning, match="removed or replaced"):
        manager.init_run("two")
    assert manager.use_artifact("theirs").hash is not None
    manager.finalize_run()


@pytest.fixture
def readonly_store(populated: dict[str, Any], store_root: Path,
                   tmp_path: Path) -> Iterator[Path]:
    """A copy of the store, made unwritable for everyone (archived/shared stores are)."""
    copy = tmp_path / "archived" / "store"
    shutil.copytree(store_root, copy)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    yield copy
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)  # so pytest can remove tmp_path


# Root ignores permission bits; dropping every capability makes the kernel enforce them, as
# for an unprivileged user (setpriv is in util-linux, on every Debian machine).
_UNPRIVILEGED = ("setpriv", "--bounding-set=-all", "--inh-caps=-all")


def _unprivileged_ok() -> bool:
    probe = subprocess.run([*_UNPRIVILEGED, "sh", "-c", "touch /proc/1/repro-probe"],
                           capture_output=True)
    return probe.returncode != 0


@pytest.mark.slow
def test_readonly_store_is_readable_by_an_unprivileged_user(readonly_store: Path) -> None:
    assert _unprivileged_ok(), "setpriv did not drop root's permission override"
    for command in (["runs"], ["artifacts"], ["lineage", "vision/model:v2"],
                    ["verify"], ["gc"]):
        proc = _cli(*command, root=readonly_store, prefix=_UNPRIVILEGED)
        assert proc.returncode == 0, (command, proc.stderr)
    run_id = json.loads(_cli("runs", "--json", root=readonly_store,
                             prefix=_UNPRIVILEGED).stdout)[0]["id"]
    assert _cli("show", run_id, root=readonly_store, prefix=_UNPRIVILEGED).returncode == 0
    code = ("from repro_core import ArtifactManager as M; m = M();"
            f"m.set_root({str(readonly_store)!r});"
            "print(m.use_artifact('vision/ds').hash, m.load_artifact('vision/model:best'))")
    proc = subprocess.run([*_UNPRIVILEGED, sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("b'w2'")


@pytest.mark.slow
def test_killed_run_is_shown_crashed(manager: ArtifactManager, store_root: Path) -> None:
    code = ("import os, sys; from repro_core import ArtifactManager as M; m = M();"
            f"r = m.init_run('doomed', root={str(store_root)!r}); print(r.id, flush=True);"
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    manager.set_root(store_root)
    assert manager.get_run(run_id)["state"] == RunState.RUNNING.value  # alive: running
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    # Readers show it at once without writing; the CLI agrees.
    assert manager.get_run(run_id)["state"] == RunState.CRASHED.value
    listed = json.loads(_cli("runs", "--json", root=store_root).stdout)
    assert [r["state"] for r in listed if r["id"] == run_id] == ["crashed"]
    # The next writer records the transition once, with the time it was noticed.
    manager.init_run("next")
    manager.finalize_run()
    history = manager.get_run(run_id)["states"]
    assert [h[0] for h in history] == ["running", "crashed"]
    assert "is gone" in history[-1][2] and "noticed at" in history[-1][2]
