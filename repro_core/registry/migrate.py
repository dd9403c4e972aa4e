"""``repro migrate``: copy a store's registry between SQLite and PostgreSQL, verified.

The copy keeps every row and every id (versions are referenced by id from aliases, lineage
edges, TTRL updates and remote state), a run's state history in its order, metric chunks
byte for byte. It runs with the source's write lock held — no writer can add a row that the
copy would miss — and refuses while a run is still RUNNING (its process holds the old
registry open and would go on writing there). After the copy every table is compared row for
row (in key order, NaN equal to NaN, bytes to bytes); only then is the store switched:

- to PostgreSQL: ``registry.url`` is written (without the password) and ``registry.sqlite``
  moved aside to ``registry.sqlite.migrated-<UTC time>`` (kept, never deleted);
- back to SQLite: a new ``registry.sqlite`` is written and ``registry.url`` removed; the
  PostgreSQL database is left as it was (other hosts may still use it).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._metrics_rows import real
from ..errors import IntegrityError, InvalidArgumentError, RunStateError, StorageError
from .dialect import DB_ERRORS, is_postgres_url, redact_url
from .target import CONFIG_NAME, write_config

__all__ = ["TABLES", "MigrateReport", "migrate"]

# Every table, parents before children (foreign keys), with the columns that order its rows.
TABLES: tuple[tuple[str, str], ...] = (
    ("store_meta", "key"), ("runs", "id"), ("run_states", "rowid"), ("artifacts", "project, name"),
    ("versions", "id"), ("aliases", "project, name, alias"),
    ("version_blobs", "version_id, digest"), ("artifact_parents", "child_id, parent_id"),
    ("run_inputs", "run_id, version_id"), ("run_outputs", "run_id, version_id"),
    ("metric_series", "id"), ("metric_chunks", "id"), ("experiences", "id"),
    ("online_updates", "id"), ("remotes", "name"), ("remote_versions", "url, version_id"),
    ("remote_runs", "url, run_id"), ("remote_aliases", "url, project, name, alias"),
    ("remote_queue", "id"),
)
_IDENTITY = ("versions", "metric_series", "metric_chunks", "experiences", "online_updates",
             "remote_queue")
_BATCH = 5000


@dataclass
class MigrateReport:
    """What was copied (rows per table) and where the store's registry now is."""

    source: str
    destination: str
    rows: dict[str, int] = field(default_factory=dict)
    moved_aside: str | None = None
    seconds: float = 0.0


def _columns(conn: Any, table: str) -> dict[str, bool]:
    """A table's columns in order, each with whether it holds text (for the sort order)."""
    if conn.dialect == "postgresql":
        rows = conn.execute("SELECT column_name, data_type = 'text' FROM"
                            " information_schema.columns WHERE table_schema ="
                            " current_schema() AND table_name = ? ORDER BY ordinal_position",
                            (table,)).fetchall()
    else:
        rows = [(r[1], str(r[2]).upper() == "TEXT")
                for r in conn.execute(f"PRAGMA table_info({table})").fetchall()]
    return {str(name): bool(text) for name, text in rows if name != "rowid"}


def _shared_columns(src: Any, dst: Any, table: str) -> tuple[list[str], dict[str, bool]]:
    """The columns to copy: the destination's (made by this package's own DDL, so trusted),
    which the source must have exactly — a source's schema is store input, and its column
    names are never put into SQL unless they are known ones."""
    wanted, found = _columns(dst, table), _columns(src, table)
    if set(found) != set(wanted):
        raise IntegrityError(f"the source registry's table {table} has columns "
                             f"{sorted(found)!r:.300}, not this repro's {sorted(wanted)!r}; "
                             "nothing was copied")
    return list(wanted), wanted


def _order(conn: Any, order: str, text: dict[str, bool]) -> str:
    """``order`` with text keys in byte order on PostgreSQL (``COLLATE "C"``), as SQLite
    sorts them: a server's locale collation would pair different rows in the check."""
    if conn.dialect != "postgresql":
        return order
    return ", ".join(f'{c} COLLATE "C"' if text.get(c) else c
                     for c in (part.strip() for part in order.split(",")))


