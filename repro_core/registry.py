"""The registry: runs, artifact versions, aliases and lineage edges in one SQLite file.

Why SQLite and how it is used:

- **WAL mode** lets readers run while a writer commits; on network filesystems (NFS, Lustre,
  GPFS, CIFS, FUSE) WAL's shared-memory index does not work, so we warn and use a rollback
  journal there.
- **One transaction per logical change**, opened with ``BEGIN IMMEDIATE``: the write lock is
  taken *before* reading the latest version number, so two processes can never both read
  ``v7`` and both write ``v8`` (a deferred transaction would read first and lose one).
- **Fork safety**: a connection must not cross ``fork()``; each call checks the PID and opens a
  fresh connection in a child (the parent's is abandoned, never closed, in the child).
- **Schema versioned** in ``schema_version`` so later releases can migrate in place.

Lineage edges: *produced-by* is ``versions.run_id``, *used-by* is ``run_inputs``, *parent-of*
is ``artifact_parents``. The SQL is kept portable (no SQLite-only syntax in queries) so the
registry can move to PostgreSQL.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import constants
from ._mounts import detect_network_fs
from ._records import NewVersion, RunRow, VersionRow, run_row, version_row
from ._registry_queries import _VERSION_COLUMNS, BulkQueries
from ._schema import SCHEMA_VERSION, migrations, retry_busy
from .errors import ArtifactNotFoundError, InvalidArgumentError, StorageError
from .types import ParsedKey, utc_now

__all__ = [
    "SCHEMA_VERSION", "NewVersion", "Registry", "RunRow", "VersionRow", "detect_network_fs",
]


def dumps(value: Any) -> str:
    """Canonical JSON for registry columns (sorted keys, never NaN)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


