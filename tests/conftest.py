"""Shared fixtures: every test gets a fresh ArtifactManager on a store under tmp_path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_support import PgServer, start_server
from s3_support import moto_s3, s3_bucket, s3_env  # noqa: F401 (fixtures: a moto S3 server)

from repro_core import ArtifactManager
from repro_core.capture import seed as _seed

# What seed_everything changes process-wide besides the RNGs themselves (as Lightning's does).
_SEED_VARIABLES = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")


@pytest.fixture(autouse=True)
def _restore_seed_state() -> Iterator[None]:
    """Every test leaves the seed variables and ``recorded_seed()`` as it found them: a test
    that seeds must not make a later capture record its seed (or Lightning re-seed with it)."""
    saved = {name: os.environ.get(name) for name in _SEED_VARIABLES}
    recorded = _seed._recorded
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _seed._recorded = recorded


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def manager(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ArtifactManager]:
    """A fresh singleton pointed at an empty store; any run left active is abandoned after."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    mgr = ArtifactManager.reset_instance()
    mgr.set_root(store_root)
    yield mgr
    ArtifactManager.reset_instance()


@pytest.fixture
def store_home(manager: ArtifactManager, store_root: Path, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ``manager`` fixture's fresh store, also named by ``REPRO_HOME`` (what a Lightning
    Trainer's callbacks and subprocesses find), with ``tmp_path`` as the working directory (a
    Trainer's default directories land there, never in the checkout)."""
    monkeypatch.setenv("REPRO_HOME", str(store_root))
    monkeypatch.chdir(tmp_path)
    return store_root


@pytest.fixture
def run(manager: ArtifactManager):  # type: ignore[no-untyped-def]
    """An active run on the fresh store."""
    return manager.init_run("test-run", config={"lr": 0.1})


# -- registry engines -------------------------------------------------------------------------
# The modules whose every test runs twice: on SQLite (the default) and on a real PostgreSQL
# server (tests/pg_support.py). A test that is about SQLite itself (its file, its journal, a
# forged row written with sqlite3) is marked ``sqlite_only`` with the reason.
_BOTH_ENGINES = {
    "test_manager", "test_lineage", "test_metrics", "test_ttrl", "test_cli", "test_projects",
    "test_prune", "test_diff", "test_resume",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sqlite_only(reason): a test about the SQLite engine itself (not run on "
        "PostgreSQL in the modules that run on both)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "registry_engine" not in metafunc.fixturenames:
        return
    module = metafunc.module.__name__.rsplit(".", 1)[-1]
    if module in _BOTH_ENGINES and metafunc.definition.get_closest_marker("sqlite_only") is None:
        metafunc.parametrize("registry_engine", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One real PostgreSQL server for the whole session (skips or fails as pg_support says)."""
    yield from start_server()


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A URL (with its password) to a fresh, empty schema of the session's server."""
    return pg_server.new_schema()


@pytest.fixture(autouse=True)
def registry_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which engine this test's stores use: on ``postgresql``, ``REPRO_REGISTRY`` names a
    fresh schema, so every store the test opens (and every subprocess) uses the server.

    ``os.environ`` is set and restored here by hand, not with ``monkeypatch``: requesting
    monkeypatch in an autouse fixture would make it outlive the fixtures of Lightning's
    vendored tests, whose environment-leak check would then see their own variables."""
    engine = getattr(request, "param", "sqlite")
    saved = os.environ.pop("REPRO_REGISTRY", None)
    if engine == "postgresql":
        os.environ["REPRO_REGISTRY"] = request.getfixturevalue("pg_url")
    try:
        yield str(engine)
    finally:
        os.environ.pop("REPRO_REGISTRY", None)
        if saved is not None:
            os.environ["REPRO_REGISTRY"] = saved
        if engine == "postgresql":
            # Each test's schema is a new URL with its own pool: close them, or a few hundred
            # tests exhaust the server's max_connections.
            from repro_core.registry.engine_postgres import close_connections

            close_connections()
