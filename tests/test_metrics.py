"""The metrics store: batching writer, exact values (NaN/inf), steps, durability at exit/kill,
validation at the call, bounded transactions, bounded memory (backpressure), name caps.

Spill files and retries at finalize are in ``test_metrics_spill.py``.
"""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from repro_core import ArtifactManager, RunStateError, SerializationError, StorageError
from repro_core.errors import InvalidArgumentError


def test_values_round_trip_exactly(manager: ArtifactManager, run: object) -> None:
    manager.log_metrics({"nan": float("nan"), "inf": float("inf"), "ninf": -math.inf,
                         "np": np.float32(2.5), "np0d": np.array(4.0), "t0d": torch.tensor(3.0),
                         "t1": torch.tensor([7]), "bool": True, "int": 5})
    got = manager.get_metrics()
    assert math.isnan(got["nan"][0][1])
    assert got["inf"][0][1] == math.inf and got["ninf"][0][1] == -math.inf
    assert [got[k][0][1] for k in ("np", "np0d", "t0d", "t1", "bool", "int")] == [
        2.5, 4.0, 3.0, 7.0, 1.0, 5.0]


def test_steps_count_up_unless_given(manager: ArtifactManager, run: object) -> None:
    assert [manager.log_metrics({"a": i}) for i in range(3)] == [0, 1, 2]
    assert manager.log_metrics({"a": 10}, step=10) == 10
    assert manager.log_metrics({"a": 11}) == 11  # continues after the explicit step
    assert manager.log_metrics({"b": 0}, step=4) == 4  # explicit steps may go back
    got = manager.get_metrics(keys=["a"])
    assert list(got) == ["a"] and [s for s, _, _ in got["a"]] == [0, 1, 2, 10, 11]


@pytest.mark.parametrize(
    ("metrics", "match"),
    [({"loss": "0.1"}, "'loss' is a builtins.str"), ({"t": torch.ones(3)}, "'t'"),
     ({"x": None}, "'x'"), ({"": 1.0}, "non-empty"), ({3: 1.0}, "non-empty"),
     ([("a", 1.0)], "dict"), ({"loss\udc80": 1.0}, "valid UTF-8"),
     ({"a\x00b": 1.0}, "printable"), ({"a\x1b]0;x": 1.0}, "printable"),
     ({"k" * 257: 1.0}, "256 characters"), ({"big": 10**400}, "'big'")],
)
def test_bad_values_name_the_key(manager: ArtifactManager, run: object, metrics: object,
                                 match: str) -> None:
    with pytest.raises(SerializationError, match=match) as info:
        manager.log_metrics(metrics)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError)
    assert manager.log_metrics({"ok": 1.0}) == 0  # a rejected call consumed no step


def test_bad_step_and_no_run(manager: ArtifactManager) -> None:
    with pytest.raises(RunStateError):
        manager.log_metrics({"a": 1})
    manager.init_run("r")
    for step in (-1, 1.5, "3", True, 2**63, 2**64):
        with pytest.raises(InvalidArgumentError):
            manager.log_metrics({"a": 1}, step=step)  # type: ignore[arg-type]


def test_finalize_flushes_and_other_runs_are_separate(manager: ArtifactManager) -> None:
    first = manager.init_run("one")
    for i in range(1000):
        manager.log_metrics({"x": i})
    manager.finalize_run()
    manager.init_run("two")
    manager.log_metrics({"x": -1})
    assert first.id is not None
    assert len(manager.get_metrics(first.id)["x"]) == 1000
    assert [v for _, v, _ in manager.get_metrics()["x"]] == [-1.0]


