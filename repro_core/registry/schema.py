"""The registry's SQL schema, one migration per version, and SQLite helpers for opening it.

Migrations up to v6 exist for SQLite only; from v7 on they are written in SQL both engines
accept and run on PostgreSQL too (whose registries start at v6: ``schema_pg.py``).

``migrations(current)`` yields the steps that bring a registry at ``current`` (0 = new) up to
``SCHEMA_VERSION``: DDL scripts, or functions of the connection for the migrations that must
rebuild tables. Each runs inside the opener's ``BEGIN IMMEDIATE`` transaction (with foreign
keys off, as SQLite's table-rebuild procedure requires), so a migration either fully happens
or not at all.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import constants
from ..errors import InvalidNameError
from ..types import DEFAULT_PROJECT, validate_project

__all__ = ["SCHEMA_VERSION", "Migration", "migrations", "retry_busy"]

SCHEMA_VERSION = 8
Migration = str | Callable[[Any], None]

_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, project TEXT NOT NULL, state TEXT NOT NULL,
    tags TEXT NOT NULL, config TEXT NOT NULL, created_at TEXT NOT NULL, ended_at TEXT,
    host TEXT, pid INTEGER, world_size INTEGER);
CREATE TABLE IF NOT EXISTS run_states (
    run_id TEXT NOT NULL REFERENCES runs(id), state TEXT NOT NULL, at TEXT NOT NULL, reason TEXT);
CREATE TABLE IF NOT EXISTS artifacts (
    name TEXT PRIMARY KEY, type TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY, name TEXT NOT NULL REFERENCES artifacts(name),
    version INTEGER NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL,
    format TEXT NOT NULL, run_id TEXT REFERENCES runs(id), created_at TEXT NOT NULL,
    metadata TEXT NOT NULL, UNIQUE (name, version));
CREATE INDEX IF NOT EXISTS versions_digest ON versions (digest);
CREATE TABLE IF NOT EXISTS aliases (
    name TEXT NOT NULL, alias TEXT NOT NULL,
    version_id INTEGER NOT NULL REFERENCES versions(id), PRIMARY KEY (name, alias));
CREATE TABLE IF NOT EXISTS version_blobs (
    version_id INTEGER NOT NULL REFERENCES versions(id), digest TEXT NOT NULL,
    size INTEGER NOT NULL, PRIMARY KEY (version_id, digest));
CREATE INDEX IF NOT EXISTS version_blobs_digest ON version_blobs (digest);
CREATE TABLE IF NOT EXISTS artifact_parents (
    child_id INTEGER NOT NULL REFERENCES versions(id),
    parent_id INTEGER NOT NULL REFERENCES versions(id), PRIMARY KEY (child_id, parent_id));
CREATE TABLE IF NOT EXISTS run_inputs (
    run_id TEXT NOT NULL REFERENCES runs(id), version_id INTEGER NOT NULL REFERENCES versions(id),
    used_at TEXT NOT NULL, PRIMARY KEY (run_id, version_id));
"""

# v2: metrics and Test-Time RL records. Metrics are stored column-wise in chunks (one row per
# series per flush: little-endian int64 steps, float64 values and unix times), so the writer
# does O(series) work per flush instead of O(points) and keeps up with any logging rate; NaN
# and ±inf survive bit-exactly. Hot tables carry no foreign keys (a lookup per row would halve
# the insert rate); rows are written only by the manager, which knows the run.
# run_outputs records every run that logged a version — also when its content equalled
# ``latest`` and no new version was made — so "what did run B log?" has an answer; it is
# back-filled from versions.run_id for v1 stores.
_SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS metric_series (
    id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, key TEXT NOT NULL, UNIQUE (run_id, key));