class Registry(BulkQueries):
    """SQLite-backed registry. Thread-safe; reopens itself after ``fork()``."""

    def __init__(self, path: str | Path, *, algorithm: str = "blake3") -> None:
        self.path = Path(path)
        self._algorithm = algorithm
        self._lock = threading.RLock()
        self._conn_obj: sqlite3.Connection | None = None
        self._pid = -1
        self._abandoned: list[sqlite3.Connection] = []

    # -- connection -------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._conn_obj is None or self._pid != os.getpid():
            if self._conn_obj is not None:
                # Inherited across fork: never use or close it here (SQLite forbids both).
                self._abandoned.append(self._conn_obj)
            self._conn_obj = self._open()
            self._pid = os.getpid()
        return self._conn_obj

    def _open(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path,
                timeout=constants.SQLITE_BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            conn.execute(f"PRAGMA busy_timeout = {constants.SQLITE_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA foreign_keys = ON")
            self._configure_journal(conn)
            self._migrate(conn)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open registry {self.path}: {exc}", path=self.path) from exc
        return conn

    def _configure_journal(self, conn: sqlite3.Connection) -> None:
        fstype = detect_network_fs(self.path.parent)
        if fstype:
            warnings.warn(
                f"repro store {self.path.parent} is on a network filesystem ({fstype}); SQLite "
                "WAL does not work there, so the registry uses a rollback journal. Concurrent "
                "writers from several machines are not safe: keep the store on a local disk "
                "and sync blobs to object storage instead.",
                RuntimeWarning,
                stacklevel=4,
            )
            conn.execute("PRAGMA journal_mode = DELETE")
        else:
            retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL"))
        sync = "FULL" if constants.REPRO_FSYNC == "full" else "OFF"
        conn.execute(f"PRAGMA synchronous = {sync}")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create a new registry at the current schema, or upgrade an older one in place."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            current = 0 if row is None else int(row[0])
            if current > SCHEMA_VERSION:
                raise StorageError(
                    f"registry {self.path} has schema v{current}, newer than this repro "
                    f"(v{SCHEMA_VERSION}); upgrade repro-lightning",
                    path=self.path,
                )
            for script in migrations(current):
                _run_script(conn, script)
            if current == 0:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                conn.execute(
                    "INSERT INTO store_meta (key, value) VALUES ('hash_algorithm', ?)",
                    (self._algorithm,),
                )
            elif current < SCHEMA_VERSION:
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            if self._conn_obj is not None and self._pid == os.getpid():
                self._conn_obj.close()
            self._conn_obj = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; rolls back on any exception."""
        with self._lock:
            conn = self._conn()
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield conn
                self._commit(conn)
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _commit(self, conn: sqlite3.Connection) -> None:
        """Separate so fault-injection tests can make a commit fail."""
        conn.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, _translated(self.path):
            return self._conn().execute(sql, params).fetchall()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            with self.transaction() as conn:
                yield conn
        except sqlite3.Error as exc:
            raise StorageError(f"registry write failed: {exc}", path=self.path) from exc

    # -- store metadata ---------------------------------------------------------------------

    def hash_algorithm(self) -> str:
        rows = self._read("SELECT value FROM store_meta WHERE key = 'hash_algorithm'")
        return rows[0][0] if rows else self._algorithm

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0][0])

    # -- runs -------------------------------------------------------------------------------

    def create_run(self, run: RunRow) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO runs (id, name, project, state, tags, config, created_at, ended_at,"
                " host, pid, world_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run.id, run.name, run.project, run.state, dumps(run.tags), dumps(run.config),
                 run.created_at, run.ended_at, run.host, run.pid, run.world_size),
            )
            conn.execute(
                "INSERT INTO run_states (run_id, state, at, reason) VALUES (?, ?, ?, NULL)",
                (run.id, run.state, run.created_at),
            )

    def set_run_state(self, run_id: str, state: str, *, reason: str | None = None,
                      ended: bool = False) -> None:
        now = utc_now()
        with self._write() as conn:
            conn.execute(
                "UPDATE runs SET state = ?, ended_at = CASE WHEN ? THEN ? ELSE ended_at END "
                "WHERE id = ?",
                (state, 1 if ended else 0, now, run_id),
            )
            conn.execute(
                "INSERT INTO run_states (run_id, state, at, reason) VALUES (?, ?, ?, ?)",
                (run_id, state, now, reason),
            )

    def get_run(self, run_id: str) -> RunRow:
        rows = self._read(
            "SELECT id, name, project, state, tags, config, created_at, ended_at, host, pid,"
            " world_size FROM runs WHERE id = ?",
            (run_id,),
        )
        if not rows:
            raise ArtifactNotFoundError(f"no run with id {run_id!r}", key=run_id)
        return run_row(rows[0])

    def list_runs(self) -> list[RunRow]:
        rows = self._read(
            "SELECT id, name, project, state, tags, config, created_at, ended_at, host, pid,"
            " world_size FROM runs ORDER BY created_at"
        )
        return [run_row(r) for r in rows]

    def run_state_history(self, run_id: str) -> list[tuple[str, str, str | None]]:
        return [
            (r[0], r[1], r[2])
            for r in self._read(
                "SELECT state, at, reason FROM run_states WHERE run_id = ? ORDER BY rowid",
                (run_id,),
            )
        ]

    # -- versions ---------------------------------------------------------------------------

    def add_version(self, new: NewVersion) -> tuple[VersionRow, bool]:
        """Insert a version (or return the latest when its content is identical).

        Returns ``(row, created)``. The version number is computed inside the write
        transaction, so concurrent writers on one store get consecutive, unique numbers.
        """
        with self._write() as conn:
            self._ensure_artifact(conn, new.name, new.type)
            latest = _fetch_version(conn, "a2.alias = 'latest'", (new.name,), join_alias=True)
            if latest is not None and latest.digest == new.digest:
                # Same content: no new version, but what this call adds is kept (aliases,
                # parent edges, the logging run); metadata stays that of the version.
                downstream_versions, downstream_runs = _downstream(conn, latest.id)
                looping = [p for p in new.parent_ids if p in downstream_versions]
                if looping:
                    keys = [r.key for p in looping
                            if (r := _fetch_version(conn, "v.id = ?", (p,))) is not None]
                    raise InvalidArgumentError(
                        f"{latest.key} already holds this content and {', '.join(keys)} "
                        "descend from it: making them its parents would make a lineage "
                        "cycle. Log the new content under another name, or drop those "
                        "parents", argument="parent_artifacts")
                self._set_aliases(conn, new.name, latest.id, new.aliases)
                _add_parents(conn, latest.id, new.parent_ids)
                if new.run_id not in downstream_runs:  # else: run → it → … → run, a cycle
                    _record_output(conn, new.run_id, latest.id)
                return latest, False
            number = conn.execute(
                "SELECT COALESCE(MAX(version) + 1, 0) FROM versions WHERE name = ?", (new.name,)
            ).fetchone()[0]
            cursor = conn.execute(
                "INSERT INTO versions (name, version, digest, size, format, run_id, created_at,"
                " metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (new.name, number, new.digest, new.size, new.format, new.run_id, utc_now(),
                 dumps(new.metadata)),
            )
            version_id = int(cursor.lastrowid or 0)
            conn.executemany(
                "INSERT INTO version_blobs (version_id, digest, size) VALUES (?, ?, ?)"
                " ON CONFLICT (version_id, digest) DO NOTHING",
                [(version_id, d, s) for d, s in new.blobs],
            )
            _add_parents(conn, version_id, new.parent_ids)
            self._set_aliases(conn, new.name, version_id, ["latest", *new.aliases])
            _record_output(conn, new.run_id, version_id)
            row = _fetch_version(conn, "v.id = ?", (version_id,))
        assert row is not None
        return row, True

    def _ensure_artifact(self, conn: sqlite3.Connection, name: str, type_: str) -> None:
        existing = conn.execute("SELECT type FROM artifacts WHERE name = ?", (name,)).fetchone()
        if existing is None:
            conn.execute(
                "INSERT INTO artifacts (name, type, created_at) VALUES (?, ?, ?)",
                (name, type_, utc_now()),
            )
        elif existing[0] != type_:
            raise InvalidArgumentError(
                f"artifact {name!r} has type {existing[0]!r}; it cannot take a {type_!r} "
                "version. Use another name, or log it with type="
                f"{existing[0]!r}",
                argument="type",
            )

    def _set_aliases(self, conn: sqlite3.Connection, name: str, version_id: int,
                     aliases: Sequence[str]) -> None:
        conn.executemany(
            "INSERT INTO aliases (name, alias, version_id) VALUES (?, ?, ?)"
            " ON CONFLICT (name, alias) DO UPDATE SET version_id = excluded.version_id",
            [(name, a, version_id) for a in aliases],
        )

    def resolve(self, key: ParsedKey) -> VersionRow:
        """Find the version a parsed key names, or raise ``ArtifactNotFoundError``."""
        with self._lock, _translated(self.path):
            conn = self._conn()
            if key.version is not None:
                row = _fetch_version(conn, "v.name = ? AND v.version = ?", (key.name, key.version))
            elif key.digest_prefix is not None:
                row = self._resolve_prefix(conn, key)
            else:
                row = _fetch_version(conn, "a2.alias = ?", (key.name, key.alias), join_alias=True)
        if row is None:
            raise ArtifactNotFoundError(self._not_found_message(key), key=_key_text(key))
        return row

    def _resolve_prefix(self, conn: sqlite3.Connection, key: ParsedKey) -> VersionRow | None:
        assert key.digest_prefix is not None
        pattern = key.digest_prefix.replace("%", "").replace("_", "") + "%"
        rows = conn.execute(
            f"SELECT {_VERSION_COLUMNS} FROM versions v JOIN artifacts a ON a.name = v.name"
            " WHERE v.name = ? AND v.digest LIKE ? ORDER BY v.version DESC",
            (key.name, pattern),
        ).fetchall()
        digests = {r[4] for r in rows}
        if len(digests) > 1:
            raise ArtifactNotFoundError(
                f"digest prefix {key.digest_prefix!r} is ambiguous for {key.name!r} "
                f"({len(digests)} matches); give more hex digits",
                key=_key_text(key),
            )
        return version_row(rows[0]) if rows else None

    def _not_found_message(self, key: ParsedKey) -> str:
        versions = self._read("SELECT version FROM versions WHERE name = ? ORDER BY version",
                              (key.name,))
        if not versions:
            return f"no artifact named {key.name!r} in {self.path.parent}"
        aliases = [r[0] for r in self._read(
            "SELECT alias FROM aliases WHERE name = ? ORDER BY alias", (key.name,))]
        return (
            f"{_key_text(key)!r} not found; {key.name!r} has versions "
            f"v0..v{versions[-1][0]} and aliases {', '.join(aliases)}"
        )

    def get_version(self, version_id: int) -> VersionRow:
        with self._lock, _translated(self.path):
            row = _fetch_version(self._conn(), "v.id = ?", (version_id,))
        if row is None:
            raise ArtifactNotFoundError(f"no version with id {version_id}", key=str(version_id))
        return row

    def list_versions(self, name: str | None = None) -> list[VersionRow]:
        where, params = ("WHERE v.name = ?", (name,)) if name else ("", ())
        rows = self._read(
            f"SELECT {_VERSION_COLUMNS} FROM versions v JOIN artifacts a ON a.name = v.name "
            f"{where} ORDER BY v.name, v.version",
            params,
        )
        return [version_row(r) for r in rows]

    def aliases_of(self, version_id: int) -> list[str]:
        return [r[0] for r in self._read(
            "SELECT alias FROM aliases WHERE version_id = ? ORDER BY alias", (version_id,))]

    def parents_of(self, version_id: int) -> list[VersionRow]:
        return self._related("SELECT parent_id FROM artifact_parents WHERE child_id = ?",
                             version_id)

    def children_of(self, version_id: int) -> list[VersionRow]:
        return self._related("SELECT child_id FROM artifact_parents WHERE parent_id = ?",
                             version_id)

    def _related(self, sql: str, version_id: int) -> list[VersionRow]:
        return [self.get_version(r[0]) for r in self._read(sql, (version_id,))]

    def consumers_of(self, version_id: int) -> list[str]:
        return [r[0] for r in self._read(
            "SELECT run_id FROM run_inputs WHERE version_id = ? ORDER BY used_at",
            (version_id,))]

    def inputs_of(self, run_id: str) -> list[VersionRow]:
        return [self.get_version(r[0]) for r in self._read(
            "SELECT version_id FROM run_inputs WHERE run_id = ? ORDER BY used_at", (run_id,))]

    def outputs_of(self, run_id: str) -> list[VersionRow]:
        """Versions the run logged, including ones that deduplicated to an existing version."""
        rows = self._read(
            f"SELECT {_VERSION_COLUMNS} FROM run_outputs o JOIN versions v ON v.id = o.version_id"
            " JOIN artifacts a ON a.name = v.name WHERE o.run_id = ? ORDER BY o.logged_at, v.id",
            (run_id,),
        )
        return [version_row(r) for r in rows]

    def record_use(self, run_id: str, version_id: int) -> None:
        with self._write() as conn:
            # A run reading back what it logged is not an input (that would be a cycle).
            conn.execute(
                "INSERT INTO run_inputs (run_id, version_id, used_at) SELECT ?, ?, ?"
                " WHERE NOT EXISTS (SELECT 1 FROM run_outputs WHERE run_id = ? AND"
                " version_id = ?) ON CONFLICT (run_id, version_id) DO NOTHING",
                (run_id, version_id, utc_now(), run_id, version_id),
            )

    def blobs_of(self, version_id: int) -> list[tuple[str, int]]:
        """The ``(digest, size)`` of every blob one version needs."""
        return [(r[0], int(r[1])) for r in self._read(
            "SELECT digest, size FROM version_blobs WHERE version_id = ?", (version_id,))]

    def blob_references(self) -> list[tuple[str, int | None]]:
        """Every ``(digest, size)`` the registry needs: version blobs (manifests and their
        files included) and TTRL experience payloads (size None if written before v3).
        gc keeps exactly these."""
        return [(r[0], None if r[1] is None else int(r[1])) for r in self._read(
            "SELECT digest, size FROM version_blobs UNION SELECT payload_digest, payload_size"
            " FROM experiences WHERE payload_digest IS NOT NULL ORDER BY 1")]


@contextmanager
def _translated(path: Path) -> Iterator[None]:
    """sqlite3 errors (locked past the busy timeout, I/O errors) become ``StorageError``."""
    try:
        yield
    except sqlite3.Error as exc:
        raise StorageError(f"registry query failed: {exc}", path=path) from exc


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run ``;``-separated DDL inside the caller's transaction (executescript would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _downstream(conn: sqlite3.Connection, version_id: int) -> tuple[set[int], set[str]]:
    """Every version and run reachable downstream of a version (itself included), through
    parent edges, runs that used it and what those runs logged."""
    rows = conn.execute(
        "WITH RECURSIVE down(kind, id) AS (SELECT 'v', ?"
        " UNION SELECT 'v', ap.child_id FROM artifact_parents ap JOIN down"
        " ON down.kind = 'v' AND ap.parent_id = down.id"
        " UNION SELECT 'r', ri.run_id FROM run_inputs ri JOIN down"
        " ON down.kind = 'v' AND ri.version_id = down.id"
        " UNION SELECT 'v', ro.version_id FROM run_outputs ro JOIN down"
        " ON down.kind = 'r' AND ro.run_id = down.id)"
        " SELECT kind, id FROM down",
        (version_id,),
    ).fetchall()
    return ({int(i) for k, i in rows if k == "v"}, {str(i) for k, i in rows if k == "r"})


def _add_parents(conn: sqlite3.Connection, child_id: int, parent_ids: Sequence[int]) -> None:
    conn.executemany(
        "INSERT INTO artifact_parents (child_id, parent_id) VALUES (?, ?)"
        " ON CONFLICT (child_id, parent_id) DO NOTHING",
        [(child_id, p) for p in parent_ids],
    )


def _record_output(conn: sqlite3.Connection, run_id: str | None, version_id: int) -> None:
    """Link the run to what it logged, unless it used that very version (no cycles)."""
    if run_id is None:
        return
    conn.execute(
        "INSERT INTO run_outputs (run_id, version_id, logged_at) SELECT ?, ?, ?"
        " WHERE NOT EXISTS (SELECT 1 FROM run_inputs WHERE run_id = ? AND version_id = ?)"
        " ON CONFLICT (run_id, version_id) DO NOTHING",
        (run_id, version_id, utc_now(), run_id, version_id),
    )


def _key_text(key: ParsedKey) -> str:
    if key.version is not None:
        return f"{key.name}:v{key.version}"
    if key.digest_prefix is not None:
        return f"{key.name}@{key.digest_prefix}"
    return f"{key.name}:{key.alias}"


def _fetch_version(conn: sqlite3.Connection, where: str, params: Sequence[Any],
                   *, join_alias: bool = False) -> VersionRow | None:
    if join_alias:
        sql = (f"SELECT {_VERSION_COLUMNS} FROM aliases a2 JOIN versions v ON v.id = a2.version_id"
               f" JOIN artifacts a ON a.name = v.name WHERE a2.name = ? AND {where}")
    else:
        sql = (f"SELECT {_VERSION_COLUMNS} FROM versions v JOIN artifacts a ON a.name = v.name"
               f" WHERE {where}")
    row = conn.execute(sql, params).fetchone()
    return version_row(row) if row else None