def test_write_failure_keeps_rows_and_reports(manager: ArtifactManager, run: object,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from repro_core.registry import Registry

    manager.log_metrics({"a": 1.0})
    original = Registry._commit
    monkeypatch.setattr(Registry, "_commit", lambda self, conn: (_ for _ in ()).throw(
        sqlite3.OperationalError("disk I/O error")))
    from repro_core import StorageError

    with pytest.raises(StorageError, match="rows kept"):
        manager.get_metrics()
    monkeypatch.setattr(Registry, "_commit", original)
    assert [v for _, v, _ in manager.get_metrics()["a"]] == [1.0]


def test_a_lone_surrogate_name_is_refused_and_the_run_goes_on(manager: ArtifactManager,
                                                               run: object) -> None:
    """Accepted before, it failed every later flush: 2,000 of 4,000 valid points were lost."""
    manager.log_metrics({"a": -1.0})
    with pytest.raises(SerializationError, match="valid UTF-8") as info:
        manager.log_metrics({"b": 0.0, "loss\udc80": 1.0})  # nothing of this call is kept
    assert isinstance(info.value, TypeError) and "\\udc80" in str(info.value)
    for i in range(2000):
        manager.log_metrics({"a": float(i)})
    got = manager.get_metrics()  # the flush succeeds
    assert sorted(got) == ["a"] and len(got["a"]) == 2001
    assert [s for s, _, _ in got["a"]] == list(range(2001))  # the refused call took no step


def test_steps_must_fit_int64_and_a_refused_step_changes_nothing(manager: ArtifactManager,
                                                                 run: object) -> None:
    """step=2**63 raised OverflowError after moving the step counter: every later call failed."""
    with pytest.raises(InvalidArgumentError, match=r"2\*\*63"):
        manager.log_metrics({"a": 1.0}, step=2**63)
    assert manager.log_metrics({"a": 2.0}) == 0
    assert manager.log_metrics({"a": 3.0}, step=2**63 - 1) == 2**63 - 1
    with pytest.raises(InvalidArgumentError, match="counter"):
        manager.log_metrics({"a": 4.0})  # the next automatic step would not fit
    assert manager.log_metrics({"a": 5.0}, step=7) == 7
    got = manager.get_metrics()["a"]
    assert [(s, v) for s, v, _ in got] == [(0, 2.0), (2**63 - 1, 3.0), (7, 5.0)]


def _writer(manager: ArtifactManager, run: Any, **kwargs: Any) -> Any:
    from repro_core.metrics import MetricsWriter

    kwargs.setdefault("interval", 3600.0)  # writes only when asked (or at a bound)
    return MetricsWriter(manager.root / "registry.sqlite", run.id, **kwargs)


def _update_row(run_id: str, i: int) -> tuple[Any, ...]:
    return (run_id, f"{run_id}-u{i}", f"e{i}", 1.0, 0.5, None, None, "{}", float(i))


def _update_count(manager: ArtifactManager, run_id: str) -> int:
    return int(manager.registry()._read(
        "SELECT COUNT(*) FROM online_updates WHERE run_id = ?", (run_id,))[0][0])


def test_distinct_names_warn_once_then_are_refused_at_the_cap(manager: ArtifactManager,
                                                              run: Any) -> None:
    from repro_core import metrics as metrics_module
    from repro_core.metrics import read_metrics

    assert (metrics_module.WARN_KEYS, metrics_module.MAX_KEYS) == (10_000, 1_000_000)
    writer = _writer(manager, run, warn_keys=10, max_keys=20)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            writer.log({f"k{i}": 1.0 for i in range(10)})
        with pytest.warns(RuntimeWarning, match="more than 10 distinct"):
            writer.log({"k10": 1.0})
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per run
            writer.log({f"k{i}": 1.0 for i in range(11, 20)})
        with pytest.raises(InvalidArgumentError, match="cap of 20"):
            writer.log({"k0": 3.0, "k20": 3.0})  # refused whole: k0 is not logged either
        writer.log({"k0": 4.0})
    finally:
        writer.close()
    got = read_metrics(manager.registry(), run.id)
    assert len(got) == 20 and [v for _, v, _ in got["k0"]] == [1.0, 4.0]


def test_a_big_flush_is_written_in_bounded_transactions(manager: ArtifactManager, run: Any,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One flush of 4M names held the write lock for 143 s and another process's init_run
    failed with "database is locked"; every transaction now inserts at most max_txn_rows."""
    from repro_core.metrics import read_metrics

    writer = _writer(manager, run, max_txn_rows=1000)
    totals: list[int] = []
    commit = writer._registry._commit

    def changes(conn: Any) -> int:
        """Rows inserted so far (the writer only inserts, into these three tables)."""
        if conn.dialect == "sqlite":
            return int(conn.total_changes)  # rows inserted on this connection so far
        # PostgreSQL has no such counter (pg_stat_xact_* lags behind): count the rows, in the
        # transaction about to commit (the test's schema holds nothing else).
        return int(conn.execute(
            "SELECT (SELECT COUNT(*) FROM metric_series) + (SELECT COUNT(*) FROM metric_chunks)"
            " + (SELECT COUNT(*) FROM online_updates)").fetchone()[0])

    def counting(conn: Any) -> None:
        totals.append(changes(conn))
        commit(conn)

    monkeypatch.setattr(writer._registry, "_commit", counting)
    writer.log({"warm-up": 0.0})
    writer.flush()
    start = totals[-1]
    totals.clear()
    writer.log({f"m{i}": float(i) for i in range(3000)})  # 3,000 new names: 6,000 SQL rows
    for i in range(2500):
        writer.record({}, "online_updates", _update_row(run.id, i))
    writer.close()
    per_transaction = [b - a for a, b in zip([start, *totals], totals, strict=False)]
    assert sum(per_transaction) == 3000 * 2 + 2500
    assert max(per_transaction) <= 1000 and len(per_transaction) >= 9
    assert len(read_metrics(manager.registry(), run.id)) == 3001
    assert _update_count(manager, run.id) == 2500


@pytest.mark.parametrize("kind", ["rows", "points"])
def test_a_slow_writer_makes_producers_wait_at_the_bound(manager: ArtifactManager, run: Any,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         kind: str) -> None:
    """Behind a stalled writer (a busy 2-core machine) the buffer used to grow without bound."""
    bound = {"max_pending_rows" if kind == "rows" else "max_pending_points": 500}
    writer = _writer(manager, run, **bound)
    index = 0 if kind == "rows" else 1  # in writer.pending()
    stalled, release = threading.Event(), threading.Event()
    commit = writer._registry._commit

    def slow(conn: sqlite3.Connection) -> None:
        stalled.set()
        assert release.wait(60)
        commit(conn)

    monkeypatch.setattr(writer._registry, "_commit", slow)
    peak, done = [0], threading.Event()

    def produce() -> None:
        for i in range(3000):
            if kind == "rows":
                writer.record({"r": 1.0}, "online_updates", _update_row(run.id, i))
            else:
                writer.log({"a": float(i), "b": float(i)})
            peak[0] = max(peak[0], writer.pending()[index])
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        assert stalled.wait(60)  # the writer took a first batch and is stuck on it
        deadline = time.monotonic() + 60
        while writer.pending()[index] < 500:  # the producer fills the buffer to the bound ...
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert not done.is_set() and writer.pending()[index] == 500  # ... and waits there
    finally:
        release.set()
        producer.join(120)
    assert done.is_set() and peak[0] <= 500
    writer.close()
    if kind == "rows":
        assert _update_count(manager, run.id) == 3000
    else:
        from repro_core.metrics import read_metrics

        got = read_metrics(manager.registry(), run.id)
        assert [v for _, v, _ in got["b"]] == [float(i) for i in range(3000)]


def test_a_full_buffer_behind_a_failing_writer_raises_instead_of_blocking(
        manager: ArtifactManager, run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = _writer(manager, run, max_pending_rows=100)
    commit = writer._registry._commit

    def full(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(writer._registry, "_commit", full)
    recorded = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "failed; kept and retried"
        with pytest.raises(StorageError, match="not recorded"):
            for i in range(100_000):
                writer.record({"r": float(i)}, "online_updates", _update_row(run.id, i))
                recorded += 1
    assert 100 <= recorded < 100_000
    monkeypatch.setattr(writer._registry, "_commit", commit)  # space freed
    writer.close()
    assert _update_count(manager, run.id) == recorded  # every accepted row, no other


_LOOP = textwrap.dedent("""
    import sys, time
    from repro_core import ArtifactManager
    m = ArtifactManager(); run = m.init_run("loop", root=sys.argv[1])
    print(run.id, flush=True)
    n = int(sys.argv[2])
    for i in range(n):
        m.log_metrics({"loss": float(i)})
        if i % 20000 == 0:
            print(i, flush=True)
    # no finalize_run(): the interpreter's exit must flush
""")


def _count(root: Path, run_id: str) -> tuple[int, int]:
    from repro_core.registry import Registry

    registry = Registry(root / "registry.sqlite", readonly=True)  # or REPRO_REGISTRY's server
    try:
        count, top = registry._read(
            "SELECT COALESCE(SUM(count), 0), COALESCE(MAX(last_step), -1) FROM metric_chunks c"
            " JOIN metric_series s ON s.id = c.series_id WHERE s.run_id = ?",
            (run_id,))[0]
    finally:
        registry.close()
    return int(count), int(top)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_million_rows_all_durable_after_exit(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _LOOP, str(tmp_path / "s"), "1000000"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert _count(tmp_path / "s", out[0]) == (1_000_000, 999_999)


# README: "flushed every second, at finalize and at exit; a kill -9 loses at most the last
# second". The manager's writer uses MetricsWriter's default interval (manager.py,
# ``metrics_writer``); the promise is pinned here, so changing the default fails a test.
PROMISED_INTERVAL_S = 1.0
# The write itself, the reader's polling (50 ms) and a busy 2-core CI machine (the logging
# loop and this poller compete with the writer thread); still short of what a 2.5 s interval
# would show (up to 2.5 s behind).
LAG_MARGIN_S = 1.0

_TIMED_LOOP = textwrap.dedent("""
    import sys, time
    from repro_core import ArtifactManager
    m = ArtifactManager(); run = m.init_run("timed", root=sys.argv[1])
    print(run.id, flush=True)
    step = 0
    while True:  # a training loop: each value is the wall-clock time it was logged at
        m.log_metrics({"logged_at": time.time()}, step=step)
        step += 1
        time.sleep(0.002)
""")


def _durable(root: Path, run_id: str) -> tuple[float, int, int]:
    """(newest durable ``logged_at``, durable points, last durable step); 0.0 if none yet."""
    from repro_core.metrics import read_metrics
    from repro_core.registry import Registry

    registry = Registry(root / "registry.sqlite", readonly=True)
    try:
        points = read_metrics(registry, run_id, keys=["logged_at"]).get("logged_at", [])
    finally:
        registry.close()
    return (max((v for _, v, _ in points), default=0.0), len(points),
            max((s for s, _, _ in points), default=-1))


def test_the_manager_flushes_at_the_promised_interval() -> None:
    import inspect

    from repro_core.metrics import MetricsWriter

    default = inspect.signature(MetricsWriter).parameters["interval"].default
    assert default == PROMISED_INTERVAL_S


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_loses_at_most_the_last_interval(tmp_path: Path) -> None:
    """While a loop logs, what is durable is never more than the interval (+ margin) behind
    what was logged; after SIGKILL the loss window is the same, and a gap-free prefix of the
    steps survived (batches commit whole and in order)."""
    import signal

    root = tmp_path / "s"
    bound = PROMISED_INTERVAL_S + LAG_MARGIN_S
    proc = subprocess.Popen([sys.executable, "-c", _TIMED_LOOP, str(root)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        run_id = proc.stdout.readline().strip()
        deadline = time.monotonic() + 60
        while _durable(root, run_id)[0] == 0.0:  # the first flush
            assert time.monotonic() < deadline and proc.poll() is None, "nothing flushed"
            time.sleep(0.05)
        lags: list[float] = []
        watch_until = time.monotonic() + 4 * PROMISED_INTERVAL_S + 1  # several flush cycles
        while time.monotonic() < watch_until:
            lags.append(time.time() - _durable(root, run_id)[0])
            time.sleep(0.05)
        killed_at = time.time()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(60)
    newest, count, top = _durable(root, run_id)
    lost_window = killed_at - newest
    print(f"durable lag: max {max(lags):.2f} s over {len(lags)} polls; "
          f"lost at the kill: last {lost_window:.2f} s ({count} points durable)")
    assert max(lags) <= bound, f"durable data lagged {max(lags):.2f} s (> {bound} s)"
    assert lost_window <= bound, f"the kill lost the last {lost_window:.2f} s (> {bound} s)"
    assert count == top + 1 > 0
