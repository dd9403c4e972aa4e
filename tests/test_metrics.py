"""The metrics store: batching writer, exact values (NaN/inf), steps, durability at exit/kill."""

from __future__ import annotations

import math
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.kill_loop import kill_after

from repro_core import ArtifactManager, RunStateError, SerializationError
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
     ([("a", 1.0)], "dict")],
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
    for step in (-1, 1.5, "3", True):
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
    conn = sqlite3.connect(root / "registry.sqlite")
    try:
        count, top = conn.execute(
            "SELECT COALESCE(SUM(count), 0), COALESCE(MAX(last_step), -1) FROM metric_chunks c"
            " JOIN metric_series s ON s.id = c.series_id WHERE s.run_id = ?",
            (run_id,)).fetchone()
    finally:
        conn.close()
    return int(count), int(top)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_million_rows_all_durable_after_exit(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-c", _LOOP, str(tmp_path / "s"), "1000000"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert _count(tmp_path / "s", out[0]) == (1_000_000, 999_999)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_loses_at_most_the_last_interval(tmp_path: Path) -> None:
    root = tmp_path / "s"
    # Everything logged more than interval (1 s) + 2 s slack before the kill is durable.
    run_id, must_have, logged = kill_after(_LOOP, [str(root), str(10**9)], 6.0, slack=3.0)
    count, top = _count(root, run_id)
    assert count == top + 1  # batches commit whole and in order: a gap-free prefix survived
    assert count > must_have > 0
    print(f"logged >= {logged}, durable {count} ({logged - count} lost at most)")
