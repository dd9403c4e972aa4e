"""High-rate metrics (and TTRL rows) written in batches by a background thread.

A training loop may log hundreds of thousands of scalars a second; one SQLite transaction per
call would cap that at a few thousand. ``log`` therefore validates and appends to per-metric
column arrays (``array('q')`` steps, ``array('d')`` values and times) under a lock; a daemon
thread with its own SQLite connection writes them at least every ``interval`` seconds (1 s),
at ``close()`` (finalize) and at interpreter exit, as one chunk row per metric name, so the
writer's work grows with the number of names, not points, and a ``kill -9`` loses at most the
last interval. Values are float64: NaN and ±inf are stored bit-exactly.

What may go wrong, and what happens then:

- **Bad input is refused at the call** (typed errors from :mod:`repro_core._metrics_rows`):
  everything in a call is checked before anything is buffered, so a rejected call leaves no
  trace and the rest of the run is unaffected.
- **A failed write keeps its data** and is retried with backoff (0.05 s, doubling to 5 s; a
  ``flush()`` retries at once). ``log`` warns once per failure episode; ``flush`` raises
  ``StorageError``. At ``close()`` the writer retries for ``CLOSE_RETRY_S`` seconds, then
  **spills** what is left to ``<root>/spill/`` and warns with the file names and counts; the
  next open imports them (:func:`import_spills`). Only if the spill fails too does ``close``
  raise, and then the data stays in memory: ``close()`` again (it also runs at exit) retries.
- **Memory is bounded (blocking backpressure).** At most ``max_pending_rows`` table rows, and
  ``max_pending_points`` metric points plus one call's, wait for the writer (the batch being
  written may hold as many again). A producer that reaches a bound waits until the writer has
  taken the batch; if the writer is failing, it gets ``StorageError`` at once instead (that
  call is not recorded) rather than blocking behind a full disk.
- **Transactions are bounded**: a batch is written in parts of at most ``max_txn_rows`` SQL
  rows, releasing SQLite's write lock between them (see :mod:`repro_core._metrics_batch`).
- **Distinct names are bounded**: a ``RuntimeWarning`` once a run passes ``warn_keys``
  (10,000) names, ``InvalidArgumentError`` beyond ``max_keys`` (1,000,000). Per-item names
  (``loss/sample_123``) belong in a step, or in a table artifact.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import threading
import time
import warnings
from array import array
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._metrics_batch import Batch, Columns, write_part
from ._metrics_rows import MAX_STEP, check_key, check_step, to_number, unpack
from ._metrics_spill import SpillReport, import_spills, write_spill
from .capture.scrub import scrub_text
from .errors import InvalidArgumentError, RunStateError, SerializationError, StorageError
from .registry import Registry

__all__ = ["MetricsWriter", "SpillReport", "import_spills", "read_metrics", "to_number"]

# Defaults of the constructor's bounds (module attributes, so tests can lower them).
EARLY_FLUSH_ROWS = 20_000  # rows that wake the writer before its interval
MAX_PENDING_ROWS = 100_000
MAX_PENDING_POINTS = 2_000_000  # 48 MB of column arrays
MAX_TXN_ROWS = 50_000
WARN_KEYS = 10_000
MAX_KEYS = 1_000_000
CLOSE_RETRY_S = 10.0  # how long close() retries a refusing registry before spilling
_RETRY_FIRST_S, _RETRY_MAX_S = 0.05, 5.0
_TXN_GAP_S = 0.02  # pause between the transactions of one batch: lets a waiting process in

# Writers with data still to write. Strong references: a writer whose close() failed (nothing
# written, nothing spilled) must survive until the exit hook retries it, even if nobody else
# holds it; a writer leaves this set only once everything it was given is durable.
_LIVE: set[MetricsWriter] = set()


def _backoff(failures: int) -> float:
    return float(min(_RETRY_FIRST_S * 2 ** min(failures - 1, 16), _RETRY_MAX_S))


class MetricsWriter:
    """Buffers metric points and TTRL rows for one run; one background thread writes them."""

    def __init__(self, registry_path: Path, run_id: str, *, interval: float = 1.0,
                 max_pending_rows: int | None = None, max_pending_points: int | None = None,
                 max_txn_rows: int | None = None, warn_keys: int | None = None,
                 max_keys: int | None = None, segment: int = 0, next_step: int = 0) -> None:
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) \
                or not math.isfinite(interval) or interval <= 0:
            raise InvalidArgumentError(f"interval must be a positive number of seconds, got "
                                       f"{interval!r}", argument="interval")
        # never creates a registry: a store deleted under the run is a failed write (kept,
        # retried, spilled), not a fresh empty registry that swallows the rows
        self._registry = Registry(registry_path, create=False)
        self._root = Path(registry_path).parent
        self._pid = os.getpid()  # a forked child must not flush the parent's buffer
        self._run_id = run_id
        self._interval = float(interval)
        self._max_rows = _positive("max_pending_rows", max_pending_rows, MAX_PENDING_ROWS)
        self._max_points = _positive("max_pending_points", max_pending_points,
                                     MAX_PENDING_POINTS)
        self._txn_rows = _positive("max_txn_rows", max_txn_rows, MAX_TXN_ROWS)
        self._warn_keys = _positive("warn_keys", warn_keys, WARN_KEYS)
        self._max_keys = _positive("max_keys", max_keys, MAX_KEYS)
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)  # room for producers; finished flushes
        self._columns: dict[str, Columns] = {}
        self._tables: dict[str, list[tuple[Any, ...]]] = {}
        self._pending_rows = self._pending_points = 0
        self._wake_rows = min(EARLY_FLUSH_ROWS, self._max_rows)
        self._wake_points = max(self._max_points // 2, 1)
        self._keys: set[str] = set()  # every name admitted: validated once, counted
        self._renamed: dict[str, str] = {}  # names with a credential in them -> scrubbed
        self._segment = segment  # a resumed run writes a new segment (reads: the later wins)
        self._step = next_step - 1
        self._hold = False  # producers take the slow path (_gate): closed, failing or full
        self._error: BaseException | None = None
        self._episode = self._warned_episode = 0  # failure episodes, and the last one warned
        self._warned_keys = self._closed = False
        self._requested = self._completed = 0  # flushes asked for / done by the writer
        self._series: dict[str, int] = {}  # name -> metric_series id (writer thread only)
        self._spill = SpillReport()
        self._spill_seq = 0
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = self._start(self._loop)
        _LIVE.add(self)

    def _start(self, target: Any) -> threading.Thread:
        thread = threading.Thread(target=target, name=f"repro-metrics-{self._run_id}",
                                  daemon=True)
        thread.start()
        return thread

    # -- producer side (hot path) -------------------------------------------------------------

    def log(self, metrics: Mapping[str, Any], step: int | None = None, *,
            advance: bool = True) -> int:
        """Validate and buffer one step of scalars; return the step used.

        ``advance=False`` (with an explicit step) leaves the run's step counter alone: for
        side series such as hardware samples, whose index is not a training step.
        """
        if not isinstance(metrics, Mapping):
            raise SerializationError(
                f"metrics must be a dict of name -> number, got {type(metrics).__name__}",
                path="metrics")
        known, new, values = self._keys, [], []
        for key, value in metrics.items():
            if key not in known:
                new.append(check_key(key))
            values.append((key, to_number(key, value)))
        if step is not None:
            check_step(step)
        now = time.time()
        with self._lock:
            self._enter(new)
            if self._renamed:  # a name that carried a credential is stored scrubbed
                values = [(self._renamed.get(k, k), v) for k, v in values]
            used = self._next_step(step) if advance or step is None else step
            self._put(values, used, now)
        return used

    def record(self, numbers: Mapping[str, float], table: str | None = None,
               row: tuple[Any, ...] | None = None) -> int:
        """One step of ``numbers`` plus, optionally, one ``row`` for ``table``, in one lock
        hold; returns the step. For callers inside repro (TTRL) whose values are floats and
        whose row was checked for its table (see ``_metrics_rows.ROW_TABLES``)."""
        new = None if self._keys.issuperset(numbers) else [
            check_key(k) for k in numbers if k not in self._keys]
        now = time.time()
        with self._lock:
            self._enter(new)
            step = self._next_step(None)
            if row is not None:
                assert table is not None
                self._put_row(table, row)
            self._put(numbers.items(), step, now)
        return step

    def pending(self) -> tuple[int, int]:
        """``(rows, points)`` buffered and not yet taken by the writer."""
        with self._lock:
            return self._pending_rows, self._pending_points

    def _next_step(self, step: int | None) -> int:
        if step is None:
            if self._step >= MAX_STEP:
                raise InvalidArgumentError("the run's step counter reached 2**63 - 1; pass "
                                           "explicit steps", argument="step")
            self._step += 1
            return self._step
        self._step = max(self._step, step)
        return step

    def _put(self, values: Iterable[tuple[str, float]], step: int, now: float) -> None:
        columns, count = self._columns, 0
        for key, value in values:
            col = columns.get(key)
            if col is None:
                col = columns[key] = (array("q"), array("d"), array("d"))
            col[0].append(step)
            col[1].append(value)
            col[2].append(now)
            count += 1
        self._pending_points += count
        if self._pending_points >= self._wake_points:  # take it before producers must wait
            self._wake.set()
            if self._pending_points >= self._max_points:
                self._hold = True

    def _put_row(self, table: str, row: tuple[Any, ...]) -> None:
        rows = self._tables.get(table)
        if rows is None:
            rows = self._tables[table] = []
        rows.append(row)
        self._pending_rows += 1
        if self._pending_rows >= self._wake_rows:  # write in the background now
            self._wake.set()
            self._wake_rows = min(self._pending_rows + EARLY_FLUSH_ROWS, self._max_rows)
            if self._pending_rows >= self._max_rows:
                self._hold = True

    def _gate(self) -> None:
        """The slow path before buffering (lock held): refuse a closed writer, wait for room
        (blocking backpressure), warn once about a failing writer."""
        while True:
            if self._stop.is_set():
                raise RunStateError(
                    f"the metrics writer of run {self._run_id} is closed (the run was "
                    "finalized); nothing more can be logged to it")
            if self._pending_rows < self._max_rows and self._pending_points < self._max_points:
                break
            if self._error is not None or not self._thread.is_alive():
                raise StorageError(
                    f"metrics of run {self._run_id} are not being written ({self._error}); "
                    f"{self._pending_rows} rows and {self._pending_points} points are waiting "
                    "in memory (kept, retried, spilled at finalize). This call was not "
                    "recorded") from self._error
            self._wake.set()
            self._cv.wait(1.0)
        if self._error is not None and self._warned_episode != self._episode:
            self._warned_episode = self._episode
            warnings.warn(f"writing metrics of run {self._run_id} failed ({self._error}); the "
                          "data is kept in memory and retried", RuntimeWarning, stacklevel=4)
        self._hold = self._error is not None

    def _enter(self, new: list[str] | None) -> None:
        """With the lock held, before buffering: wait while the buffer is full (backpressure)
        and count names seen for the first time against the caps."""
        if self._hold:
            self._gate()
        if new:
            self._admit(new)

    def _admit(self, names: list[str]) -> None:
        """Count new metric names against the caps (lock held; before anything is buffered)."""
        fresh = [n for n in dict.fromkeys(names) if n not in self._keys]
        total = len(self._keys) + len(fresh)
        if total > self._max_keys:
            raise InvalidArgumentError(
                f"run {self._run_id} would have {total:,} distinct metric names, more than "
                f"the cap of {self._max_keys:,}; nothing from this call was logged. Put "
                "per-item ids in the step or log a table artifact instead of one name each",
                argument="metrics")
        self._keys.update(fresh)
        for name in fresh:  # names reach the store too: scrubbed like every other string
            clean = scrub_text(name)
            if clean != name:
                self._renamed[name] = clean
        if total > self._warn_keys and not self._warned_keys:
            self._warned_keys = True
            warnings.warn(f"run {self._run_id} has logged more than {self._warn_keys:,} "
                          f"distinct metric names (refused beyond {self._max_keys:,}); is an "
                          "id part of the name?", RuntimeWarning, stacklevel=4)

    # -- writer side ---------------------------------------------------------------------------
    # Only the writer thread ever writes. A caller that wants its data on disk (get_metrics,
    # finalize) asks and waits; a signal in the caller (Ctrl-C, SIGTERM) can interrupt that
    # wait, but never an insert half-way, so rows are neither lost nor written twice.

    def flush(self) -> None:
        """Have the writer write everything buffered so far; wait until it has tried.
        ``StorageError`` if that failed (the data is kept and retried)."""
        with self._lock:
            self._requested += 1
            target = self._requested
        self._wake.set()
        with self._lock:
            while self._completed < target and self._thread.is_alive():
                self._cv.wait(0.5)
        self._raise_error()

    def close(self) -> SpillReport:
        """Write everything (finalize and interpreter exit call this) and stop the thread.

        Retries a refusing registry for ``CLOSE_RETRY_S`` seconds, then spills the rest to
        ``<root>/spill/`` (returned, and warned about: the next open imports it). Raises
        ``StorageError`` only if even the spill failed; the data then stays in memory and
        another ``close()`` (also run at exit) tries again.
        """
        if self._pid != os.getpid():  # inherited through fork(): the parent owns the data
            return SpillReport()
        with self._lock:
            self._stop.set()
            self._hold = True
            self._cv.notify_all()  # producers waiting for room see the stop
        self._wake.set()
        if not self._thread.is_alive() and self._has_pending():  # an earlier close() gave up
            self._thread = self._start(self._final_drain)
        self._thread.join()
        if self._has_pending():
            raise StorageError(
                f"metrics of run {self._run_id} could be neither written nor spilled "
                f"({self._error}); {self._pending_rows} rows and {self._pending_points} points "
                "are still in memory: free space and call close() again (it is retried at "
                "exit)") from self._error
        if not self._closed:
            self._closed = True
            self._registry.close()
            _LIVE.discard(self)
            if self._spill:
                warnings.warn(_spill_message(self._run_id, self._error, self._spill),
                              RuntimeWarning, stacklevel=2)
        return self._spill

    def _has_pending(self) -> bool:
        with self._lock:
            return bool(self._pending_rows or self._pending_points)

    def _loop(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                self._wake.wait(self._interval if failures == 0 else _backoff(failures))
                self._wake.clear()
                if self._stop.is_set():
                    break
                with self._lock:
                    target = self._requested
                failures = 0 if self._write_pending() else failures + 1
                self._complete(target)
        finally:
            self._final_drain()

    def _final_drain(self) -> None:
        """Write what is left, retrying until ``CLOSE_RETRY_S``; then spill; give up (data
        kept in memory) after twice that."""
        start, failures, retry_s = time.monotonic(), 0, CLOSE_RETRY_S
        try:
            while not self._write_pending():
                failures += 1
                waited = time.monotonic() - start
                if waited >= retry_s and self._spill_pending():
                    return
                if waited >= 2 * retry_s:
                    return
                time.sleep(_backoff(failures))
        finally:
            self._complete(self._requested)

    def _complete(self, target: int) -> None:
        with self._lock:
            self._completed = max(self._completed, target)
            self._cv.notify_all()

    def _take(self) -> Batch:
        """Take everything buffered (the producers get the room at once)."""
        with self._lock:
            batch = Batch(self._columns, self._tables)
            self._columns, self._tables = {}, {}
            self._pending_rows = self._pending_points = 0
            self._wake_rows = min(EARLY_FLUSH_ROWS, self._max_rows)
            self._hold = self._stop.is_set() or self._error is not None
            self._cv.notify_all()
        return batch

    def _write_pending(self) -> bool:
        """Write everything buffered, one bounded transaction per part; False if a part
        failed (it and the later parts are back in the buffer)."""
        batch = self._take()
        parts = list(batch.parts(self._txn_rows, self._series)) if batch else []
        for index, part in enumerate(parts):
            if index:
                time.sleep(_TXN_GAP_S)
            try:
                with self._registry.transaction(exclusive=False) as conn:
                    write_part(conn, self._run_id, part, self._series,
                               segment=self._segment)
            except Exception as exc:  # keep the data; retry later, report on the next call
                self._series.clear()  # ids cached inside the rolled-back transaction are void
                self._requeue(parts[index:], exc)
                return False
        with self._lock:
            self._error = None
            self._hold = self._stop.is_set() or self._pending_rows >= self._max_rows \
                or self._pending_points >= self._max_points
        return True

    def _requeue(self, parts: Sequence[Batch], exc: BaseException) -> None:
        """Put unwritten parts back in front of whatever was logged meanwhile."""
        older = Batch()
        for part in parts:
            older.extend(part)
        with self._lock:
            older.extend(Batch(self._columns, self._tables))
            self._columns, self._tables = older.columns, older.rows
            self._pending_rows, self._pending_points = older.row_count, older.points
            if self._error is None:
                self._episode += 1
            self._error = exc
            self._hold = True
            self._cv.notify_all()

    def _spill_pending(self) -> bool:
        """Write everything buffered to spill files; False if one could not be written."""
        parts = list(self._take().parts(self._txn_rows))
        for index, part in enumerate(parts):
            try:
                path = write_spill(self._root, self._run_id, part, self._spill_seq,
                                   segment=self._segment)
            except Exception as exc:
                self._requeue(parts[index:], exc)
                return False
            self._spill_seq += 1
            self._spill = SpillReport((*self._spill.files, path),
                                      self._spill.points + part.points,
                                      self._spill.rows + part.row_count)
        return True

    def _raise_error(self) -> None:
        error = self._error
        if error is not None:
            raise StorageError(f"writing metrics of run {self._run_id} failed (rows kept, "
                               f"will retry; spilled at finalize if it still fails): {error}"
                               ) from error


def _positive(name: str, value: int | None, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}",
                                   argument=name)
    return value


def _spill_message(run_id: str, error: BaseException | None, spill: SpillReport) -> str:
    names = ", ".join(p.name for p in spill.files)
    folder = spill.files[0].parent if spill.files else "spill/"
    return (f"the registry refused the last metrics of run {run_id} at finalize ({error}); "
            f"{spill.points} points and {spill.rows} rows were saved to {len(spill.files)} "
            f"spill file(s) in {folder} ({names}) and are imported when the store is next "
            "opened (repro_core.metrics.import_spills)")


def read_metrics(registry: Registry, run_id: str, keys: Sequence[str] | None = None, *,
                 segment: int | None = None) -> dict[str, list[tuple[int, float, float]]]:
    """``{key: [(step, value, unix_time), …]}`` in logging order.

    A resumed run logs in segments (0, then one more per resume). By default the later segment
    wins: once segment *s* logged a name from step *k* on, the earlier segments' points of that
    name at steps ≥ *k* are hidden (they belong to the stretch the resume replayed, as
    TensorBoard's purge on restart hides them). ``segment=n`` returns that segment's points
    alone, so the earlier history stays queryable.
    """
    if keys is not None and (isinstance(keys, str) or not all(isinstance(k, str)
                                                               for k in keys)):
        raise InvalidArgumentError(f"keys must be a list of metric names, got {keys!r}",
                                   argument="keys")
    if segment is not None and (not isinstance(segment, int) or isinstance(segment, bool)
                                or segment < 0):
        raise InvalidArgumentError(f"segment must be a segment number ≥ 0, got {segment!r}",
                                   argument="segment")
    sql = ("SELECT s.key, c.segment, c.steps, c.vals, c.times FROM metric_chunks c JOIN"
           " metric_series s ON s.id = c.series_id WHERE s.run_id = ?")
    params: list[Any] = [run_id]
    if keys is not None:
        sql += f" AND s.key IN ({', '.join('?' * len(keys))})"
        params.extend(keys)
    if segment is not None:
        sql += " AND c.segment = ?"
        params.append(segment)
    by_key: dict[str, list[tuple[int, list[tuple[int, float, float]]]]] = {}
    for key, seg, steps, vals, times in registry._read(
            sql + " ORDER BY c.series_id, c.segment, c.id", params):
        points = list(zip(unpack("q", steps), unpack("d", vals), unpack("d", times),
                          strict=True))
        segments = by_key.setdefault(key, [])
        if segments and segments[-1][0] == seg:
            segments[-1][1].extend(points)
        else:
            segments.append((seg, points))
    return {key: _later_segment_wins(segments) for key, segments in by_key.items()}


def _later_segment_wins(segments: list[tuple[int, list[tuple[int, float, float]]]]
                        ) -> list[tuple[int, float, float]]:
    """Merge one name's segments (ascending): each later segment hides what the earlier
    ones logged at or after its first step."""
    merged: list[tuple[int, float, float]] = []
    for _, points in segments:
        if points and merged:
            start = min(p[0] for p in points)
            merged = [p for p in merged if p[0] < start]
        merged.extend(points)
    return merged


@atexit.register
def _flush_all_at_exit() -> None:
    for writer in list(_LIVE):
        if writer._pid != os.getpid():
            continue  # inherited through fork(): the parent owns (and will flush) it
        # Nothing sensible can be done about a failure at exit; never mask the exit itself.
        with contextlib.suppress(Exception):
            writer.close()
