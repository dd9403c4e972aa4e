"""The registry's SQL schema, one script per version, and SQLite helpers for opening it.

``migrations(current)`` yields the scripts that bring a registry at ``current`` (0 = new) up to
``SCHEMA_VERSION``; each runs inside the opener's ``BEGIN IMMEDIATE`` transaction, so a
migration either fully happens or not at all.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator

from . import constants

__all__ = ["SCHEMA_VERSION", "migrations", "retry_busy"]

SCHEMA_VERSION = 3

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

_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3}


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


def migrations(current: int) -> Iterator[str]:
    """The DDL scripts to run, in order, for a registry at schema ``current``."""
    for version in range(current + 1, SCHEMA_VERSION + 1):
        yield _MIGRATIONS[version]
