"""``prune_version``: a version's content is released (a top-k checkpoint deleted), its row and
lineage stay. gc reclaims exactly what no live version needs, verify stays clean, recover
rebuilds the pruned state. Also ``log_artifact(data=Payload(...))``.

Real SQLite, real blobs, tmp_path stores.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from repro_core import (
    ArtifactManager,
    ArtifactNotFoundError,
    LocalStorageBackend,
    SerializationError,
    collect_garbage,
    hash_bytes,
    recover_store,
    verify_store,
)
from repro_core._journal import JOURNAL_NAME, journal_digests, read_events
from repro_core.registry import Registry
from repro_core.serialize import Payload


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "REPRO_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    ArtifactManager.reset_instance()
    yield tmp_path / "s"
    ArtifactManager.reset_instance()


def _manager(root: Path) -> ArtifactManager:
    manager = ArtifactManager.reset_instance()
    manager.set_root(root)
    return manager


def _blob(root: Path, data: bytes) -> Path:
    return LocalStorageBackend(root).blob_path(hash_bytes(data))


def _pruned_at(root: Path, key: str) -> str | None:
    registry = Registry(root / "registry.sqlite", readonly=True)
    try:
        from repro_core.types import parse_key

        return registry.resolve(parse_key(key)).pruned_at
    finally:
        registry.close()


def _events(root: Path, run_id: str) -> list[dict[str, object]]:
    return list(read_events(root / "runs" / run_id / JOURNAL_NAME))


def _gc(root: Path) -> list[str]:
    return collect_garbage(root, dry_run=False, grace_seconds=0).blobs


def _three(manager: ArtifactManager) -> str:
    """ckpt v1..v3 (v3 also ``best``) logged by one finished run; returns its id."""
    run = manager.init_run("train")
    for i in (1, 2, 3):
        manager.log_artifact("ckpt", "checkpoint", data=f"epoch {i}".encode(),
                             aliases=["best"] if i == 3 else None)
    manager.finalize_run()
    assert run.id is not None
    return run.id


# -- the registry's view --------------------------------------------------------------------


def test_pruning_latest_moves_latest_and_hides_the_version(root: Path) -> None:
    manager = _manager(root)
    run_id = _three(manager)
    pruner = manager.init_run("prune")
    meta = manager.prune_version("ckpt:v3")
    assert meta.version == "v3" and meta.aliases == [] and meta.path is None
    assert _pruned_at(root, "ckpt:v3") is not None
    assert [m.version for m in manager.list_artifacts("ckpt")] == ["v1", "v2"]
    assert [m.version for m in manager.list_artifacts()] == ["v1", "v2"]
    assert manager.use_artifact("ckpt").version == "v2"
    assert manager.use_artifact("ckpt:latest").aliases == ["latest"]
    with pytest.raises(ArtifactNotFoundError, match="pruned"):
        manager.use_artifact("ckpt:v3")
    with pytest.raises(ArtifactNotFoundError, match="pruned"):
        manager.load_artifact("ckpt", "v3")
    with pytest.raises(ArtifactNotFoundError):
        manager.use_artifact("ckpt:best")  # the alias went with it
    with pytest.raises(ArtifactNotFoundError, match="pruned"):
        manager.use_artifact(f"ckpt@{hash_bytes(b'epoch 3')[:16]}")
    manager.finalize_run()
    # lineage stays: the run still produced it, the version number is not reused
    assert "default/ckpt:v3" in manager.get_run(run_id)["outputs"]
    assert manager.get_lineage("ckpt:v3")["produced_by"]["id"] == run_id
    assert manager.get_run(str(pruner.id))["inputs"] == ["default/ckpt:v2"]
    manager.init_run("more")
    assert manager.log_artifact("ckpt", "checkpoint", data=b"epoch 4").version == "v4"
    assert manager.use_artifact("ckpt").version == "v4"
    manager.finalize_run()
    [event] = [e for e in _events(root, str(pruner.id)) if e["event"] == "prune"]
    assert event["key"] == "default/ckpt:v3" and event["aliases"] == ["best", "latest"]
    assert event["digest"] == hash_bytes(b"epoch 3")


def test_pruning_is_idempotent_and_works_without_a_run(root: Path) -> None:
    manager = _manager(root)
    run_id = _three(manager)
    manager = _manager(root)  # no active run
    manager.prune_version("ckpt:v1")
    first = _pruned_at(root, "ckpt:v1")
    manager.prune_version("default/ckpt:v1")
    assert _pruned_at(root, "ckpt:v1") == first
    assert manager.use_artifact("ckpt").version == "v3"
    with pytest.raises(ArtifactNotFoundError, match="pruned"):
        manager.use_artifact("ckpt:v1")  # read-only path, no run
    # journaled (in the producing run's journal: there is no active run to hold it)
    prunes = [e for e in _events(root, run_id) if e["event"] == "prune"]
    assert [e["key"] for e in prunes] == ["default/ckpt:v1", "default/ckpt:v1"]


def test_pruning_every_version_leaves_no_latest(root: Path) -> None:
    manager = _manager(root)
    _three(manager)
    for key in ("ckpt:v3", "ckpt:v2", "ckpt:v1"):
        manager.prune_version(key)
    assert manager.list_artifacts("ckpt") == []
    with pytest.raises(ArtifactNotFoundError):
        manager.use_artifact("ckpt")
    manager.init_run("again")
    # the same content as a pruned version is a new version, not the pruned one revived
    assert manager.log_artifact("ckpt", "checkpoint", data=b"epoch 3").version == "v4"
    assert manager.load_artifact("ckpt") == b"epoch 3"
    manager.finalize_run()


def test_pruning_an_unknown_or_bad_key(root: Path) -> None:
    manager = _manager(root)
    _three(manager)
    with pytest.raises(ArtifactNotFoundError):
        manager.prune_version("ckpt:v9")
    with pytest.raises(ArtifactNotFoundError):
        manager.prune_version("nothing:v1")
    from repro_core import InvalidNameError

    with pytest.raises((InvalidNameError, ValueError)):
        manager.prune_version("../ckpt:v1")
    assert [m.version for m in manager.list_artifacts("ckpt")] == ["v1", "v2", "v3"]


def test_relogging_latest_after_a_prune_dedups_to_the_live_version(root: Path) -> None:
    manager = _manager(root)
    _three(manager)
    manager.prune_version("ckpt:v3")
    manager.init_run("r")
    assert manager.log_artifact("ckpt", "checkpoint", data=b"epoch 2").version == "v2"
    manager.finalize_run()


# -- gc, verify -----------------------------------------------------------------------------


def test_gc_reclaims_a_pruned_version_but_not_shared_content(root: Path) -> None:
    manager = _manager(root)
    manager.init_run("r")
    manager.log_artifact("ckpt", "checkpoint", data=b"A" * 1000)       # v1
    manager.log_artifact("ckpt", "checkpoint", data=b"B" * 1000)       # v2
    manager.log_artifact("ckpt", "checkpoint", data=b"A" * 1000)       # v3: v1's content
    manager.log_artifact("other", "checkpoint", data=b"B" * 1000)      # shares v2's blob
    manager.log_artifact("ckpt", "checkpoint", data=b"C" * 1000)       # v4
    served = manager.use_artifact("ckpt:v4").path  # a cache link to v4's blob
    assert served is not None and served.exists()
    manager.finalize_run()
    for key in ("ckpt:v1", "ckpt:v2", "ckpt:v4"):
        manager.prune_version(key)
    assert hash_bytes(b"C" * 1000) not in journal_digests(root)
    assert {hash_bytes(b"A" * 1000), hash_bytes(b"B" * 1000)} <= journal_digests(root)
    dry = collect_garbage(root, dry_run=True, grace_seconds=0)
    assert dry.blobs == [hash_bytes(b"C" * 1000)] and _blob(root, b"C" * 1000).exists()
    ArtifactManager.reset_instance()
    assert _gc(root) == [hash_bytes(b"C" * 1000)]
    assert not _blob(root, b"C" * 1000).exists() and not served.exists()  # no link holds it
    assert _blob(root, b"A" * 1000).exists() and _blob(root, b"B" * 1000).exists()
    report = verify_store(root)
    assert report.ok and report.unreferenced == [], report.problems
    assert _gc(root) == []
    manager = _manager(root)
    assert manager.load_artifact("ckpt:v3") == b"A" * 1000
    assert manager.load_artifact("other") == b"B" * 1000
    assert manager.use_artifact("ckpt").version == "v3"


def test_gc_reclaims_a_pruned_directory(root: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "d1", tmp_path / "d2"
    for tree, extra in ((first, b"only in d1"), (second, b"only in d2")):
        (tree / "sub").mkdir(parents=True)
        (tree / "shared.bin").write_bytes(b"shared" * 100)
        (tree / "sub" / "own.bin").write_bytes(extra)
    manager = _manager(root)
    manager.init_run("r")
    manager.log_artifact("tree", "dataset", file_path=first)
    manager.log_artifact("tree", "dataset", file_path=second)
    manager.use_artifact("tree:v1")  # materialize it in the cache
    manager.finalize_run()
    manager.prune_version("tree:v1")
    ArtifactManager.reset_instance()
    freed = set(_gc(root))
    assert hash_bytes(b"only in d1") in freed and hash_bytes(b"shared" * 100) not in freed
    assert len(freed) == 2  # its file and its manifest
    report = verify_store(root)
    assert report.ok, report.problems
    manager = _manager(root)
    out = manager.load_artifact("tree")
    assert (out / "sub" / "own.bin").read_bytes() == b"only in d2"
    assert (out / "shared.bin").read_bytes() == b"shared" * 100


def test_gc_reclaims_a_version_pruned_without_a_run(root: Path) -> None:
    manager = _manager(root)
    _three(manager)
    _manager(root).prune_version("ckpt:v1")
    ArtifactManager.reset_instance()
    assert _gc(root) == [hash_bytes(b"epoch 1")]
    assert verify_store(root).ok


def test_verify_of_a_pruned_key_after_gc(root: Path) -> None:
    manager = _manager(root)
    _three(manager)
    manager.prune_version("ckpt:v2")
    ArtifactManager.reset_instance()
    _gc(root)
    assert verify_store(root, key="ckpt:v3").ok
    report = verify_store(root, key="ckpt:v2")  # released on purpose: nothing to verify
    assert report.ok and report.blobs_checked == 0, report.problems


# -- recover --------------------------------------------------------------------------------


def _lose_registry(root: Path) -> None:
    ArtifactManager.reset_instance()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / 'registry.sqlite'}{suffix}").unlink(missing_ok=True)


@pytest.mark.sqlite_only("repro recover rebuilds a SQLite registry (a PostgreSQL-bound store "
                         "is refused: test_registry_migrate)")
@pytest.mark.parametrize("collect", [False, True])
def test_recover_rebuilds_pruned_versions_and_aliases(root: Path, collect: bool) -> None:
    manager = _manager(root)
    run = manager.init_run("train")
    manager.log_artifact("ckpt", "checkpoint", data=b"epoch 1", aliases=["best"])
    manager.log_artifact("ckpt", "checkpoint", data=b"epoch 2")
    manager.log_artifact("ckpt", "checkpoint", data=b"epoch 3", aliases=["best"])
    manager.prune_version("ckpt:v3")  # by the run itself
    manager.finalize_run()
    _manager(root).prune_version("ckpt:v1")  # without a run
    ArtifactManager.reset_instance()
    if collect:
        assert sorted(_gc(root)) == sorted([hash_bytes(b"epoch 1"), hash_bytes(b"epoch 3")])
    _lose_registry(root)
    report = recover_store(root)
    assert report.versions == 3 and report.problems == []
    assert _pruned_at(root, "ckpt:v1") is not None and _pruned_at(root, "ckpt:v3") is not None
    assert _pruned_at(root, "ckpt:v2") is None
    manager = _manager(root)
    assert [m.version for m in manager.list_artifacts("ckpt")] == ["v2"]
    latest = manager.use_artifact("ckpt")
    assert latest.version == "v2" and latest.aliases == ["latest"]
    with pytest.raises(ArtifactNotFoundError):
        manager.use_artifact("ckpt:best")
    with pytest.raises(ArtifactNotFoundError, match="pruned"):
        manager.use_artifact("ckpt:v3")
    assert manager.get_run(str(run.id))["outputs"] == ["default/ckpt:v1", "default/ckpt:v2",
                                                       "default/ckpt:v3"]
    assert verify_store(root).ok
    manager.init_run("next")
    assert manager.log_artifact("ckpt", "checkpoint", data=b"epoch 4").version == "v4"
    manager.finalize_run()


# -- Payload --------------------------------------------------------------------------------


def test_a_payload_streams_into_the_blob_writer(root: Path) -> None:
    chunks = [os.urandom(1000) for _ in range(5)]
    calls: list[object] = []

    def write(sink: object) -> None:
        calls.append(sink)
        for chunk in chunks:
            sink.write(chunk)  # type: ignore[attr-defined]

    manager = _manager(root)
    manager.init_run("p")
    meta = manager.log_artifact("model", "checkpoint",
                                data=Payload("bytes", write, filename="epoch=3-step=40.ckpt"))
    assert len(calls) == 1
    assert meta.hash == hash_bytes(b"".join(chunks)) and meta.size_bytes == 5000
    assert meta.format == "bytes"
    used = manager.use_artifact("model")
    assert used.path is not None and used.path.name == "epoch=3-step=40.ckpt"
    assert used.path.read_bytes() == b"".join(chunks)
    assert manager.load_artifact("model") == b"".join(chunks)
    same = manager.log_artifact("model", "checkpoint", data=Payload("bytes", write))
    assert same.version == "v1"  # identical content: deduplicated like any data
    manager.log_artifact("cfg", "config",
                         data=Payload("json", lambda s: s.write(b'{"a":1}')))
    assert manager.load_artifact("cfg") == {"a": 1}
    assert manager.use_artifact("cfg").path.name == "cfg.json"  # type: ignore[union-attr]
    manager.finalize_run()


@pytest.mark.parametrize("payload", [
    Payload("bytes", lambda s: None, filename="../up"),
    Payload("bytes", lambda s: None, filename="a/b"),
    Payload("bytes", lambda s: None, filename=".."),
    Payload("bytes", lambda s: None, filename=""),
    Payload("bytes", lambda s: None, filename="nul\x00"),
    Payload("bytes", lambda s: None, filename="back\\slash"),
    Payload("bytes", lambda s: None, filename="x" * 256),
    Payload("bytes", lambda s: None, filename="lone\udc80surrogate"),
    Payload("bytes", lambda s: None, filename=7),  # type: ignore[arg-type]
    Payload("file", lambda s: None),
    Payload("directory", lambda s: None),
    Payload("pickle", lambda s: None),
    Payload(["bytes"], lambda s: None),  # type: ignore[arg-type]
    Payload("bytes", b"not callable"),  # type: ignore[arg-type]
])
def test_a_bad_payload_is_refused_before_any_write(root: Path, payload: Payload) -> None:
    manager = _manager(root)
    manager.init_run("p")
    blobs_before = sorted((root / "blobs").rglob("*"))
    with pytest.raises(SerializationError):
        manager.log_artifact("model", "checkpoint", data=payload)
    assert sorted((root / "blobs").rglob("*")) == blobs_before
    assert manager.list_artifacts() == []
    manager.finalize_run()


def test_a_payload_that_fails_half_way_leaves_nothing(root: Path) -> None:
    def write(sink: object) -> None:
        sink.write(b"x" * 10_000)  # type: ignore[attr-defined]
        raise RuntimeError("serialization blew up")

    manager = _manager(root)
    manager.init_run("p")
    with pytest.raises(RuntimeError, match="blew up"):
        manager.log_artifact("model", "checkpoint", data=Payload("bytes", write))
    assert manager.list_artifacts() == []
    assert [p for p in (root / "blobs").rglob("*") if p.is_file()] == []
    assert [p for p in (root / "tmp").iterdir()] == []
    manager.finalize_run()
    run_dir = next((root / "runs").iterdir())
    assert not any(e["event"] == "version" for e in _events(root, run_dir.name))


def test_prune_event_lines_are_json(root: Path) -> None:
    """Sanity of the journal line itself (``repro recover`` parses it untrusted)."""
    manager = _manager(root)
    run = manager.init_run("r")
    manager.log_artifact("a", "dataset", data=b"1")
    manager.log_artifact("a", "dataset", data=b"2")
    manager.prune_version("a:v1")
    manager.finalize_run()
    lines = (root / "runs" / str(run.id) / JOURNAL_NAME).read_text().splitlines()
    prune = json.loads(lines[-1])
    assert prune["event"] == "prune" and prune["key"] == "default/a:v1"
    assert prune["aliases"] == []  # v1 had no alias left when pruned


def test_the_cli_marks_pruned_versions(root: Path) -> None:
    from click.testing import CliRunner

    from repro_core.cli import main

    manager = _manager(root)
    _three(manager)
    manager.prune_version("ckpt:v1")
    listed = CliRunner().invoke(main, ["artifacts", "ckpt", "--root", str(root), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {r["version"]: r for r in json.loads(listed.stdout)}
    assert rows["v1"]["pruned_at"] and rows["v2"]["pruned_at"] is None
    table = CliRunner().invoke(main, ["artifacts", "ckpt", "--root", str(root)])
    line = next(x for x in table.stdout.splitlines() if "ckpt:v1" in x)
    assert "pruned" in line
