"""``repro migrate``: SQLite → PostgreSQL → SQLite loses nothing, and the store follows.

A store with everything a registry holds (runs and their state history, versions, aliases,
lineage edges, metrics with NaN and ±inf, TTRL experiences and updates, a remote's state) is
copied to a real PostgreSQL server and back; every table must come back identical, row for
row, and the API must read the same answers from each engine on the way.
"""

from __future__ import annotations

import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pg_support import PASSWORD, PgServer

from repro_core import ArtifactManager
from repro_core.errors import InvalidArgumentError, RunStateError, StorageError
from repro_core.registry.migrate import TABLES, migrate

_FILL = """
import math, sys
from repro_core import ArtifactManager
from repro_core.ttrl import TTRLContext
m = ArtifactManager.reset_instance(); m.set_root(sys.argv[1])
m.init_run("first", config={"lr": 0.1}, tags=["a"])
m.log_artifact("data", "dataset", data=b"rows", aliases=["gold"])
m.log_artifact("Zeta", "dataset", data=b"upper case sorts first in bytes")
for i in range(300):
    v = math.nan if i == 7 else (math.inf if i == 8 else -math.inf if i == 9 else 1 / (i + 1))
    m.log_metrics({"loss": v, "acc": i / 300}, step=i)
m.finalize_run()
m.init_run("second", config={"lr": 0.2})
m.use_artifact("data:gold")
m.log_artifact("model", "model", data={"w": [1, 2, 3]}, parent_artifacts=["data"])
m.log_artifact("model", "model", data={"w": [1, 2, 4]})
m.finalize_run()
with TTRLContext(name="third", root=sys.argv[1], monitor_hardware=False,
                 capture_level=1) as ctx:
    for i in range(20):
        ctx.log_experience(f"e{i}", f"q{i}", f"a{i}")
        reward = math.nan if i == 3 else (math.inf if i == 4 else i / 10)
        ctx.log_online_update(f"e{i}", reward=reward, confidence=0.5, kl_divergence=0.01)
"""


