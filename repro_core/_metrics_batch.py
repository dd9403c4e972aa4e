"""A batch of buffered metric points and table rows, written in bounded transactions.

A flush used to be one transaction however big: 4M distinct metric names held SQLite's write
lock for 143 s, and another process's ``init_run`` failed with "database is locked" once its
busy timeout ran out. A batch is now cut into parts of at most ``limit`` inserted SQL rows, one
transaction each, so the lock is released between parts (the writer also pauses there, so a
process waiting in SQLite's busy handler gets its turn). The spill files of
:mod:`repro_core._metrics_spill` hold one part each, so that importing one is one transaction.
"""

from __future__ import annotations

from array import array
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._metrics_rows import insert_rows, pack
from .registry.dialect import DBConnection

__all__ = ["Batch", "Columns", "write_part"]

# Per metric name: int64 steps, float64 values, float64 unix times, in logging order.
Columns = tuple["array[int]", "array[float]", "array[float]"]


@dataclass
class Batch:
    """Metric columns by name and rows by table (one of ``ROW_TABLES``), in logging order."""

    columns: dict[str, Columns] = field(default_factory=dict)
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.columns) or any(self.rows.values())

    @property
    def points(self) -> int:
        return sum(len(steps) for steps, _, _ in self.columns.values())

    @property
    def row_count(self) -> int:
        return sum(len(rows) for rows in self.rows.values())

    def parts(self, limit: int, known: Container[str] = ()) -> Iterator[Batch]:
        """Cut into parts of at most ``limit`` SQL rows each (a chunk row per metric name, plus
        a series row for a name not in ``known``, plus one per table row), order kept."""
        part, cost = Batch(), 0
        for key, col in self.columns.items():
            price = 1 if key in known else 2
            if cost + price > limit and part:
                yield part
                part, cost = Batch(), 0
            part.columns[key] = col
            cost += price
        for table, rows in self.rows.items():
            start = 0
            while start < len(rows):
                if cost >= limit:
                    yield part
                    part, cost = Batch(), 0
                taken = rows[start:start + limit - cost]
                part.rows.setdefault(table, []).extend(taken)
                cost += len(taken)
                start += len(taken)
        if part:
            yield part

    def extend(self, newer: Batch) -> None:
        """Append what was logged after this batch (a failed write re-queues its unwritten
        parts in front of what arrived meanwhile, so order is kept)."""
        for key, (steps, vals, times) in newer.columns.items():
            mine = self.columns.get(key)
            if mine is None:
                self.columns[key] = (steps, vals, times)
            else:
                mine[0].extend(steps)
                mine[1].extend(vals)
                mine[2].extend(times)
        for table, rows in newer.rows.items():
            self.rows.setdefault(table, []).extend(rows)


_CHUNK_COLUMNS = ("series_id", "count", "first_step", "last_step", "steps", "vals", "times",
                  "segment")
_CHUNK_TYPES = ("int8", "int8", "int8", "int8", "bytea", "bytea", "bytea", "int8")


def write_part(conn: DBConnection, run_id: str, part: Batch,
               series: dict[str, int], *, segment: int = 0) -> None:
    """Insert one part inside the caller's transaction. ``series`` caches name -> series id
    and gains the names created here: the caller must clear it if the transaction fails.
    ``segment``: which stretch of a resumed run logged the points."""
    if part.columns:
        _series_ids(conn, run_id, part.columns, series)
        chunks = [(series[key], len(steps), min(steps), max(steps), pack(steps), pack(vals),
                   pack(times), segment) for key, (steps, vals, times) in part.columns.items()]
        if getattr(conn, "dialect", "sqlite") == "postgresql":
            conn.copy_rows("metric_chunks", _CHUNK_COLUMNS, chunks, _CHUNK_TYPES)
        else:
            conn.executemany(f"INSERT INTO metric_chunks ({', '.join(_CHUNK_COLUMNS)}) VALUES"
                             " (?, ?, ?, ?, ?, ?, ?, ?)", chunks)
    for table, rows in part.rows.items():
        if rows:
            insert_rows(conn, table, rows)


def _series_ids(conn: DBConnection, run_id: str, keys: Iterable[str],
                series: dict[str, int]) -> None:
    missing = [k for k in keys if k not in series]
    if not missing:
        return
    conn.executemany(
        "INSERT INTO metric_series (run_id, key) VALUES (?, ?) ON CONFLICT (run_id, key)"
        " DO NOTHING", [(run_id, k) for k in missing])
    for key in missing:
        series[key] = conn.execute("SELECT id FROM metric_series WHERE run_id = ? AND key = ?",
                                   (run_id, key)).fetchone()[0]
