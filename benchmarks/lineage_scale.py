"""Lineage queries at scale: a 100,000-artifact registry of chains and fan-outs.

    python benchmarks/lineage_scale.py [--artifacts 100000] [--queries 200]

The registry is filled with bulk SQL in one transaction (the rows ``log_artifact`` would write:
versions, logged-by runs, parent edges, used-by edges; blobs are not needed for lineage).
Half of the artifacts form chains of 1,000 (deep ancestry), half form fan-outs of 100 children
per parent (wide descendants); every 100 versions belong to one run, and inside a chain each
run uses the previous run's last output (so a chain's ancestry crosses its 10 runs).
Reports the graph build time, p50/p95 of ``get_ancestors`` / ``get_descendants`` on random
nodes, and ``repro lineage KEY`` end to end (a fresh process).
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repro_core.lineage import LineageTracker
from repro_core.registry import Registry, dumps
from repro_core.types import utc_now

DIGEST = "blake3:" + "0" * 64


def build_registry(root: Path, n: int) -> list[str]:
    """Insert ``n`` versions with chain and fan-out edges; return every artifact key."""
    registry = Registry(root / "registry.sqlite")
    now = utc_now()
    keys: list[str] = []
    with registry.transaction() as conn:
        runs = [(f"run{i:06d}", f"run-{i}", "bench", "completed", "[]", "{}", now, now,
                 "bench", 0, 1) for i in range((n + 99) // 100)]
        conn.executemany("INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", runs)
        conn.executemany("INSERT INTO artifacts VALUES (?, ?, ?)",
                         [(f"a{i:06d}", "model", now) for i in range(n)])
        conn.executemany(
            "INSERT INTO versions (id, name, version, digest, size, format, run_id, created_at,"
            " metadata) VALUES (?, ?, 0, ?, 0, 'bytes', ?, ?, ?)",
            [(i + 1, f"a{i:06d}", DIGEST, f"run{i // 100:06d}", now, dumps({})) for i in range(n)],
        )
        conn.executemany("INSERT INTO run_outputs VALUES (?, ?, ?)",
                         [(f"run{i // 100:06d}", i + 1, now) for i in range(n)])
        conn.executemany("INSERT INTO artifact_parents VALUES (?, ?)", list(_edges(n)))
        conn.executemany(
            "INSERT INTO run_inputs VALUES (?, ?, ?)",
            [(f"run{r:06d}", r * 100, now) for r in range(1, len(runs)) if r % 10 != 0],
        )
        keys = [f"a{i:06d}:v0" for i in range(n)]
    registry.close()
    return keys


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
    start = time.perf_counter()
    keys = build_registry(root, args.artifacts)
    fill = time.perf_counter() - start

    start = time.perf_counter()
    tracker = LineageTracker.from_store(root)
    build = time.perf_counter() - start
    rng = random.Random(0)
    picks = [rng.choice(keys) for _ in range(args.queries)]
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
    print(f"\n{args.artifacts} artifacts, {len(tracker.graph)} graph nodes, "
          f"{tracker.graph.number_of_edges()} edges\n")
    print("| operation | p50 ms | p95 ms |")
    print("|---|---:|---:|")
    for name, p50, p95 in rows:
        print(f"| {name} | {p50 * 1000:.1f} | {p95 * 1000:.1f} |")


if __name__ == "__main__":
    main()
