"""High-rate metrics (and other small records) written in batches by a background thread.

A training loop may log hundreds of thousands of scalars a second; one SQLite transaction per
call would cap that at a few thousand. ``log`` therefore only validates and appends to
per-metric column arrays (``array('q')`` steps, ``array('d')`` values and times) under a lock;
a daemon thread with its own SQLite connection writes them at least every ``interval`` seconds
(1 s), at ``close()`` (finalize) and at interpreter exit, as one chunk row per metric — the
writer's work grows with the number of metric *names*, not points, so it keeps up with any
logging rate and a ``kill -9`` loses at most the last interval. A failed write keeps the data
for the next try and surfaces the error on the next ``log``/``flush`` — never dropped silently.

Values are float64, so NaN and ±inf are stored bit-exactly (no JSON, no NULL mapping).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sqlite3
import sys
import threading
import time
import weakref
from array import array
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError, RunStateError, SerializationError, StorageError
from .registry import Registry

__all__ = ["MetricsWriter", "read_metrics"]

_Columns = tuple["array[int]", "array[float]", "array[float]"]
_LIVE: weakref.WeakSet[MetricsWriter] = weakref.WeakSet()
# Rows (not metric points: those cost the writer O(keys)) that wake the writer before its
# interval, so a fast producer's backlog is written alongside it instead of at finalize.
_EARLY_FLUSH_ROWS = 20_000


class MetricsWriter:
    """Buffers metric rows (and rows for other append-only tables) for one run."""

    def __init__(self, registry_path: Path, run_id: str, *, interval: float = 1.0) -> None:
        self._registry = Registry(registry_path)
        self._pid = os.getpid()  # a forked child must not flush the parent's buffer
        self._run_id = run_id
        self._interval = interval
        self._lock = threading.Lock()
        self._cond = threading.Condition()
        self._requested = 0  # flushes asked for
        self._completed = 0  # flushes the writer thread has done
        self._columns_by_key: dict[str, _Columns] = {}
        self._pending_points = 0
        self._tables: dict[str, list[tuple[Any, ...]]] = {}
        self._columns: dict[str, Sequence[str]] = {}
        self._series: dict[str, int] = {}
        self._step = -1
        self._error: BaseException | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"repro-metrics-{run_id}",
                                        daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # -- producer side (hot path) -------------------------------------------------------------

    def log(self, metrics: Mapping[str, Any], step: int | None = None, *,
            advance: bool = True) -> int:
        """Validate and buffer one step of scalars; return the step used.

        ``advance=False`` (with an explicit step) leaves the run's step counter alone: for
        side series such as hardware samples, whose index is not a training step.
        """
        self._raise_pending()
        if not isinstance(metrics, Mapping):
            raise SerializationError(
                f"metrics must be a dict of name -> number, got {type(metrics).__name__}",
                path="metrics",
            )
        values = [(_check_key(k), to_number(k, v)) for k, v in metrics.items()]
        return self._buffer(values, step, advance)

    def log_numbers(self, values: Mapping[str, float]) -> int:
        """``log`` for callers inside repro whose keys and floats are already valid (TTRL's
        fixed ``online/*`` names): the same buffering without per-call validation."""
        self._raise_pending()
        return self._buffer(values.items(), None, True)

    def _buffer(self, values: Any, step: int | None, advance: bool) -> int:
        now = time.time()
        with self._lock:
            used = self._next_step(step) if advance or step is None else _check_step(step)
            columns = self._columns_by_key
            for key, value in values:
                col = columns.get(key)
                if col is None:
                    col = columns[key] = (array("q"), array("d"), array("d"))
                col[0].append(used)
                col[1].append(value)
                col[2].append(now)
            self._pending_points += len(values)
        return used

    def _next_step(self, step: int | None) -> int:
        if step is None:
            self._step += 1
            return self._step
        self._step = max(self._step, _check_step(step))
        return step

    def append(self, table: str, columns: Sequence[str], row: tuple[Any, ...]) -> None:
        """Buffer one row for an append-only table (experiences, online updates)."""
        self._raise_pending()
        with self._lock:
            self._columns.setdefault(table, tuple(columns))
            rows = self._tables.setdefault(table, [])
            rows.append(row)
            if len(rows) % _EARLY_FLUSH_ROWS == 0:
                self._wake.set()  # write in the background now rather than all at finalize

    # -- writer side ---------------------------------------------------------------------------
    # Only the writer thread ever writes. A caller that wants its data on disk (get_metrics,
    # finalize) asks and waits; a signal in the caller (Ctrl-C, SIGTERM) can interrupt that
    # wait, but never an insert half-way, so rows are neither lost nor written twice.

    def flush(self) -> None:
        """Have the writer thread write everything buffered so far; wait until it has."""
        if self._thread.is_alive():
            with self._cond:
                self._requested += 1
                target = self._requested
            self._wake.set()
            with self._cond:
                while self._completed < target and self._thread.is_alive():
                    self._cond.wait(0.5)
        self._raise_error()

    def close(self) -> None:
        """Stop the thread after a last write (finalize and interpreter exit call this)."""
        if not self._stop.is_set():
            self._stop.set()
            self._wake.set()
        if self._thread.is_alive():
            self._thread.join()
        try:
            self._raise_error()
        finally:
            self._registry.close()
            _LIVE.discard(self)

    def _loop(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            with self._cond:
                target = self._requested
            stopping = self._stop.is_set()
            self._write_batch()
            with self._cond:
                self._completed = max(self._completed, target)
                self._cond.notify_all()
            if stopping:
                self._write_batch()  # anything appended while the last batch was written
                return

    def _write_batch(self) -> int:
        with self._lock:
            columns, self._columns_by_key = self._columns_by_key, {}
            tables, self._tables = self._tables, {}
            points, self._pending_points = self._pending_points, 0
        if not columns and not tables:
            return 0
        try:
            self._insert(columns, tables)
        except Exception as exc:  # keep the data; report on the next call
            self._series.clear()  # ids cached inside the rolled-back transaction are void
            self._requeue(columns, tables, points)
            self._error = exc
            return 0
        self._error = None
        return points + sum(len(r) for r in tables.values())

    def _insert(self, columns: dict[str, _Columns],
                tables: dict[str, list[tuple[Any, ...]]]) -> None:
        with self._registry.transaction() as conn:
            ids = self._series_ids(conn, set(columns))
            conn.executemany(
                "INSERT INTO metric_chunks (series_id, count, first_step, last_step, steps,"
                " vals, times) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(ids[key], len(steps), min(steps), max(steps), _pack(steps), _pack(vals),
                  _pack(times)) for key, (steps, vals, times) in columns.items()],
            )
            for table, rows in tables.items():
                insert_rows(conn, table, self._columns[table], rows)

    def _requeue(self, columns: dict[str, _Columns],
                 tables: dict[str, list[tuple[Any, ...]]], points: int) -> None:
        """Put unwritten data back in front of whatever was logged meanwhile."""
        with self._lock:
            for key, (steps, vals, times) in columns.items():
                newer = self._columns_by_key.get(key)
                if newer is not None:
                    steps.extend(newer[0])
                    vals.extend(newer[1])
                    times.extend(newer[2])
                self._columns_by_key[key] = (steps, vals, times)
            for table, rows in tables.items():
                self._tables[table] = rows + self._tables.get(table, [])
            self._pending_points += points

    def _series_ids(self, conn: Any, keys: set[str]) -> dict[str, int]:
        missing = [k for k in keys if k not in self._series]
        if missing:
            conn.executemany(
                "INSERT INTO metric_series (run_id, key) VALUES (?, ?)"
                " ON CONFLICT (run_id, key) DO NOTHING",
                [(self._run_id, k) for k in missing],
            )
            for key in missing:
                self._series[key] = conn.execute(
                    "SELECT id FROM metric_series WHERE run_id = ? AND key = ?",
                    (self._run_id, key),
                ).fetchone()[0]
        return self._series

    def _raise_pending(self) -> None:
        """Before buffering: refuse a closed writer, report an earlier write failure."""
        if self._stop.is_set():
            raise RunStateError(
                f"the metrics writer of run {self._run_id} is closed (the run was finalized); "
                "nothing more can be logged to it")
        self._raise_error()

    def _raise_error(self) -> None:
        error = self._error
        if error is not None:
            raise StorageError(f"writing metrics failed (rows kept, will retry): {error}"
                               ) from error


def insert_rows(conn: sqlite3.Connection, table: str, columns: Sequence[str],
                rows: list[tuple[Any, ...]]) -> None:
    """Insert many rows in ONE statement (``json_each`` over a JSON array of the rows).

    ``executemany`` re-acquires the GIL after every row, and while the training loop keeps
    the GIL busy each re-acquisition waits a switch interval: 200,000 rows took over two
    minutes next to a busy thread, versus 0.45 s here, where the whole insert runs inside
    SQLite with the GIL released. ``executemany`` remains the fallback for rows JSON cannot
    carry faithfully (NaN, ±inf, NUL characters) and for SQLite builds without JSON1.
    """
    global _json1
    names, marks = ", ".join(columns), ", ".join("?" * len(columns))
    try:
        text: str | None = json.dumps(rows, allow_nan=False)  # one C call
    except ValueError:  # NaN or ±inf: JSON cannot carry them
        text = None
    if _json1 and text is not None and "\\u0000" not in text:  # NUL would cut a string
        extract = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(columns)))
        try:
            conn.execute(f"INSERT INTO {table} ({names}) SELECT {extract} FROM json_each(?)",
                         (text,))
            return
        except sqlite3.OperationalError as exc:
            if "no such function" not in str(exc):
                raise
            _json1 = False  # this SQLite has no JSON1: remember, and fall back
    conn.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)


_json1 = True


def to_number(key: str, value: Any) -> float:
    """A metric value as float; a clear TypeError naming ``key`` otherwise."""
    kind = type(value)
    if kind is float:
        return value  # type: ignore[no-any-return]
    if kind is int or kind is bool:
        return float(value)
    module = kind.__module__.split(".", 1)[0]
    scalar_array = module == "numpy" and getattr(value, "ndim", 1) == 0
    if scalar_array or (module == "torch" and _numel(value) == 1):
        return to_number(key, value.item())
    if isinstance(value, (int, float)):  # int/float subclasses (IntEnum, numpy float64)
        return float(value)
    raise SerializationError(
        f"metric {key!r} is a {kind.__module__}.{kind.__qualname__}, not a number; log "
        "scalars only (use log_artifact for tensors, text or tables)",
        path=key,
    )


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidArgumentError(f"step must be a non-negative int, got {step!r}",
                                   argument="step")
    return step


def _numel(value: Any) -> int:
    try:
        return int(value.numel())
    except (AttributeError, TypeError):
        return -1


def _check_key(key: object) -> str:
    if not isinstance(key, str) or not key or "\x00" in key or len(key) > 256:
        raise SerializationError(f"metric name must be a non-empty str, got {key!r}",
                                 path=str(key))
    return key


def read_metrics(registry: Registry, run_id: str, keys: Sequence[str] | None = None
                 ) -> dict[str, list[tuple[int, float, float]]]:
    """``{key: [(step, value, unix_time), …]}`` in logging order."""
    if keys is not None and (isinstance(keys, str) or not all(isinstance(k, str)
                                                               for k in keys)):
        raise InvalidArgumentError(f"keys must be a list of metric names, got {keys!r}",
                                   argument="keys")
    sql = ("SELECT s.key, c.steps, c.vals, c.times FROM metric_chunks c JOIN metric_series s"
           " ON s.id = c.series_id WHERE s.run_id = ?")
    params: list[Any] = [run_id]
    if keys is not None:
        sql += f" AND s.key IN ({', '.join('?' * len(keys))})"
        params.extend(keys)
    out: dict[str, list[tuple[int, float, float]]] = {}
    for key, steps, vals, times in registry._read(sql + " ORDER BY c.series_id, c.id", params):
        out.setdefault(key, []).extend(zip(_unpack("q", steps), _unpack("d", vals),
                                           _unpack("d", times), strict=True))
    return out


def _pack(values: array[Any]) -> bytes:
    """Little-endian bytes whatever the machine (the store may move between machines)."""
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array(values.typecode, values)
    swapped.byteswap()
    return swapped.tobytes()


def _unpack(typecode: str, data: bytes) -> array[Any]:
    values = array(typecode)
    values.frombytes(data)
    if sys.byteorder != "little":
        values.byteswap()
    return values


@atexit.register
def _flush_all_at_exit() -> None:
    for writer in list(_LIVE):
        if writer._pid != os.getpid():
            continue  # inherited through fork(): the parent owns (and will flush) it
        # Nothing sensible can be done about a failure at exit; never mask the exit itself.
        with contextlib.suppress(Exception):
            writer.close()