CREATE TABLE IF NOT EXISTS metric_chunks (
    id INTEGER PRIMARY KEY, series_id INTEGER NOT NULL, count INTEGER NOT NULL,
    first_step INTEGER NOT NULL, last_step INTEGER NOT NULL,
    steps BLOB NOT NULL, vals BLOB NOT NULL, times BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS metric_chunks_series ON metric_chunks (series_id, id);
CREATE TABLE IF NOT EXISTS experiences (
    id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, experience_id TEXT NOT NULL,
    input TEXT, output TEXT, payload_digest TEXT, metadata TEXT NOT NULL, time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS experiences_run ON experiences (run_id, experience_id);
CREATE TABLE IF NOT EXISTS online_updates (
    id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, update_id TEXT NOT NULL,
    experience_id TEXT NOT NULL, reward REAL, confidence REAL, kl_divergence REAL,
    model_version_id INTEGER, metadata TEXT NOT NULL, time REAL NOT NULL);
CREATE INDEX IF NOT EXISTS online_updates_version ON online_updates (model_version_id);
CREATE TABLE IF NOT EXISTS run_outputs (
    run_id TEXT NOT NULL REFERENCES runs(id), version_id INTEGER NOT NULL REFERENCES versions(id),
    logged_at TEXT NOT NULL, PRIMARY KEY (run_id, version_id));
INSERT INTO run_outputs (run_id, version_id, logged_at)
    SELECT run_id, id, created_at FROM versions WHERE run_id IS NOT NULL
    ON CONFLICT (run_id, version_id) DO NOTHING;
"""

# v3: experience payload sizes (gc and verify count payload blobs as references; NULL for
# rows written by v2, whose size is read from the blob), and indexes for walking lineage
# edges in both directions (focused lineage loads).
_SCHEMA_V3 = """
ALTER TABLE experiences ADD COLUMN payload_size INTEGER;
CREATE INDEX IF NOT EXISTS experiences_payload ON experiences (payload_digest);
CREATE INDEX IF NOT EXISTS run_outputs_version ON run_outputs (version_id);
CREATE INDEX IF NOT EXISTS run_inputs_version ON run_inputs (version_id);
CREATE INDEX IF NOT EXISTS artifact_parents_parent ON artifact_parents (parent_id);
"""

# v4: names live in a project (W&B's ``project/name:v3``): artifacts, versions and aliases are
# keyed by (project, name); versions are numbered from 1 (the seed's numbering: its example
# asks for ``dataset:v1``), so every existing number moves up by one; runs record their
# process's start time (a pid alone is reused) so a killed run can be told CRASHED; versions
# keep the file name they were logged from; each store gets an id (a store replaced under a
# live process is noticed).
_V4_TABLES = """
CREATE TABLE artifacts_v4 (
    project TEXT NOT NULL, name TEXT NOT NULL, type TEXT NOT NULL, created_at TEXT NOT NULL,
    PRIMARY KEY (project, name));
CREATE TABLE versions_v4 (
    id INTEGER PRIMARY KEY, project TEXT NOT NULL, name TEXT NOT NULL,
    version INTEGER NOT NULL, digest TEXT NOT NULL, size INTEGER NOT NULL,
    format TEXT NOT NULL, run_id TEXT REFERENCES runs(id), created_at TEXT NOT NULL,
    metadata TEXT NOT NULL, filename TEXT, UNIQUE (project, name, version),
    FOREIGN KEY (project, name) REFERENCES artifacts(project, name));
CREATE TABLE aliases_v4 (
    project TEXT NOT NULL, name TEXT NOT NULL, alias TEXT NOT NULL,
    version_id INTEGER NOT NULL REFERENCES versions(id), PRIMARY KEY (project, name, alias));
"""
_V4_FINISH = """
DROP TABLE aliases;
DROP TABLE versions;
DROP TABLE artifacts;
ALTER TABLE artifacts_v4 RENAME TO artifacts;
ALTER TABLE versions_v4 RENAME TO versions;
ALTER TABLE aliases_v4 RENAME TO aliases;
CREATE INDEX IF NOT EXISTS versions_digest ON versions (digest);
CREATE INDEX IF NOT EXISTS versions_name ON versions (name);
CREATE INDEX IF NOT EXISTS versions_run ON versions (run_id);
CREATE INDEX IF NOT EXISTS aliases_version ON aliases (version_id);
ALTER TABLE runs ADD COLUMN pid_started REAL;
ALTER TABLE runs ADD COLUMN process_ns TEXT;
"""


def _migrate_v4(conn: sqlite3.Connection) -> None:
    """Move every artifact into the project of the run that logged it, renumber from 1."""
    run_script(conn, _V4_TABLES)
    projects = {rid: _project_or_default(p)
                for rid, p in conn.execute("SELECT id, project FROM runs")}
    rows = conn.execute(
        "SELECT v.id, v.name, v.version, v.digest, v.size, v.format, v.run_id, v.created_at,"
        " v.metadata, a.type, a.created_at FROM versions v JOIN artifacts a ON a.name = v.name"
        " ORDER BY v.id").fetchall()
    for (vid, name, number, digest, size, fmt, run_id, created, meta, type_, a_created) in rows:
        project = projects.get(run_id, DEFAULT_PROJECT)
        conn.execute("INSERT INTO artifacts_v4 (project, name, type, created_at) VALUES"
                     " (?, ?, ?, ?) ON CONFLICT DO NOTHING", (project, name, type_, a_created))
        conn.execute(
            "INSERT INTO versions_v4 (id, project, name, version, digest, size, format, run_id,"
            " created_at, metadata, filename) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (vid, project, name, number + 1, digest, size, fmt, run_id, created, meta))
    conn.execute("INSERT INTO artifacts_v4 (project, name, type, created_at) SELECT ?, name,"
                 " type, created_at FROM artifacts WHERE name NOT IN (SELECT name FROM"
                 " artifacts_v4)", (DEFAULT_PROJECT,))
    # Aliases follow their version into its project; ``latest`` is recomputed per project
    # (a name that two projects shared had one ``latest`` for both).
    conn.execute(
        "INSERT INTO aliases_v4 (project, name, alias, version_id) SELECT v.project, v.name,"
        " a.alias, a.version_id FROM aliases a JOIN versions_v4 v ON v.id = a.version_id"
        " WHERE a.alias != 'latest'")
    conn.execute(
        "INSERT INTO aliases_v4 (project, name, alias, version_id) SELECT project, name,"
        " 'latest', id FROM versions_v4 v WHERE version = (SELECT MAX(version) FROM versions_v4"
        " w WHERE w.project = v.project AND w.name = v.name)")
    run_script(conn, _V4_FINISH)
    conn.execute("INSERT INTO store_meta (key, value) VALUES ('store_id', ?)"
                 " ON CONFLICT (key) DO NOTHING", (secrets.token_hex(8),))


def _project_or_default(project: object) -> str:
    try:
        return validate_project(project)
    except InvalidNameError:  # projects were free text before v4; keys need the name grammar
        return DEFAULT_PROJECT


# v5: runs can be resumed (``init_run(run_id=..., resume=...)``): each resume starts a new
# metrics *segment*, so points logged again at steps recorded before the interruption are kept
# (reads let the later segment win; W&B drops them: "step must only increase"). Versions can be
# *pruned* (a ModelCheckpoint top-k deletion mirrored into the store): the row stays for lineage,
# its aliases go, and gc may reclaim its blobs.
_SCHEMA_V5 = """
ALTER TABLE runs ADD COLUMN segment INTEGER NOT NULL DEFAULT 0;
ALTER TABLE metric_chunks ADD COLUMN segment INTEGER NOT NULL DEFAULT 0;
ALTER TABLE versions ADD COLUMN pruned_at TEXT;
"""

# v6: remotes (``repro remote add``) and what this store knows of each: the versions and runs
# it pushed or pulled (``number`` is the version's number on that remote), and the durable
# queue of background pushes (a crash leaves it for the next open or ``repro push``), and
# where each alias pointed when this store last agreed with the remote on it (so a push only
# sends alias moves made here, and a pull only applies moves made there).
# Keyed by the remote's URL, not its name: a name re-added for another URL starts afresh.
_SCHEMA_V6 = """
CREATE TABLE IF NOT EXISTS remotes (
    name TEXT PRIMARY KEY, url TEXT NOT NULL, added_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS remote_versions (
    url TEXT NOT NULL, version_id INTEGER NOT NULL, number INTEGER NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (url, version_id));
CREATE TABLE IF NOT EXISTS remote_runs (
    url TEXT NOT NULL, run_id TEXT NOT NULL, bundle TEXT NOT NULL, at TEXT NOT NULL,
    PRIMARY KEY (url, run_id));
CREATE TABLE IF NOT EXISTS remote_aliases (
    url TEXT NOT NULL, project TEXT NOT NULL, name TEXT NOT NULL, alias TEXT NOT NULL,
    uid TEXT NOT NULL, PRIMARY KEY (url, project, name, alias));
CREATE TABLE IF NOT EXISTS remote_queue (
    id INTEGER PRIMARY KEY, url TEXT NOT NULL, kind TEXT NOT NULL, ref TEXT NOT NULL,
    enqueued_at TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,
    UNIQUE (url, kind, ref));
"""

# v7: the first migration shared by both engines (a PostgreSQL registry starts at v6, see
# ``schema_pg.py``): indexes for reading one run's state history and TTRL updates, which
# scanned the whole table (slow at team scale: 100k runs in one registry).
_SCHEMA_V7 = """
CREATE INDEX IF NOT EXISTS run_states_run ON run_states (run_id);
CREATE INDEX IF NOT EXISTS online_updates_run ON online_updates (run_id, id);
"""

# v8: chunked content (``repro_core/chunks``). ``manifest`` names the blob listing a version's
# parts (per-tensor blobs of a safetensors file, content-defined chunks of another big file);
# NULL: the content is the one blob named by ``digest`` (every version written before v8).
_SCHEMA_V8 = """
ALTER TABLE versions ADD COLUMN manifest TEXT;
"""

_MIGRATIONS: dict[int, Migration] = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3,
                                     4: _migrate_v4, 5: _SCHEMA_V5, 6: _SCHEMA_V6,
                                     7: _SCHEMA_V7, 8: _SCHEMA_V8}


def run_script(conn: Any, script: str) -> None:
    """Run ``;``-separated DDL inside the caller's transaction (executescript would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def retry_busy(statement: Callable[[], object]) -> None:
    """Retry a statement SQLite refuses with SQLITE_BUSY without calling the busy handler.

    Switching a fresh database to WAL while another process holds its lock (two processes
    creating the same store) fails at once with "database is locked"; we wait like any other
    busy write, up to ``SQLITE_BUSY_TIMEOUT_MS``.
    """
    deadline = time.monotonic() + constants.SQLITE_BUSY_TIMEOUT_MS / 1000
    delay = 0.001
    while True:
        try:
            statement()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def migrations(current: int) -> Iterator[Callable[[Any], None]]:
    """The steps to run, in order, for a registry at schema ``current``."""
    for version in range(current + 1, SCHEMA_VERSION + 1):
        step = _MIGRATIONS[version]
        if isinstance(step, str):
            yield lambda conn, script=step: run_script(conn, script)  # type: ignore[misc]
        else:
            yield step
