"""The two registry engines side by side: SQLite (the store's file) and PostgreSQL (loopback).

    python benchmarks/registry_engines.py [--quick] [--repeats 3] [--writers 4]
        [--artifacts 100] [--metric-calls 50000] [--updates 25000]
        [--lineage-artifacts 100000] [--queries 30] [--configs sqlite,sqlite-nofsync,postgresql]
        [--skip-lineage]

(about 3 minutes on a 2-core machine at the defaults; ``--quick``: under a minute, smaller
sizes and one pass — a smoke run, not numbers to publish.)

For each configuration:

- ``sqlite``: the default (``registry.sqlite`` in the store, WAL, ``REPRO_FSYNC=full``:
  ``PRAGMA synchronous=FULL`` and every blob and directory fsynced);
- ``sqlite-nofsync``: the same with ``REPRO_FSYNC=none`` (``synchronous=OFF``, no fsyncs) —
  the closest SQLite gets to the PostgreSQL server below;
- ``postgresql``: ``REPRO_REGISTRY=postgresql://…127.0.0.1…?options=-csearch_path%3D<schema>``
  (a fresh schema per store), a server started exactly as the test suite starts it
  (``tests/pg_support.py``: ``fsync=off``, ``synchronous_commit=on``,
  ``full_page_writes=off``, ``shared_buffers=64MB``); repro itself keeps ``REPRO_FSYNC=full``
  (blobs are files in the store either way, fsynced).

it measures, in fresh spawned processes (environment capture ``BASIC``, no hardware monitor;
run opening is outside the timing):

- ``log_artifact`` of small (≈40-byte, all distinct) ``bytes`` artifacts, until
  ``finalize_run`` has returned;
- ``ctx.log_metrics`` with the 4 scalars per call of ``benchmarks/ttrl_logging.py``, until the
  context's exit has returned (the background writer's final flush included): points/s;
- ``ctx.log_online_update`` as in ``benchmarks/ttrl_logging.py`` (one ``online_updates`` row and
  3 metric points per call), until the exit has returned: updates/s;

first with one writer, then with ``--writers`` processes at once, each its own run in the same
store and registry, started together on a barrier: aggregate rate = all calls / (last finish -
common start). Then a lineage query at ``--lineage-artifacts`` versions: the registry is filled
through the registry's own transaction and ``copy_rows`` (``COPY`` on PostgreSQL,
``executemany`` on SQLite) with the rows ``log_artifact`` writes (runs, artifacts, versions,
run_outputs, parent edges, run_inputs) in the graph of ``benchmarks/lineage_scale.py`` (chains
of 1,000 and fan-outs of 100; blobs are not needed for lineage), PostgreSQL's tables
``VACUUM ANALYZE``d after the load (as autovacuum would, but before the queries); then
``ArtifactManager.get_lineage(KEY)`` (public API: ancestors, descendants, parents, children,
runs) and ``LineageTracker.from_registry(around=KEY)`` + ``get_ancestors`` (README's row) on
random keys: p50 per pass (the same keys each pass).

Every measurement is repeated ``--repeats`` times (a fresh store and schema each time; the
configurations interleaved, so drift hits them alike) and the median is shown. Row counts are
checked after every write pass, and the durability settings each engine actually ran with are
read back from it and printed. Prints one Markdown table with each configuration and the speed
ratio postgresql ÷ sqlite per row (rates: pg rate / sqlite rate; latencies: sqlite ms / pg ms),
so ≥ 0.5 means "within 2x of SQLite" on every row.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # ttrl_logging, lineage_scale: the same workload shapes
sys.path.insert(0, str(HERE.parent / "tests"))  # pg_support: the same server as the tests

OPS = ("artifacts", "metrics", "updates")
POINTS_PER_METRICS_CALL = 4  # ttrl_logging._log_metrics logs 4 scalars per call


# -- writer processes -------------------------------------------------------------------------

def _writer(idx: int, root: str, sizes: dict[str, int], barrier: Any, queue: Any) -> None:
    """One writer: its own runs in the shared store; each operation starts on the barrier."""
    try:
        queue.put((idx, _writer_body(idx, Path(root), sizes, barrier)))
    except BaseException as exc:  # report, and let the others' barrier break
        barrier.abort()
        queue.put((idx, f"{type(exc).__name__}: {exc}"))


def _writer_body(idx: int, root: Path, sizes: dict[str, int], barrier: Any
                 ) -> dict[str, tuple[float, float, int]]:
    from ttrl_logging import _log_metrics, _online_updates

    from repro_core import ArtifactManager
    from repro_core.capture import EnvironmentCaptureLevel
    from repro_core.ttrl import TTRLContext

    if idx == 0:  # the store (and, for PostgreSQL, its schema) exists before anyone else opens
        mgr = ArtifactManager.reset_instance()
        mgr.set_root(root)
        mgr.init_run("bench-setup", config={})
        mgr.finalize_run()
    barrier.wait()
    out: dict[str, tuple[float, float, int]] = {}

    n = sizes["artifacts"]
    mgr = ArtifactManager.reset_instance()
    mgr.set_root(root)
    mgr.init_run(f"bench-a-{idx}", config={})
    barrier.wait()
    t0 = time.monotonic()
    for i in range(n):
        mgr.log_artifact(f"bench-a-{idx}-{i}", "dataset",
                         data=f"writer {idx} artifact {i} payload".encode())
    mgr.finalize_run()
    out["artifacts"] = (t0, time.monotonic(), n)

    for op, name, body in (("metrics", "bench-m", _log_metrics),
                           ("updates", "bench-u", _online_updates)):
        n = sizes[op]
        ctx = TTRLContext(name=f"{name}-{idx}", root=root, monitor_hardware=False,
                          capture_level=EnvironmentCaptureLevel.BASIC)
        ctx.__enter__()
        barrier.wait()
        t0 = time.monotonic()
        try:
            body(ctx, n)
        except BaseException as exc:
            ctx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        ctx.__exit__(None, None, None)  # flushes every buffered row and point
        out[op] = (t0, time.monotonic(), n)
    return out


def write_pass(root: Path, writers: int, sizes: dict[str, int]) -> dict[str, float]:
    """``writers`` processes at once in a fresh store: aggregate calls/s per operation."""
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters, nothing inherited
    barrier, queue = spawn.Barrier(writers), spawn.Queue()
    procs = [spawn.Process(target=_writer, args=(i, str(root), sizes, barrier, queue))
             for i in range(writers)]
    for proc in procs:
        proc.start()
    results = {}
    try:
        for _ in procs:
            idx, result = queue.get(timeout=900)
            if isinstance(result, str):
                sys.exit(f"writer {idx} failed in {root}: {result}")
            results[idx] = result
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
    rates = {}
    for op in OPS:
        spans = [results[i][op] for i in results]
        total = sum(s[2] for s in spans)
        rates[op] = total / (max(s[1] for s in spans) - min(s[0] for s in spans))
    rates["metrics"] *= POINTS_PER_METRICS_CALL  # points/s
    _verify(root, writers, sizes)
    return rates


def _verify(root: Path, writers: int, sizes: dict[str, int]) -> None:
    """Every version, metric point and update row of the pass is in the registry."""
    from repro_core.registry import Registry

    registry = Registry(root / "registry.sqlite", create=False)
    try:
        with registry.snapshot() as conn:
            versions = conn.execute("SELECT COUNT(*) FROM versions WHERE name LIKE ?",
                                    ("bench-a-%",)).fetchone()[0]
            points = conn.execute(
                "SELECT COALESCE(SUM(c.count), 0) FROM metric_chunks c JOIN metric_series s"
                " ON c.series_id = s.id JOIN runs r ON r.id = s.run_id WHERE r.name LIKE ?",
                ("bench-m-%",)).fetchone()[0]
            updates = conn.execute("SELECT COUNT(*) FROM online_updates").fetchone()[0]
    finally:
        registry.close()
    want = (writers * sizes["artifacts"],
            writers * sizes["metrics"] * POINTS_PER_METRICS_CALL, writers * sizes["updates"])
    if (versions, points, updates) != want:
        sys.exit(f"{root}: stored (versions, metric points, updates) = "
                 f"{(versions, points, updates)}, expected {want}")


# -- lineage ----------------------------------------------------------------------------------

def _copy_insert(conn: Any, table: str, rows: list[dict[str, Any]]) -> None:
    """``lineage_scale``'s bulk insert, through the engine's ``copy_rows`` (both engines)."""
    if rows:
        columns = tuple(rows[0])
        conn.copy_rows(table, columns, [tuple(row[c] for c in columns) for row in rows])


def engine_settings(root: Path) -> str:
    """The durability settings the registry connection of a fresh store really has."""
    from repro_core.registry import Registry

    registry = Registry(root / "registry.sqlite", create=True)
    try:
        with registry._reading() as conn:
            if registry.engine == "sqlite":
                sync = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
                    conn.execute("PRAGMA synchronous").fetchone()[0], "?")
                mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
                return f"journal_mode={mode}, synchronous={sync}"
            shown = [f"{name}={conn.execute(f'SHOW {name}').fetchone()[0]}" for name in (
                "server_version", "fsync", "synchronous_commit", "full_page_writes",
                "shared_buffers", "default_toast_compression")]
            return ", ".join(shown)
    finally:
        registry.close()
        shutil.rmtree(root, ignore_errors=True)


def lineage_pass(root: Path, artifacts: int, queries: int, repeats: int,
                 postgres: bool) -> tuple[float, list[float], list[float]]:
    """Fill a registry with ``artifacts`` versions; p50 seconds of each query, per pass."""
    import random

    import lineage_scale

    from repro_core import ArtifactManager
    from repro_core.lineage import LineageTracker
    from repro_core.registry import Registry

    lineage_scale._insert = _copy_insert  # same rows and graph, the engine's bulk path
    t = time.perf_counter()
    lineage_scale.build_registry(root, artifacts)
    if postgres:
        registry = Registry(root / "registry.sqlite", create=False)
        with registry.transaction() as conn:  # explicit ids: move the identity on
            conn.execute("SELECT setval(pg_get_serial_sequence('versions', 'id'),"
                         " (SELECT MAX(id) FROM versions))")
        with registry._reading() as conn:  # what autovacuum does after a bulk load, done
            conn.execute("VACUUM ANALYZE")  # now so that it does not run during the queries
        registry.close()
    fill = time.perf_counter() - t
    keys = lineage_scale.version_keys(root)
    rng = random.Random(0)
    picks = [rng.choice(keys) for _ in range(queries)]
    mgr = ArtifactManager.reset_instance()
    mgr.set_root(root)
    registry = Registry(root / "registry.sqlite", create=False)
    public, focused = [], []
    try:
        for _ in range(repeats):
            times = []
            for key in picks:
                t = time.perf_counter()
                mgr.get_lineage(key)
                times.append(time.perf_counter() - t)
            public.append(statistics.median(times))
            times = []
            for key in picks:
                t = time.perf_counter()
                LineageTracker.from_registry(registry, around=key).get_ancestors(key)
                times.append(time.perf_counter() - t)
            focused.append(statistics.median(times))
    finally:
        registry.close()
        ArtifactManager.reset_instance()
    return fill, public, focused


# -- configurations ---------------------------------------------------------------------------

@contextlib.contextmanager
def environment(values: dict[str, str | None]) -> Iterator[None]:
    """Set (None: unset) environment variables for the block; spawned writers inherit them."""
    from repro_core import constants

    saved = {k: os.environ.get(k) for k in values}

    def apply(vals: dict[str, str | None]) -> None:
        for key, value in vals.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        constants.reload()

    apply(values)
    try:
        yield
    finally:
        apply(saved)


def config_env(name: str, server: Any) -> dict[str, str | None]:
    if name == "sqlite":
        return {"REPRO_FSYNC": "full", "REPRO_REGISTRY": None}
    if name == "sqlite-nofsync":
        return {"REPRO_FSYNC": "none", "REPRO_REGISTRY": None}
    if name == "postgresql":
        return {"REPRO_FSYNC": "full", "REPRO_REGISTRY": server.new_schema()}
    raise SystemExit(f"unknown configuration {name!r}")


def start_postgres() -> tuple[Any, Any] | str:
    """``tests/pg_support.start_server()`` outside pytest: (server, generator) or why not."""
    try:
        import pg_support
    except ImportError as exc:
        return f"tests/pg_support.py not importable: {exc}"
    gen = pg_support.start_server()
    try:
        server = next(gen)
    except BaseException as exc:  # pytest's skip/fail outcomes are BaseExceptions
        if isinstance(exc, KeyboardInterrupt):
            raise
        return f"{type(exc).__name__}: {exc}"
    return server, gen


# -- table ------------------------------------------------------------------------------------

ROWS = (  # key, label, unit kind ("rate": higher is better, "ms"/"s": lower is better)
    ("artifacts@1", "`log_artifact` (small bytes), 1 writer — artifacts/s", "rate"),
    ("metrics@1", "`log_metrics` (4 scalars/call), 1 writer — points/s", "rate"),
    ("updates@1", "`log_online_update`, 1 writer — updates/s", "rate"),
    ("artifacts@N", "`log_artifact`, {n} writers — artifacts/s (aggregate)", "rate"),
    ("metrics@N", "`log_metrics`, {n} writers — points/s (aggregate)", "rate"),
    ("updates@N", "`log_online_update`, {n} writers — updates/s (aggregate)", "rate"),
    ("lineage", "`get_lineage(KEY)` at {a} versions — p50 ms", "ms"),
    ("focused", "`from_registry(around=KEY)` + `get_ancestors` at {a} versions — p50 ms",
     "ms"),
    ("fill", "fill {a}-version registry (bulk, not a rate of log_artifact) — s", "s"),
)


def _fmt(value: float | None, kind: str) -> str:
    if value is None:
        return "—"
    if kind == "rate":
        return f"{value:,.0f}"
    if kind == "ms":
        return f"{value * 1000:.1f}"
    return f"{value:.1f}"


def table(configs: list[str], medians: dict[str, dict[str, float]],
          writers: int, artifacts: int) -> str:
    sqlites = [c for c in configs if c.startswith("sqlite")]
    ratio_cols = [c for c in sqlites if "postgresql" in configs]
    head = ["what", *configs, *[f"postgresql ÷ {c} (speed)" for c in ratio_cols]]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for key, label, kind in ROWS:
        if not any(key in medians[c] for c in configs):
            continue
        cells = [label.format(n=writers, a=f"{artifacts:,}")]
        cells += [_fmt(medians[c].get(key), kind) for c in configs]
        for c in ratio_cols:
            pg, sq = medians["postgresql"].get(key), medians[c].get(key)
            if pg is None or sq is None or kind == "s":
                cells.append("—")
            elif kind == "rate":
                cells.append(f"**{pg / sq:.2f}**" if key.startswith(("metrics", "updates"))
                             else f"{pg / sq:.2f}")
            else:
                cells.append(f"{sq / pg:.2f}")  # latency: higher is better, like the rates
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


# -- main -------------------------------------------------------------------------------------

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and one repeat (a smoke run, not for the README)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--writers", type=int, default=4)
    parser.add_argument("--artifacts", type=int, default=None,
                        help="log_artifact calls per writer (default 100; quick: 30)")
    parser.add_argument("--metric-calls", type=int, default=None,
                        help="log_metrics calls per writer (default 50000; quick: 5000)")
    parser.add_argument("--updates", type=int, default=None,
                        help="log_online_update calls per writer (default 25000; quick: 5000)")
    parser.add_argument("--lineage-artifacts", type=int, default=None,
                        help="versions in the lineage registry (default 100000; quick: 10000)")
    parser.add_argument("--queries", type=int, default=None,
                        help="lineage queries per pass (default 30; quick: 10)")
    parser.add_argument("--configs", default="sqlite,sqlite-nofsync,postgresql")
    parser.add_argument("--skip-lineage", action="store_true")
    args = parser.parse_args()
    q = args.quick
    args.repeats = args.repeats or (1 if q else 3)
    args.sizes = {"artifacts": args.artifacts or (30 if q else 100),
                  "metrics": args.metric_calls or (5_000 if q else 50_000),
                  "updates": args.updates or (5_000 if q else 25_000)}
    args.lineage_artifacts = args.lineage_artifacts or (10_000 if q else 100_000)
    args.queries = args.queries or (10 if q else 30)
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if min(args.repeats, args.writers, *args.sizes.values(), args.lineage_artifacts,
           args.queries) < 1:
        parser.error("sizes, --repeats and --writers must be >= 1")
    return args


def measure(args: argparse.Namespace, work: Path, server: Any
            ) -> tuple[dict[str, dict[str, list[float]]], dict[str, str]]:
    """Every pass of every configuration: {config: {row key: [value per pass]}}, settings."""
    configs, repeats = args.configs, args.repeats
    samples: dict[str, dict[str, list[float]]] = {c: {} for c in configs}
    settings: dict[str, str] = {}
    for config in configs:
        env = config_env(config, server)
        with environment(env):
            settings[config] = (f"REPRO_FSYNC={env['REPRO_FSYNC']}; "
                                + engine_settings(work / f"{config}-settings"))
    for rep in range(repeats):  # configurations interleaved, so drift hits them alike
        for config in configs:
            for writers, tag in ((1, "1"), (args.writers, "N")):
                root = work / f"{config}-{tag}-{rep}"
                with environment(config_env(config, server)):
                    rates = write_pass(root, writers, args.sizes)
                shutil.rmtree(root, ignore_errors=True)
                for op, rate in rates.items():
                    samples[config].setdefault(f"{op}@{tag}", []).append(rate)
                print(f"  pass {rep + 1}/{repeats} {config} x{writers}: " + ", ".join(
                    f"{op} {rate:,.0f}/s" for op, rate in rates.items()), flush=True)
    for config in [] if args.skip_lineage else configs:
        if config == "sqlite-nofsync":
            continue  # reads only: the same file and queries as sqlite
        root = work / f"{config}-lineage"
        with environment(config_env(config, server)):
            fill, public, focused = lineage_pass(root, args.lineage_artifacts, args.queries,
                                                 repeats, config == "postgresql")
        shutil.rmtree(root, ignore_errors=True)
        samples[config].update(lineage=public, focused=focused, fill=[fill])
        print(f"  lineage {config}: fill {fill:.1f} s, get_lineage p50 per pass "
              + ", ".join(f"{s * 1000:.1f}" for s in public) + " ms", flush=True)
    return samples, settings


def report(args: argparse.Namespace, samples: dict[str, dict[str, list[float]]],
           settings: dict[str, str], seconds: float) -> None:
    configs, sizes = args.configs, args.sizes
    medians = {c: {k: statistics.median(v) for k, v in samples[c].items()} for c in configs}
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; median of {args.repeats} passes; per writer: "
          f"{sizes['artifacts']:,} log_artifact, {sizes['metrics']:,} log_metrics calls "
          f"(x4 scalars), {sizes['updates']:,} log_online_update; lineage: {args.queries} "
          f"random keys per pass; {seconds:.0f} s in all\n")
    print(table(configs, medians, args.writers, args.lineage_artifacts))
    print("\nWhat each configuration ran with (read back from the engine):")
    for config in configs:
        print(f"- {config}: {settings[config]}")
    print("\nEvery pass (the table shows the medians):")
    for config in configs:
        print(f"{config}: " + "; ".join(
            f"{k} " + "/".join(_fmt(v, "ms" if k in ("lineage", "focused")
                                    else "s" if k == "fill" else "rate") for v in vals)
            for k, vals in samples[config].items()))


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="repro-bench-engines-"))
    server = gen = None
    note = None
    if "postgresql" in args.configs:
        got = start_postgres()
        if isinstance(got, str):
            note = f"postgresql skipped: {got}"
            args.configs.remove("postgresql")
        else:
            server, gen = got
    try:
        samples, settings = measure(args, work, server)
    finally:
        if gen is not None:
            gen.close()  # stops the server, removes its directory
        shutil.rmtree(work, ignore_errors=True)
    report(args, samples, settings, time.monotonic() - started)
    if note:
        print(note)


if __name__ == "__main__":
    main()
