"""The PostgreSQL registry on a real server (tests/pg_support.py): what only a shared server
can get wrong — concurrent writers on several processes, faults that must read as one clear
error without the password, credentials that must never be written down, schema creation and
upgrades under concurrency, a store's binding to its registry, gc against another host's
publication, and the CLI. No mocks: every process talks to the server as a team's hosts do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from pg_support import PASSWORD, PgServer, _free_port

from repro_core import ArtifactManager
from repro_core.errors import InvalidArgumentError, StorageError
from repro_core.maintenance import GcReport, collect_garbage, verify_store
from repro_core.registry import SCHEMA_VERSION, Registry
from repro_core.types import parse_key

WORKER = Path(__file__).parent / "pg_scripts" / "pg_worker.py"
WRITERS, PER_WRITER = 8, 100


# -- helpers ----------------------------------------------------------------------------------


def _schema(url: str) -> str:
    """The schema a fixture URL works in (``options=-csearch_path=<schema>``)."""
    options = parse_qs(urlsplit(url).query)["options"][0]
    return options.split("=", 1)[1]


def _sql(server: PgServer, sql: str) -> list[str]:
    """Rows of ``sql`` (psql's unaligned output, one line a row) as the admin sees them."""
    out = server.psql(sql).stdout
    return [line for line in out.splitlines() if line]


def _env(url: str | None, home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a subprocess bound to ``url`` (its password included, as a user's
    REPRO_REGISTRY would hold it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("REPRO_REGISTRY", "REPRO_HOME")}
    if url is not None:
        env["REPRO_REGISTRY"] = url
    if home is not None:
        env["REPRO_HOME"] = str(home)
    return {**env, **extra}


def _spawn(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(WORKER), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(procs: list[subprocess.Popen[str]], timeout: float) -> list[str]:
    """Wait for every worker (killing all of them past ``timeout``); each must exit 0."""
    deadline, outs = time.monotonic() + timeout, []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            assert proc.returncode == 0, f"worker failed ({proc.returncode}): {err[-3000:]}"
            outs.append(out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outs


def _wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _manager(root: Path) -> ArtifactManager:
    """A fresh singleton on ``root`` (whose registry REPRO_REGISTRY, as set by the test, names)."""
    mgr = ArtifactManager.reset_instance()
    mgr.set_root(root)
    return mgr


def _populate(root: Path) -> dict[str, str]:
    """dataset -> run train -> model -> run evaluate (uses model) -> evaluation."""
    mgr = _manager(root)
    train = mgr.init_run("train", config={"lr": 0.1})
    mgr.log_artifact("dataset", "dataset", data=b"rows" * 10)
    mgr.log_artifact("model", "model", data=b"weights" * 10, parent_artifacts=["dataset"])
    mgr.log_metrics({"loss": 0.25}, step=1)
    mgr.finalize_run()
    evaluate = mgr.init_run("evaluate")
    mgr.use_artifact("model:latest")
    mgr.log_artifact("evaluation", "evaluation", data={"acc": 0.9})
    mgr.finalize_run()
    ArtifactManager.reset_instance()
    assert train.id and evaluate.id
    return {"train": train.id, "evaluate": evaluate.id}


@pytest.fixture
def bound(pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A new store whose registry is a fresh schema: REPRO_REGISTRY is set for the whole test,
    and the store's first write open binds it (writes its registry.url)."""
    monkeypatch.setenv("REPRO_REGISTRY", pg_url)
    return tmp_path / "store"


# -- 1. concurrent writers --------------------------------------------------------------------


def test_eight_processes_number_800_versions_of_one_name(
        pg_server: PgServer, pg_url: str, bound: Path) -> None:
    """Eight processes, one store directory, one schema, racing to create the schema and to
    take "the next version number": the advisory write lock must make the numbering 1..800
    with none lost or doubled, and ``latest`` must name the last one."""
    env = _env(pg_url)
    procs = [_spawn("log", str(bound), str(w), str(PER_WRITER), env=env) for w in range(WRITERS)]
    _finish(procs, timeout=420)
    schema, total = _schema(pg_url), WRITERS * PER_WRITER
    numbers = _sql(pg_server, f"SELECT version FROM {schema}.versions WHERE name = 'shared' "
                              "ORDER BY version")
    assert [int(n) for n in numbers] == list(range(1, total + 1))
    assert _sql(pg_server, f"SELECT count(DISTINCT digest) FROM {schema}.versions") == [str(total)]
    registry = Registry(bound / "registry.sqlite", readonly=True)
    assert registry.resolve(parse_key("shared:latest")).version == total
    assert len({r.run_id for r in registry.list_versions("shared")}) == WRITERS
    assert verify_store(bound, full=False).ok  # every row's blob is in the shared directory


# -- 2. faults --------------------------------------------------------------------------------


def _fault_urls(server: PgServer, schema_url: str) -> dict[str, tuple[str, str]]:
    """Each fault's URL and the ``host:port`` its message must name."""
    closed = _free_port()
    here = f"127.0.0.1:{server.port}"
    return {
        "closed-port": (f"postgresql://repro:{PASSWORD}@127.0.0.1:{closed}/repro",
                        f"127.0.0.1:{closed}"),
        "wrong-password": (schema_url.replace(PASSWORD, PASSWORD + "-wrong"), here),
        "missing-database": (server.url(database="nonexistent_db"), here),
    }


@pytest.mark.parametrize("fault", ["closed-port", "wrong-password", "missing-database"])
def test_faults_are_one_clear_error_without_the_password(
        pg_server: PgServer, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        fault: str) -> None:
    """A user's first contact with a bad URL: one StorageError, quickly, naming where it
    tried (host:port) and never the password — through the public API and the Registry."""
    url, where = _fault_urls(pg_server, pg_url)[fault]
    monkeypatch.setenv("REPRO_REGISTRY", url)
    for attempt in (lambda: _manager(tmp_path / "store").init_run("x"),
                    lambda: Registry(url, root=tmp_path / "direct").open()):
        started = time.monotonic()
        with pytest.raises(StorageError) as caught:
            attempt()
        message = str(caught.value)
        assert time.monotonic() - started < 15, "a fault must not hang"
        assert PASSWORD not in message and where in message, message
        assert "\n" not in message and caught.value.__cause__ is None, message


def test_failed_first_open_does_not_bind_the_store(
        pg_server: PgServer, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in REPRO_REGISTRY that never connected must not bind the store to it: after
    fixing the variable, the store opens on the right server."""
    root = tmp_path / "store"
    monkeypatch.setenv("REPRO_REGISTRY", pg_server.url(database="nonexistent_db"))
    with pytest.raises(StorageError):
        _manager(root).init_run("typo")
    monkeypatch.setenv("REPRO_REGISTRY", pg_url)
    _manager(root).init_run("fixed")
    ArtifactManager.reset_instance()


# -- 3. credentials ---------------------------------------------------------------------------


def _database_text(server: PgServer, schema: str) -> str:
    """Every row of every table of ``schema`` as text (bytea as hex), to search for secrets."""
    tables = _sql(server, "SELECT table_name FROM information_schema.tables "
                          f"WHERE table_schema = '{schema}'")
    assert "runs" in tables and "versions" in tables
    return "\n".join(server.psql(f"SELECT t::text FROM {schema}.{table} t").stdout
                     for table in tables)


def test_password_is_written_nowhere(pg_server: PgServer, pg_url: str, bound: Path) -> None:
    """A run whose REPRO_REGISTRY holds the password (and whose COMPLETE environment capture
    records the environment variables): neither the store's files nor any row may hold it."""
    root = bound
    _finish([_spawn("capture", str(root), env=_env(pg_url, root))], timeout=300)
    files = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.parent.parent.name == "runs" for p in files)  # the run's export is there
    leaks = [p for p in files if PASSWORD.encode() in p.read_bytes()]
    assert leaks == []
    config = (root / "registry.url").read_text()
    assert config.strip() == pg_server.url(_schema(pg_url), password=False)
    dump = _database_text(pg_server, _schema(pg_url))
    assert "secretive" in dump  # the run is there…
    assert PASSWORD not in dump and PASSWORD.encode().hex() not in dump  # …its password not
    env = _environment_of(root)
    assert "REPRO_REGISTRY" in env["env_vars"] and PASSWORD not in json.dumps(env)


def _environment_of(root: Path) -> dict[str, Any]:
    """The captured environment artifact, loaded as a user would (proves it recorded the
    variables, so the search above was not vacuous). REPRO_REGISTRY is set by the caller."""
    try:
        env = _manager(root).load_artifact("environment")
    finally:
        ArtifactManager.reset_instance()
    assert isinstance(env, dict)
    return env


# -- 4. schema --------------------------------------------------------------------------------


def _version(server: PgServer, url: str) -> int:
    return int(_sql(server, f"SELECT version FROM {_schema(url)}.schema_version")[0])


def _indexes(server: PgServer, url: str) -> set[str]:
    return set(_sql(server, f"SELECT indexname FROM pg_indexes WHERE schemaname = "
                            f"'{_schema(url)}'"))


def _columns(server: PgServer, url: str, table: str) -> set[str]:
    return set(_sql(server, "SELECT column_name FROM information_schema.columns WHERE "
                            f"table_schema = '{_schema(url)}' AND table_name = '{table}'"))


def test_fresh_schema_is_created_at_the_current_version(
        pg_server: PgServer, pg_url: str, tmp_path: Path) -> None:
    Registry(pg_url, root=tmp_path / "store").open()
    assert _version(pg_server, pg_url) == SCHEMA_VERSION
    assert {"run_states_run", "online_updates_run"} <= _indexes(pg_server, pg_url)
    assert "manifest" in _columns(pg_server, pg_url, "versions")


def test_newer_schema_is_refused(pg_server: PgServer, pg_url: str, tmp_path: Path) -> None:
    """A registry upgraded by a newer repro must not be written (nor read) by this one."""
    Registry(pg_url, root=tmp_path / "store").open()
    pg_server.psql(f"UPDATE {_schema(pg_url)}.schema_version SET version = 99")
    for readonly in (False, True):
        with pytest.raises(StorageError, match="newer than this repro") as caught:
            Registry(pg_url, root=tmp_path / "store", readonly=readonly).open()
        assert PASSWORD not in str(caught.value)
    assert _version(pg_server, pg_url) == 99  # untouched


def test_v6_schema_is_upgraded_on_the_next_write_open(
        pg_server: PgServer, pg_url: str, tmp_path: Path) -> None:
    """A registry made by a repro whose PostgreSQL schema was BASE (v6): a read-only open
    asks for an upgrade, the next write open performs the shared v7 and v8 migrations."""
    root = tmp_path / "store"
    Registry(pg_url, root=root).open()
    schema = _schema(pg_url)
    pg_server.psql(f"DROP INDEX {schema}.run_states_run, {schema}.online_updates_run; "
                   f"ALTER TABLE {schema}.versions DROP COLUMN manifest; "
                   f"UPDATE {schema}.schema_version SET version = 6")
    with pytest.raises(StorageError, match="older than this repro"):
        Registry(pg_url, root=root, readonly=True).open()
    Registry(pg_url, root=root).open()
    assert _version(pg_server, pg_url) == SCHEMA_VERSION
    assert {"run_states_run", "online_updates_run"} <= _indexes(pg_server, pg_url)
    assert "manifest" in _columns(pg_server, pg_url, "versions")


def _waiting_on_advisory_locks(server: PgServer) -> int:
    return int(_sql(server, "SELECT count(*) FROM pg_locks "
                            "WHERE locktype = 'advisory' AND NOT granted")[0])


def test_concurrent_first_opens_create_the_schema_once(
        pg_server: PgServer, pg_url: str, tmp_path: Path) -> None:
    """Three processes open a fresh schema while the schema lock is held (so all three have
    seen it empty): each must wait, one creates, the others find it made — same store id."""
    import psycopg

    from repro_core.registry.pg_connect import LOCK_CLASS as _LOCK_CLASS
    from repro_core.registry.pg_connect import lock_key as _lock_key

    key = _lock_key(_schema(pg_url), "schema")
    with psycopg.connect(pg_url, autocommit=True) as holder:
        holder.execute("BEGIN")
        holder.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_CLASS, key))
        env = _env(None)
        procs = [_spawn("open", pg_url, str(tmp_path / f"s{i}"), env=env) for i in range(3)]
        try:
            _wait_for(lambda: _waiting_on_advisory_locks(pg_server) == 3, 60,
                      "three openers waiting on the schema lock")
        finally:
            holder.execute("COMMIT")
        ids = {out.strip() for out in _finish(procs, timeout=120)}
    assert len(ids) == 1 and ids != {""} and ids != {"None"}
    assert _version(pg_server, pg_url) == SCHEMA_VERSION
    assert _sql(pg_server, f"SELECT count(*) FROM {_schema(pg_url)}.schema_version") == ["1"]


# -- 5. binding a store to its registry -------------------------------------------------------


def test_sqlite_store_with_repro_registry_asks_for_migrate(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "store"
    mgr = _manager(root)  # REPRO_REGISTRY unset: SQLite
    mgr.init_run("local")
    mgr.log_artifact("data", "dataset", data=b"x")
    mgr.finalize_run()
    monkeypatch.setenv("REPRO_REGISTRY", pg_url)
    for attempt in (lambda: Registry(root / "registry.sqlite"),
                    lambda: _manager(root).init_run("remote")):
        with pytest.raises(InvalidArgumentError, match="repro migrate") as caught:
            attempt()
        assert PASSWORD not in str(caught.value)
    assert not (root / "registry.url").exists()
    ArtifactManager.reset_instance()


def test_bound_store_refuses_another_url_and_keeps_no_password(
        pg_server: PgServer, pg_url: str, bound: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first write open binds the store (without the password); another URL is refused;
    with REPRO_REGISTRY unset the binding alone (plus PGPASSWORD) finds the registry."""
    Registry(bound / "registry.sqlite").open()
    assert (bound / "registry.url").read_text().strip() == \
        pg_server.url(_schema(pg_url), password=False)
    monkeypatch.setenv("REPRO_REGISTRY", pg_server.new_schema())
    with pytest.raises(InvalidArgumentError, match="keeps its registry at") as caught:
        Registry(bound / "registry.sqlite")
    assert PASSWORD not in str(caught.value)
    monkeypatch.delenv("REPRO_REGISTRY")
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    registry = Registry(bound / "registry.sqlite", readonly=True)
    assert registry.engine == "postgresql" and registry.list_runs() == []


@pytest.mark.parametrize("config", ["symlink", "garbage", "sqlite-path"])
def test_bad_registry_url_file_is_a_storage_error(
        pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str) -> None:
    """registry.url is store input like any other: a link or a non-URL is refused, with or
    without REPRO_REGISTRY, and never silently replaced by SQLite."""
    root = tmp_path / "store"
    root.mkdir()
    target = root / "registry.url"
    if config == "symlink":
        real = tmp_path / "elsewhere.url"
        real.write_text(pg_url.replace(f":{PASSWORD}", "") + "\n")
        target.symlink_to(real)
    else:
        target.write_text("not a url at all\n" if config == "garbage" else "/tmp/x.sqlite\n")
    for explicit in (None, pg_url):
        if explicit is None:
            monkeypatch.delenv("REPRO_REGISTRY", raising=False)
        else:
            monkeypatch.setenv("REPRO_REGISTRY", explicit)
        with pytest.raises(StorageError, match=r"registry\.url"):
            Registry(root / "registry.sqlite", readonly=True)
    assert not (root / "registry.sqlite").exists()


# -- 6. gc against another process's publication ----------------------------------------------


def _gc_in_thread(root: Path) -> tuple[threading.Thread, dict[str, Any]]:
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["report"] = collect_garbage(root, dry_run=False, grace_seconds=0)
        except BaseException as exc:  # handed to the test thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_gc_waits_for_another_process_between_blob_and_row(
        pg_url: str, bound: Path, tmp_path: Path) -> None:
    """Process A is between publishing a blob and committing its row (it holds the
    registry's shared publish guard, as a writer on another host would, without the store's
    local lock file): ``gc --delete`` must wait for it, then run."""
    _populate(bound)
    ready, go = tmp_path / "ready", tmp_path / "go"
    holder = _spawn("hold", pg_url, str(bound), str(ready), str(go), env=_env(None))
    try:
        _wait_for(ready.exists, 60, "process A to hold the publish guard")
        thread, result = _gc_in_thread(bound)
        thread.join(3.0)
        assert thread.is_alive(), f"gc ran while another process was publishing: {result}"
        go.touch()
        thread.join(60.0)
        assert not thread.is_alive(), "gc still blocked after the writer let go"
    finally:
        go.touch()
        _finish([holder], timeout=60)
    assert "error" not in result, result.get("error")
    report = result["report"]
    assert isinstance(report, GcReport) and report.blobs == []  # every blob is referenced


# -- 7. the CLI -------------------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str]) -> str:
    """``repro ARGS`` as a subprocess (a user's shell: REPRO_REGISTRY in its environment);
    it must exit 0."""
    done = subprocess.run([sys.executable, "-m", "repro_core.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"repro {' '.join(args)}: {done.stdout}{done.stderr}"
    assert PASSWORD not in done.stdout + done.stderr
    return done.stdout


def test_cli_reads_a_postgresql_registry(pg_url: str, bound: Path) -> None:
    runs = _populate(bound)
    env, root = _env(pg_url), ["--root", str(bound)]
    listed = json.loads(_cli("runs", *root, "--json", env=env))
    assert {r["id"]: r["name"] for r in listed} == {v: k for k, v in runs.items()}
    artifacts = json.loads(_cli("artifacts", *root, "--json", env=env))
    assert {"default/dataset:v1", "default/model:v1", "default/evaluation:v1"} <= \
        {a["key"] for a in artifacts}
    lineage = _cli("lineage", "evaluation", *root, "--format", "json", env=env)
    assert "default/model:v1" in lineage and "default/dataset:v1" in lineage
    verified = json.loads(_cli("verify", *root, "--json", env=env))
    assert verified["ok"] is True and verified["blobs_checked"] >= 3
    gc = json.loads(_cli("gc", *root, "--json", env=env))
    assert gc["dry_run"] is True and gc["blobs"] == []


# -- URLs that may come from a store's config: only what repro passes on ----------------------

@pytest.mark.parametrize("query", ["password=hunter2", "sslpassword=hunter2",
                                   "host=/tmp/evil", "passfile=/root/.pgpass",
                                   "sslkey=/root/.ssh/id_rsa", "service=prod"])
def test_registry_urls_may_not_steer_libpq(query: str) -> None:
    """A password belongs in PGPASSWORD / ~/.pgpass (never in a URL a store keeps), and a
    store's config must not point libpq at local files or services."""
    from repro_core.registry.dialect import check_url, redact_url

    url = f"postgresql://u@db.example/repro?{query}"
    with pytest.raises(InvalidArgumentError, match=query.split("=")[0]) as info:
        check_url(url)
    assert "hunter2" not in str(info.value) and "hunter2" not in redact_url(url)
    assert check_url("postgresql://u@db.example/repro?options=-csearch_path%3Dx&sslmode=require")


def test_a_config_file_that_is_no_plain_file_is_refused_at_once(tmp_path: Path) -> None:
    """``registry.url`` is store input: a FIFO is refused (never waited on), as is a URL in
    it that sets what repro does not pass on."""
    from repro_core.registry.target import CONFIG_NAME

    fifo = tmp_path / "fifo-store"
    fifo.mkdir()
    os.mkfifo(fifo / CONFIG_NAME)
    with pytest.raises(StorageError, match="not a plain file"):
        Registry(fifo / "registry.sqlite", readonly=True)
    steered = tmp_path / "steered"
    steered.mkdir()
    (steered / CONFIG_NAME).write_text("postgresql://u@db.example/r?sslkey=/root/.ssh/id\n")
    with pytest.raises(StorageError, match="sslkey"):
        Registry(steered / "registry.sqlite", readonly=True)
