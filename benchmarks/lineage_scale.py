"""Lineage queries at scale: a 100,000-artifact registry of chains and fan-outs.

    python benchmarks/lineage_scale.py [--artifacts 100000] [--queries 200]

The registry is filled with bulk SQL in one transaction (the rows ``log_artifact`` would write:
versions, logged-by runs, parent edges, used-by edges; blobs are not needed for lineage); the
queried keys are read back from the registry, so they are spelled as the registry spells them.
Half of the artifacts form chains of 1,000 (deep ancestry), half form fan-outs of 100 children
per parent (wide descendants); every 100 versions belong to one run, and inside a chain each
run uses the previous run's last output (so a chain's ancestry crosses its 10 runs).
Reports the graph build time, p50/p95 of ``get_ancestors`` / ``get_descendants`` on random
nodes, and ``repro lineage KEY`` end to end (a fresh process).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from repro_core.lineage import LineageTracker
from repro_core.registry import Registry, dumps
from repro_core.types import utc_now

DIGEST = "blake3:" + "0" * 64
PROJECT = "default"


def build_registry(root: Path, n: int) -> None:
    """Insert ``n`` versions (numbered v1, as ``log_artifact`` numbers them) with chain and
    fan-out edges."""
    registry = Registry(root / "registry.sqlite")
    now = utc_now()
    run_count = (n + 99) // 100
    with registry.transaction() as conn:
        _insert(conn, "runs", [
            {"id": f"run{i:06d}", "name": f"run-{i}", "project": PROJECT, "state": "completed",
             "tags": "[]", "config": "{}", "created_at": now, "ended_at": now, "host": "bench",
             "pid": 0, "world_size": 1} for i in range(run_count)])
        _insert(conn, "artifacts", [
            {"project": PROJECT, "name": f"a{i:06d}", "type": "model", "created_at": now}
            for i in range(n)])
        _insert(conn, "versions", [
            {"id": i + 1, "project": PROJECT, "name": f"a{i:06d}", "version": 1,
             "digest": DIGEST, "size": 0, "format": "bytes", "run_id": f"run{i // 100:06d}",
             "created_at": now, "metadata": dumps({})} for i in range(n)])
        _insert(conn, "run_outputs", [
            {"run_id": f"run{i // 100:06d}", "version_id": i + 1, "logged_at": now}
            for i in range(n)])
        _insert(conn, "artifact_parents", [
            {"parent_id": parent, "child_id": child} for parent, child in _edges(n)])
        _insert(conn, "run_inputs", [
            {"run_id": f"run{r:06d}", "version_id": r * 100, "used_at": now}
            for r in range(1, run_count) if r % 10 != 0])
    registry.close()


def version_keys(root: Path) -> list[str]:
    """Every version's key as the registry spells it (``row.key``; never formatted here)."""
    registry = Registry(root / "registry.sqlite")
    try:
        return [v.key for v in registry.list_versions()]
    finally:
        registry.close()


def _insert(conn: sqlite3.Connection, table: str, rows: list[dict[str, Any]]) -> None:
    """Bulk-insert ``rows``, keeping the columns ``table`` has: the same script then fills
    registries from before and after a schema change that adds a column (``project``)."""
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    columns = [c for c in rows[0] if c in have] if rows else []
    if not columns:
        return
    sql = (f"INSERT INTO {table} ({', '.join(columns)}) "
           f"VALUES ({', '.join('?' for _ in columns)})")
    conn.executemany(sql, [tuple(row[c] for c in columns) for row in rows])


def _edges(n: int) -> list[tuple[int, int]]:
    """(parent_id, child_id): chains of 1,000 in the first half, fan-outs of 100 after."""
    half = n // 2
    edges = [(i, i + 1) for i in range(1, half) if i % 1000 != 0]
    for start in range(half + 1, n + 1, 101):
        edges.extend((start, child) for child in range(start + 1, min(start + 101, n + 1)))
    return edges


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="repro-lineage-bench-"))
    try:
        measure(root, args.artifacts, args.queries)
    finally:
        shutil.rmtree(root, ignore_errors=True)  # a scratch store: never left in /tmp


def measure(root: Path, artifacts: int, queries: int) -> None:
    """Fill a store with ``artifacts`` versions, time the queries, print the table."""
    start = time.perf_counter()
    build_registry(root, artifacts)
    fill = time.perf_counter() - start
    keys = version_keys(root)

    start = time.perf_counter()
    tracker = LineageTracker.from_store(root)
    build = time.perf_counter() - start
    rng = random.Random(0)
    picks = [rng.choice(keys) for _ in range(queries)]
    rows = [("fill registry (bulk SQL)", fill, fill), ("LineageTracker.from_store", build, build)]
    for name, fn in (("get_ancestors", tracker.get_ancestors),
                     ("get_descendants", tracker.get_descendants)):
        times, sizes = [], []
        for key in picks:
            t = time.perf_counter()
            sizes.append(len(fn(key)))
            times.append(time.perf_counter() - t)
        p50, p95 = percentiles(times)
        rows.append((f"{name} (mean result {statistics.mean(sizes):.0f} nodes)", p50, p95))
    focused = []
    registry = Registry(root / "registry.sqlite")
    for key in picks[:50]:
        t = time.perf_counter()
        around = LineageTracker.from_registry(registry, around=key)
        around.get_ancestors(key)
        focused.append(time.perf_counter() - t)
    registry.close()
    rows.append(("from_registry(around=KEY) + get_ancestors (focused load)",
                 *percentiles(focused)))
    cli = []
    for key in picks[:5]:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "repro_core.cli", "lineage", key, "--root",
                        str(root), "--format", "json"], check=True, capture_output=True)
        cli.append(time.perf_counter() - t)
    rows.append(("`repro lineage KEY --format json` (new process)", *percentiles(cli)))
    print(f"\n{artifacts} artifacts, {len(tracker.graph)} graph nodes, "
          f"{tracker.graph.number_of_edges()} edges\n")
    print("| operation | p50 ms | p95 ms |")
    print("|---|---:|---:|")
    for name, p50, p95 in rows:
        print(f"| {name} | {p50 * 1000:.1f} | {p95 * 1000:.1f} |")


if __name__ == "__main__":
    main()
