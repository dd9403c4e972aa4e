"""Sustained TTRL logging rate: ``log_online_update`` and ``log_metrics`` vs W&B offline.

    python benchmarks/ttrl_logging.py [--n 200000] [--wandb-n 20000] [--root DIR]
                                      [--burners K] [--skip-contended] [--skip-wandb]

Each side logs the same four scalars per call (reward, confidence, KL, update count):

- ``repro log_online_update``: N calls inside a ``TTRLContext`` (monitor off); each call also
  stores one ``online_updates`` row linked to the current model version;
- the same under CPU contention: K sibling processes (default: one per core) burn CPU from
  the first call until everything is durable, as other jobs on a shared node do; the writer
  thread then competes for the cores and the GIL, and the bounded buffer (backpressure) makes
  the loop wait for it rather than let the backlog grow;
- ``repro log_metrics``: N ``ctx.log_metrics({...})`` calls in another context;
- ``W&B offline run.log``: ``wandb.init(mode="offline", dir=tmp)``, then ``--wandb-n`` calls of
  ``run.log({...})`` and ``run.finish()`` (W&B is slower, so a smaller N keeps the run short;
  rates are per second either way).

"calls/s durable" counts from the first call until the context's ``__exit__`` (or W&B's
``finish()``) has returned, i.e. until everything is on disk; context entry (environment
capture) and ``wandb.init`` are excluded and printed separately. After the run the registry
is read back to check that all N updates and N points of each metric were stored.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from repro_core import ArtifactManager
from repro_core.ttrl import TTRLContext


def _burn(stop: Any) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


@contextlib.contextmanager
def _cpu_burners(count: int) -> Iterator[None]:
    """``count`` processes spinning on a core each, for the duration of the block."""
    if count < 1:
        yield
        return
    spawn = multiprocessing.get_context("spawn")  # no fork of a process with live threads
    stop = spawn.Event()
    procs = [spawn.Process(target=_burn, args=(stop,), daemon=True) for _ in range(count)]
    for proc in procs:
        proc.start()
    try:
        yield
    finally:
        stop.set()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.terminate()


def _timed_context(root: Path, name: str, n: int, body: Callable[[TTRLContext, int], None],
                   burners: int = 0) -> dict[str, Any]:
    t_enter = time.perf_counter()
    ctx = TTRLContext(name=name, root=root, monitor_hardware=False)
    ctx.__enter__()
    with _cpu_burners(burners):
        t0 = time.perf_counter()
        try:
            body(ctx, n)
            t_loop = time.perf_counter()
        except BaseException as exc:
            ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        ctx.__exit__(None, None, None)  # flushes every buffered row and point
        t_durable = time.perf_counter()
    assert ctx.run is not None and ctx.run.id is not None
    return {"n": n, "enter_s": t0 - t_enter, "loop_s": t_loop - t0,
            "durable_s": t_durable - t0, "run_id": ctx.run.id}


def _online_updates(ctx: TTRLContext, n: int) -> None:
    log = ctx.log_online_update
    for i in range(n):  # a distinct experience id per update, formatted in the loop as users do
        log(f"exp-{i}", float(i & 1), 0.5 + (i % 50) / 100, kl_divergence=0.001 * (i % 7))


def _log_metrics(ctx: TTRLContext, n: int) -> None:
    log = ctx.log_metrics
    for i in range(n):
        log({"online/reward": float(i & 1), "online/confidence": 0.5 + (i % 50) / 100,
             "online/kl_divergence": 0.001 * (i % 7), "online/update_count": i + 1})


def bench_repro(root: Path, n: int, burners: int | None
                ) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """Idle updates, updates beside ``burners`` CPU burners (None: skipped), idle metrics."""
    updates = _timed_context(root, "bench-online-update", n, _online_updates)
    contended = None if burners is None else _timed_context(
        root, "bench-online-update-contended", n, _online_updates, burners=burners)
    metrics = _timed_context(root, "bench-log-metrics", n, _log_metrics)
    return updates, contended, metrics


def bench_wandb(n: int, directory: Path) -> dict[str, Any] | str:
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb
    except ModuleNotFoundError:
        return "wandb not installed (pip install 'repro-lightning[wandb]')"
    t_init = time.perf_counter()
    run = wandb.init(mode="offline", dir=str(directory), project="repro-bench")
    t0 = time.perf_counter()
    for i in range(n):
        run.log({"online/reward": float(i & 1), "online/confidence": 0.5 + (i % 50) / 100,
                 "online/kl_divergence": 0.001 * (i % 7), "online/update_count": i + 1})
    t_loop = time.perf_counter()
    run.finish()
    t_durable = time.perf_counter()
    return {"n": n, "enter_s": t0 - t_init, "loop_s": t_loop - t0, "durable_s": t_durable - t0,
            "version": wandb.__version__}


def verify(root: Path, updates: dict[str, Any], contended: dict[str, Any] | None,
           metrics: dict[str, Any]) -> list[str]:
    """Read the store back in a fresh connection: every update row and metric point is there."""
    lines, ok = [], True
    for result in (updates, contended):
        if result is None:
            continue
        with contextlib.closing(sqlite3.connect(root / "registry.sqlite")) as conn:
            rows = conn.execute("SELECT COUNT(*), COUNT(DISTINCT update_id) FROM online_updates"
                                " WHERE run_id = ?", (result["run_id"],)).fetchone()
        lines.append(f"online_updates rows for run {result['run_id']}: {rows[0]:,} "
                     f"({rows[1]:,} distinct ids) of {result['n']:,} logged")
        ok = ok and rows[0] == rows[1] == result["n"]
    manager = ArtifactManager()
    for label, result in (("log_online_update", updates), ("log_metrics", metrics)):
        points = manager.get_metrics(result["run_id"], keys=["online/reward",
                                                             "online/update_count"])
        counts = {k: len(v) for k, v in points.items()}
        last = points["online/update_count"][-1][1] if points.get("online/update_count") else None
        lines.append(f"{label}: metric points {counts}, last online/update_count {last}")
        ok = ok and all(c == result["n"] for c in counts.values()) and len(counts) == 2
    lines.append("all durable after finalize: " + ("YES" if ok else "NO"))
    return lines


def _rate(result: dict[str, Any], key: str) -> float:
    return float(result["n"]) / float(result[key])


def table(rows: list[tuple[str, dict[str, Any]]], reference: dict[str, Any] | None) -> str:
    out = ["| what | calls | calls/s (loop) | calls/s durable | durable s | enter s "
           "| x W&B offline (durable) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows:
        ratio = (f"{_rate(r, 'durable_s') / _rate(reference, 'durable_s'):.1f}x"
                 if reference is not None else "n/a")
        out.append(f"| {label} | {r['n']:,} | {_rate(r, 'loop_s'):,.0f} | "
                   f"{_rate(r, 'durable_s'):,.0f} | {r['durable_s']:.3f} | {r['enter_s']:.2f} | "
                   f"{ratio} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="repro calls per measurement")
    parser.add_argument("--wandb-n", type=int, default=20_000, help="W&B run.log calls")
    parser.add_argument("--root", type=Path, default=None, help="store (default: temp, removed)")
    parser.add_argument("--skip-wandb", action="store_true")
    parser.add_argument("--burners", type=int, default=os.cpu_count() or 1,
                        help="CPU-burning processes for the contended line (default: one per "
                             "core)")
    parser.add_argument("--skip-contended", action="store_true")
    args = parser.parse_args()
    if args.n < 1 or args.wandb_n < 1 or args.burners < 1:
        parser.error("--n, --wandb-n and --burners must be >= 1")
    work = Path(tempfile.mkdtemp(prefix="repro-bench-ttrl-"))
    root = args.root or work / "store"
    try:
        burners = None if args.skip_contended else args.burners
        updates, contended, metrics = bench_repro(root, args.n, burners)
        wb = "skipped (--skip-wandb)" if args.skip_wandb else bench_wandb(args.wandb_n,
                                                                            work / "wandb")
        reference = wb if isinstance(wb, dict) else None
        rows = [("repro `log_online_update`", updates)]
        if contended is not None:
            rows.append((f"repro `log_online_update`, {burners} CPU burners", contended))
        rows.append(("repro `log_metrics`", metrics))
        if reference is not None:
            rows.append((f"W&B {reference['version']} offline `run.log`", reference))
        print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"Python {platform.python_version()}; 4 scalars per call; "
              f"store {root}\n")
        print(table(rows, reference))
        if reference is None:
            print(f"\nW&B: {wb}")
        print()
        for line in verify(root, updates, contended, metrics):
            print(line)
    finally:
        if args.root is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