def _rows(conn: Any, table: str, columns: list[str], order: str,
          text: dict[str, bool]) -> Iterator[list[tuple[Any, ...]]]:
    """A table's rows in key order, a batch at a time (a server-side cursor on PostgreSQL:
    a big metrics table is never held in memory at once)."""
    sql = f"SELECT {', '.join(columns)} FROM {table} ORDER BY {_order(conn, order, text)}"
    if conn.dialect == "postgresql":
        with conn.raw.cursor(name=f"migrate_{table}") as cursor:
            cursor.itersize = _BATCH
            cursor.execute(sql)
            while batch := cursor.fetchmany(_BATCH):
                yield [tuple(r) for r in batch]
        return
    cursor = conn.execute(sql)
    while batch := cursor.fetchmany(_BATCH):
        yield [tuple(r) for r in batch]


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        x, y = _plain(x), _plain(y)
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            continue
        if x != y:
            return False
    return True


def _plain(value: Any) -> Any:
    """One form for a value either engine may return: bytes, and NaN/±inf as floats (SQLite
    keeps them as the text ``real()`` writes)."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return value


def _for_sqlite(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """NaN/±inf floats as ``real()`` writes them (SQLite would store a NaN as NULL)."""
    return [tuple(real(v) if isinstance(v, float) else v for v in row) for row in rows]


def _copy(src: Any, dst: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for table, order in TABLES:
        columns, text = _shared_columns(src, dst, table)
        if table == "store_meta":  # the new registry wrote its own: the source's win
            dst.execute("DELETE FROM store_meta")
        counts[table] = 0
        for batch in _rows(src, table, columns, order, text):
            if dst.dialect == "sqlite":
                batch = _for_sqlite(batch)
            dst.copy_rows(table, tuple(columns), batch)
            counts[table] += len(batch)
    if dst.dialect == "postgresql":
        for table in _IDENTITY:  # explicit ids were inserted: new ones continue after them
            dst.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                        f" COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)")
    return counts


def _verify(src: Any, dst: Any) -> None:
    end = object()
    for table, order in TABLES:
        columns, text = _shared_columns(src, dst, table)
        pairs = itertools.zip_longest(_flat(_rows(src, table, columns, order, text)),
                                      _flat(_rows(dst, table, columns, order, text)),
                                      fillvalue=end)
        for index, (a, b) in enumerate(pairs):
            if a is end or b is end:
                raise IntegrityError(f"migration check failed: {table} has a different number "
                                     "of rows after the copy; the store was not switched")
            if not _same(a, b):  # type: ignore[arg-type]
                raise IntegrityError(f"migration check failed: {table} row {index} differs "
                                     f"({a!r:.200} vs {b!r:.200}); the store was not switched")


def _flat(batches: Iterator[list[tuple]]) -> Iterator[tuple]:
    for batch in batches:
        yield from batch


def _lock_source(conn: Any) -> None:
    """Hold the source's write lock for the whole copy (writers wait, none is missed). On
    PostgreSQL the lock is taken first, as a session lock (it conflicts with the writers'
    transaction locks on the same key), and only then the snapshot: a snapshot taken while
    waiting for the lock would miss what the last writer committed."""
    if conn.dialect == "postgresql":
        conn.execute("SELECT pg_advisory_lock(?, ?)", _key(conn, "write"))
        conn.execute("SELECT pg_advisory_lock(?, ?)", _key(conn, "append"))  # appenders too
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    else:
        conn.execute("BEGIN IMMEDIATE")


def _unlock_source(conn: Any) -> None:
    with contextlib.suppress(*DB_ERRORS):
        if conn.in_transaction:
            conn.execute("ROLLBACK")  # nothing was written through it
    if conn.dialect == "postgresql":
        with contextlib.suppress(*DB_ERRORS):
            conn.execute("SELECT pg_advisory_unlock_all()")


def _key(conn: Any, purpose: str) -> tuple[int, int]:
    from .pg_connect import LOCK_CLASS, lock_key

    schema = conn.execute("SELECT current_schema()").fetchone()[0]
    return LOCK_CLASS, lock_key(schema, purpose)


def _refuse_running(conn: Any, root: Path) -> None:
    """Checked under the lock: a run starting meanwhile could write where the copy misses."""
    running = [r[0] for r in conn.execute(
        "SELECT id FROM runs WHERE state = 'running' ORDER BY id").fetchall()]
    if running:
        raise RunStateError(f"run(s) {', '.join(running[:5])} are still running on {root}: "
                            "finish them before moving the registry")


def migrate(root: str | Path, to: str) -> MigrateReport:
    """Copy the registry of the store at ``root`` to ``to`` (a ``postgresql://`` URL, or
    ``sqlite``), verify it row for row, then switch the store to it."""
    from . import Registry

    start = time.monotonic()
    root = Path(root).expanduser().absolute()
    target_sqlite = to.strip().lower() == "sqlite"
    if not target_sqlite and not is_postgres_url(to):
        raise InvalidArgumentError(f"--to must be a postgresql:// URL or 'sqlite', got "
                                   f"{redact_url(to)!r}", argument="to")
    source = Registry(root / "registry.sqlite", create=False, follow_env=False)
    try:
        if target_sqlite and source.engine == "sqlite":
            raise InvalidArgumentError(f"the store {root} already uses SQLite", argument="to")
        if not target_sqlite and source.engine == "postgresql":
            raise InvalidArgumentError(f"the store {root} already uses PostgreSQL "
                                       f"({source.location})", argument="to")
        source.mark_crashed_runs()  # a dead process's run does not count as running
        return _migrate(root, source, to, target_sqlite, start)
    except DB_ERRORS as exc:
        raise StorageError(f"migrating the registry failed: {exc}", path=root) from exc
    finally:
        source.close()


def _migrate(root: Path, source: Any, to: str, target_sqlite: bool,
             start: float) -> MigrateReport:
    from . import Registry

    algorithm = source.hash_algorithm()
    if target_sqlite:
        building = root / f".registry.sqlite.migrating-{os.getpid()}"
        building.unlink(missing_ok=True)
        dest = Registry(building, algorithm=algorithm, create=True)
    else:
        dest = Registry(to, root=root, algorithm=algorithm, create=True)
        if dest.engine != "postgresql" or dest._read("SELECT COUNT(*) FROM runs")[0][0] \
                or dest._read("SELECT COUNT(*) FROM versions")[0][0]:
            dest.close()
            raise StorageError(f"the registry {redact_url(to)} already holds runs or "
                               "versions: migrate into an empty database (or schema)")
    report = MigrateReport(source=source.location, destination=dest.location)
    try:
        with source._reading() as src:
            try:
                _lock_source(src)
                _refuse_running(src, root)
                with dest.transaction() as dst:
                    report.rows = _copy(src, dst)
                with dest.snapshot() as dst:
                    _verify(src, dst)
                dest.close()  # a SQLite file is complete (WAL checkpointed) once closed
                report.moved_aside = _switch(root, to, target_sqlite, building
                                             if target_sqlite else None)
            finally:
                _unlock_source(src)
    except BaseException:
        dest.close()
        if target_sqlite:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{building}{suffix}").unlink(missing_ok=True)
        raise
    if target_sqlite:
        report.destination = str(root / "registry.sqlite")
    report.seconds = time.monotonic() - start
    return report


def _switch(root: Path, to: str, target_sqlite: bool, building: Path | None) -> str | None:
    """Point the store at its new registry (the old one is kept, never deleted)."""
    if target_sqlite:
        assert building is not None
        os.replace(building, root / "registry.sqlite")
        (root / CONFIG_NAME).unlink(missing_ok=True)
        return None
    write_config(root, to)  # first: from here on the store opens PostgreSQL (a crash next
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())  # leaves the old file unused)
    aside = root / f"registry.sqlite.migrated-{stamp}"
    for suffix in ("", "-wal", "-shm"):
        old = root / f"registry.sqlite{suffix}"
        if old.exists():
            os.replace(old, root / f"{aside.name}{suffix}")
    return str(aside)