def _fill(root: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REPRO_REGISTRY"}
    subprocess.run([sys.executable, "-c", _FILL, str(root)], check=True, env=env, timeout=120)


def _dump_sqlite(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    conn = sqlite3.connect(path)
    try:
        out = {}
        for table, order in TABLES:
            cols = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            rows = conn.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {order}")
            out[table] = [tuple("nan" if isinstance(v, float) and math.isnan(v) else v
                                for v in row) for row in rows]
        return out
    finally:
        conn.close()


def _answers(root: Path) -> dict[str, Any]:
    """What a user reads back through the API (the same on either engine)."""
    mgr = ArtifactManager.reset_instance()
    mgr.set_root(root)
    try:
        registry = mgr.registry()
        runs = sorted(registry.list_runs(), key=lambda r: r.name)
        loss = mgr.get_metrics(runs[0].id)["loss"]
        return {
            "runs": [(r.id, r.name, r.state) for r in runs],
            "artifacts": sorted((a.name, a.version, a.hash) for a in mgr.list_artifacts()),
            "loss": [(s, "nan" if math.isnan(v) else v, t) for s, v, t in loss],
            "updates": [{k: "nan" if isinstance(v, float) and math.isnan(v) else v
                         for k, v in u.items()}
                        for u in registry.online_updates(runs[2].id, None)],
            "gold": mgr.use_artifact("data:gold").hash,
        }
    finally:
        ArtifactManager.reset_instance()


@pytest.fixture
def filled(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    _fill(root)
    return root


def test_round_trip_is_lossless(filled: Path, pg_url: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    before = _dump_sqlite(filled / "registry.sqlite")
    assert before["metric_chunks"] and before["online_updates"] and before["artifact_parents"]
    answers = _answers(filled)
    report = migrate(filled, pg_url)
    assert report.rows == {t: len(rows) for t, rows in before.items()}
    config = (filled / "registry.url").read_text()
    assert PASSWORD not in config and "127.0.0.1" in config
    assert not (filled / "registry.sqlite").exists()
    assert report.moved_aside and Path(report.moved_aside).exists()  # kept, never deleted
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # the store's URL has no password
    assert _answers(filled) == answers  # read from PostgreSQL now
    back = migrate(filled, "sqlite")
    assert back.rows == report.rows
    assert not (filled / "registry.url").exists()
    assert _dump_sqlite(filled / "registry.sqlite") == before
    assert _answers(filled) == answers


def test_refusals_leave_the_store_as_it_was(filled: Path, pg_url: str,
                                            pg_server: PgServer) -> None:
    before = _dump_sqlite(filled / "registry.sqlite")
    with pytest.raises(InvalidArgumentError, match="postgresql://"):
        migrate(filled, "mysql://x/y")
    with pytest.raises(InvalidArgumentError, match="already uses SQLite"):
        migrate(filled, "sqlite")
    assert _dump_sqlite(filled / "registry.sqlite") == before
    assert not (filled / "registry.url").exists()
    migrate(filled, pg_url)
    other = filled.parent / "other"
    _fill(other)
    with pytest.raises(StorageError, match="already holds runs") as info:
        migrate(other, pg_url)  # never into a registry that is in use
    assert PASSWORD not in str(info.value)
    assert (other / "registry.sqlite").exists() and not (other / "registry.url").exists()
    wrong = pg_server.url(pg_server.new_schema().rsplit("%3D", 1)[1], password=False)
    third = filled.parent / "third"
    _fill(third)
    env_pw = os.environ.pop("PGPASSWORD", None)
    try:
        with pytest.raises(StorageError) as info:
            migrate(third, wrong.replace("repro@", "repro:wrong-pw@"))
    finally:
        if env_pw is not None:
            os.environ["PGPASSWORD"] = env_pw
    assert "wrong-pw" not in str(info.value) and "***" in str(info.value)
    assert (third / "registry.sqlite").exists() and not (third / "registry.url").exists()


def test_a_running_run_blocks_the_move(tmp_path: Path, pg_url: str) -> None:
    mgr = ArtifactManager.reset_instance()
    mgr.set_root(tmp_path / "store")
    mgr.init_run("busy")
    mgr.log_artifact("x", "dataset", data=b"x")
    try:
        with pytest.raises(RunStateError, match="still running"):
            migrate(tmp_path / "store", pg_url)
        assert (tmp_path / "store" / "registry.sqlite").exists()
    finally:
        mgr.finalize_run()
        ArtifactManager.reset_instance()


def test_cli_migrate_and_back(filled: Path, pg_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REPRO_REGISTRY"}
    env["PGPASSWORD"] = PASSWORD
    repro = [sys.executable, "-m", "repro_core.cli", "--root", str(filled)]
    out = subprocess.run([*repro, "migrate", "--to", pg_url], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "verified row for row" in out.stdout and PASSWORD not in out.stdout + out.stderr
    for command in (["runs"], ["artifacts"], ["lineage", "model"], ["verify"], ["db", "upgrade"]):
        done = subprocess.run([*repro, *command], env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, (command, done.stderr)
    assert "postgresql" in done.stdout
    out = subprocess.run([*repro, "migrate", "--to", "sqlite", "--json"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (filled / "registry.sqlite").exists() and not (filled / "registry.url").exists()


def test_init_run_registry_binds_the_store(tmp_path: Path, pg_url: str) -> None:
    """``init_run(registry=URL)``: the store is bound (URL written without the password) and
    the password given is used for the rest of the process."""
    root = tmp_path / "store"
    mgr = ArtifactManager.reset_instance()
    mgr.set_root(root)
    try:
        with pytest.raises(InvalidArgumentError):
            mgr.init_run("bad", registry="postgresql://host-only")
        assert not root.exists()
        mgr.init_run("team", registry=pg_url)
        mgr.log_metrics({"loss": 1.0}, step=0)
        mgr.log_artifact("x", "dataset", data=b"x")
        run = mgr.current_run
        assert run is not None
        mgr.finalize_run()
        assert PASSWORD not in (root / "registry.url").read_text()
        assert mgr.registry().engine == "postgresql"
        assert [p[:2] for p in mgr.get_metrics(run.id)["loss"]] == [(0, 1.0)]
    finally:
        ArtifactManager.reset_instance()


def test_recover_refuses_a_store_bound_to_postgresql(filled: Path, pg_url: str) -> None:
    """``repro recover`` rebuilds SQLite registries; a store whose registry is a shared
    server's database is refused (one host's journals are not the team's registry)."""
    from repro_core import recover_store

    migrate(filled, pg_url)
    with pytest.raises(InvalidArgumentError, match="PostgreSQL") as info:
        recover_store(filled)
    assert PASSWORD not in str(info.value)
    assert not (filled / "registry.sqlite").exists()


def test_a_forged_source_schema_is_refused_before_any_sql(filled: Path, pg_url: str,
                                                          pg_server: PgServer) -> None:
    """Column names come from the store's file: one that is not this package's is refused,
    never pasted into the server's SQL."""
    conn = sqlite3.connect(filled / "registry.sqlite")
    conn.execute('ALTER TABLE runs ADD COLUMN "x) FROM runs; DROP TABLE runs; --" TEXT')
    conn.commit()
    conn.close()
    from repro_core.errors import IntegrityError

    with pytest.raises(IntegrityError, match="columns"):
        migrate(filled, pg_url)
    schema = pg_url.rsplit("%3D", 1)[1]
    assert pg_server.psql(f"SELECT to_regclass('{schema}.runs') IS NOT NULL").stdout.strip() \
        == "t"
    assert (filled / "registry.sqlite").exists() and not (filled / "registry.url").exists()
