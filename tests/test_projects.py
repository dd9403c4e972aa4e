"""Names live in a project; versions count from v1; old stores are migrated (issue 9)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from repro_core import ArtifactManager, ArtifactNotFoundError, InvalidNameError
from repro_core.registry import SCHEMA_VERSION, Registry
from repro_core.registry.schema import _SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3, run_script


def test_versions_count_from_v1_as_the_seed_example_expects(manager: ArtifactManager,
                                                           run: object) -> None:
    first = manager.log_artifact("dataset", "dataset", data=b"first")
    manager.log_artifact("dataset", "dataset", data=b"second")
    assert first.version == "v1"
    assert manager.load_artifact("dataset:v1") == b"first"  # @track_artifacts(["dataset:v1"])
    assert manager.load_artifact("dataset", "1") == b"first"
    with pytest.raises(InvalidNameError, match="numbered v1"):
        manager.use_artifact("dataset:v0")


def test_same_name_in_two_projects_are_two_artifacts(manager: ArtifactManager) -> None:
    manager.init_run("a", project="alpha")
    a = manager.log_artifact("checkpoint", "checkpoint", data=b"alpha weights")
    manager.finalize_run()
    manager.init_run("b", project="beta")
    b = manager.log_artifact("checkpoint", "checkpoint", data=b"beta weights")
    # A bare name resolves in the active run's project: never another project's latest.
    assert manager.load_artifact("checkpoint:latest") == b"beta weights"
    assert manager.load_artifact("alpha/checkpoint:latest") == b"alpha weights"
    manager.finalize_run()
    assert (a.key, b.key) == ("alpha/checkpoint:v1", "beta/checkpoint:v1")
    assert a.project == "alpha" and b.project == "beta"


def test_bare_name_falls_back_to_default_but_not_to_other_projects(
        manager: ArtifactManager) -> None:
    manager.init_run("shared", project="default")
    manager.log_artifact("tokenizer", "dataset", data=b"vocab")
    manager.finalize_run()
    manager.init_run("other", project="elsewhere")
    manager.log_artifact("only-elsewhere", "dataset", data=b"x")
    manager.finalize_run()
    manager.init_run("mine", project="mine")
    assert manager.load_artifact("tokenizer") == b"vocab"  # project, then default
    with pytest.raises(ArtifactNotFoundError, match="'mine' or 'default'"):
        manager.use_artifact("only-elsewhere")  # a run never picks another project's
    assert manager.load_artifact("elsewhere/only-elsewhere") == b"x"
    manager.finalize_run()
    # Without a run (read-only use), a name only one project holds resolves there.
    assert manager.load_artifact("only-elsewhere") == b"x"


def test_ambiguous_bare_name_without_a_run_names_the_projects(manager: ArtifactManager) -> None:
    for project in ("p1", "p2"):
        manager.init_run("r", project=project)
        manager.log_artifact("model", "model", data=project.encode())
        manager.finalize_run()
    with pytest.raises(ArtifactNotFoundError, match="p1, p2"):
        manager.use_artifact("model")


def test_parents_resolve_in_the_project(manager: ArtifactManager) -> None:
    manager.init_run("r", project="vision")
    ds = manager.log_artifact("ds", "dataset", data=b"d")
    model = manager.log_artifact("model", "model", data=b"m", parent_artifacts=["ds"])
    manager.finalize_run()
    assert model.parent_artifacts == [ds.key] == ["vision/ds:v1"]


@pytest.mark.parametrize("project", ["a/b", "has space", "", "x:y", "..", "a@b"])
def test_project_names_follow_the_key_grammar(manager: ArtifactManager, project: str) -> None:
    with pytest.raises(InvalidNameError):
        manager.init_run("r", project=project)
    assert not (manager.root / "registry.sqlite").exists()
    assert not (manager.root / "registry.url").exists()  # nor bound to a PostgreSQL one


def _v3_store(path: Path) -> None:
    """A registry as the previous release wrote it: schema v3, versions from v0, one global
    namespace shared by two projects."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for script in (_SCHEMA_V1, _SCHEMA_V2, _SCHEMA_V3):
        run_script(conn, script)
    conn.execute("INSERT INTO schema_version VALUES (3)")
    conn.execute("INSERT INTO store_meta VALUES ('hash_algorithm', 'blake3')")
    conn.executemany("INSERT INTO runs VALUES (?, ?, ?, 'completed', '[]', '{}', ?, ?, 'h', 1,"
                     " 1)", [("r1", "one", "alpha", "t1", "t1"), ("r2", "two", "beta", "t2", "t2"),
                             ("r3", "three", "not a valid project", "t3", "t3")])
    conn.execute("INSERT INTO artifacts VALUES ('ckpt', 'checkpoint', 't')")
    conn.execute("INSERT INTO artifacts VALUES ('unused', 'dataset', 't')")
    rows = [(1, 0, "r1"), (2, 1, "r2"), (3, 2, "r1"), (4, 3, "r3")]
    conn.executemany("INSERT INTO versions VALUES (?, 'ckpt', ?, ?, 1, 'bytes', ?, 't', '{}')",
                     [(i, n, f"blake3:{i:064x}", r) for i, n, r in rows])
    conn.executemany("INSERT INTO version_blobs VALUES (?, ?, 1)",
                     [(i, f"blake3:{i:064x}") for i, _, _ in rows])
    conn.execute("INSERT INTO artifact_parents VALUES (3, 1)")
    conn.executemany("INSERT INTO aliases VALUES ('ckpt', ?, ?)",
                     [("latest", 4), ("best", 2), ("gold", 1)])
    conn.execute("COMMIT")
    conn.close()


@pytest.mark.sqlite_only("a v3 store was a SQLite file (a PostgreSQL registry starts at v6)")
def test_v3_store_migrates_to_projects_and_v1_numbering(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    _v3_store(path)
    registry = Registry(path)
    versions = {v.id: v for v in registry.list_versions()}
    assert registry._read("SELECT version FROM schema_version")[0][0] == SCHEMA_VERSION
    # Each version moves to its run's project and up by one; ids (edges) are unchanged.
    assert {i: v.key for i, v in versions.items()} == {
        1: "alpha/ckpt:v1", 2: "beta/ckpt:v2", 3: "alpha/ckpt:v3", 4: "default/ckpt:v4"}
    assert [p.id for p in registry.parents_of(3)] == [1]
    # Aliases follow their version; latest is per project.
    assert registry.aliases_of(1) == ["gold"]
    assert registry.aliases_of(2) == ["best", "latest"]
    assert registry.aliases_of(3) == ["latest"]
    assert registry.aliases_of(4) == ["latest"]
    assert registry.projects_of("unused") == ["default"]  # a name without versions stays
    assert registry.store_id()
    registry.close()


@pytest.mark.sqlite_only("a v3 store was a SQLite file (a PostgreSQL registry starts at v6)")
def test_v3_store_is_readable_read_only_without_migrating_it_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    _v3_store(path)
    before = path.read_bytes()
    reader = Registry(path, readonly=True)
    assert next(v.key for v in reader.list_versions()) == "alpha/ckpt:v1"
    reader.close()
    assert path.read_bytes() == before


def test_newer_schema_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    registry = Registry(path, create=True)  # SQLite, or REPRO_REGISTRY's server
    with registry._write() as conn:  # as a newer repro would leave it
        conn.execute("UPDATE schema_version SET version = 99")
    registry.close()
    for readonly in (False, True):
        with pytest.raises(Exception, match="newer than this repro"):
            Registry(path, readonly=readonly).open()
