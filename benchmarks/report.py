"""How long ``repro report`` takes, and how big the file is, for a large run; and the two
plotting libraries it could use, side by side.

    python benchmarks/report.py [--rows 1000000] [--series 10] [--updates 10000]
                                [--checkpoints 100] [--root DIR] [--skip-libraries]

1. **The large run** is made through the public API in a temporary store: one
   ``TTRLContext`` (hardware monitor on, sampling every 0.05 s) that logs ``--rows`` metric
   points as ``--series`` names (``ctx.log_metrics`` with all names per call: the fastest
   public way, one call per step), ``--updates`` online updates (``log_online_update``,
   one NaN reward among them) and ``--checkpoints`` checkpoints spread over them. Then the
   report of it is made three ways: in this process (warm: ``report()`` again, plotly.js
   already read), in this process the first time (cold: numpy, plotly.js), and as a new
   interpreter (what ``repro report`` costs end to end, imports included).
2. **Plotting libraries** (unless ``--skip-libraries``): ~10 series x 2,000 points as the
   report draws them — Plotly with plotly.js inlined (what the report uses) and matplotlib
   SVG (the alternative) — each in a new interpreter so imports count: file size and time.

Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repro_core import ArtifactManager
from repro_core.ttrl import TTRLContext


def make_run(root: Path, rows: int, series: int, updates: int, checkpoints: int) -> str:
    """The large run; returns its id."""
    ArtifactManager.reset_instance().set_root(root)
    names = [f"train/metric_{i}" for i in range(series)]
    steps = rows // series
    every = max(updates // max(checkpoints, 1), 1)
    weights = root.parent / "weights"
    weights.mkdir(exist_ok=True)
    with TTRLContext(config={"benchmark": "report"}, name="report-benchmark", root=root,
                     monitor_interval=0.05, capture_level=1) as ctx:
        for step in range(steps):
            base = math.exp(-step / steps * 3)
            ctx.log_metrics({name: base + 0.01 * i + (5.0 if step == steps // 2 else 0.0)
                             for i, name in enumerate(names)}, step=step)
        made = 0
        for u in range(updates):
            if checkpoints and u % every == 0 and made < checkpoints:
                path = weights / f"policy-{made}.bin"
                path.write_bytes(made.to_bytes(4, "little") * 256)
                ctx.log_model_checkpoint(path, step=u)
                made += 1
            reward = math.nan if u == updates // 3 else math.sin(u / 50)
            ctx.log_online_update(f"e{u}", reward=reward, confidence=0.5 + u / updates / 2,
                                  kl_divergence=u / updates / 10)
    assert ctx.run is not None and ctx.run.id is not None
    return ctx.run.id


def time_report(root: Path, run_id: str, out: Path) -> dict[str, float]:
    """Seconds for the report in this process (cold, then warm) and in a new one."""
    from repro_core import report

    start = time.perf_counter()
    report(run_id, out, root=root)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    report(run_id, out, root=root)
    warm = time.perf_counter() - start
    code = ("import sys; from repro_core import report; "
            "report(sys.argv[1], sys.argv[2], root=sys.argv[3])")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, run_id, str(out), str(root)], check=True)
    process = time.perf_counter() - start
    return {"cold": cold, "warm": warm, "process": process, "size": out.stat().st_size}


# -- plotting libraries -----------------------------------------------------------------------

_PLOTLY = """
import base64, json, sys, time
t0 = time.perf_counter()
import numpy as np
from plotly.offline import get_plotlyjs
rng = np.random.default_rng(0)
x = np.arange(2000)
specs = []
for i in range(10):
    y = np.cumsum(rng.normal(size=2000))
    arr = lambda a: {"dtype": "f8", "bdata": base64.b64encode(a.astype("<f8").tobytes()).decode()}
    specs.append({"data": [{"type": "scatter", "mode": "lines", "x": arr(x), "y": arr(y)}],
                  "layout": {"title": {"text": f"metric {i}"}, "height": 330}})
html = ("<!DOCTYPE html><html><head><meta charset=utf-8></head><body>"
        + "".join(f'<div id="p{i}"></div>' for i in range(10))
        + f"<script>{get_plotlyjs()}</script><script>var s={json.dumps(specs)};"
        + "s.forEach(function(f,i){Plotly.newPlot('p'+i,f.data,f.layout)})</script>"
        + "</body></html>")
open(sys.argv[1], "w").write(html)
print(time.perf_counter() - t0)
"""

_MATPLOTLIB = """
import io, sys, time
t0 = time.perf_counter()
import numpy as np
from matplotlib.figure import Figure
from matplotlib.backends.backend_svg import FigureCanvasSVG
rng = np.random.default_rng(0)
x = np.arange(2000)
svgs = []
for i in range(10):
    y = np.cumsum(rng.normal(size=2000))
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    ax.plot(x, y, lw=1)
    ax.set_title(f"metric {i}")
    buf = io.StringIO()
    FigureCanvasSVG(fig).print_svg(buf)
    svgs.append(buf.getvalue().split("<svg", 1)[1])
html = "<!DOCTYPE html><html><body>" + "".join("<svg" + s for s in svgs) + "</body></html>"
open(sys.argv[1], "w").write(html)
print(time.perf_counter() - t0)
"""


def compare_libraries(directory: Path) -> list[str]:
    """One Markdown row per candidate: time in the script (imports included), time of the
    whole process, file size; or why it could not be measured (not installed)."""
    rows = []
    for name, code in (("Plotly (plotly.js inline)", _PLOTLY),
                       ("matplotlib (inline SVG)", _MATPLOTLIB)):
        out = directory / f"{name.split()[0].lower()}.html"
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True,
                              text=True)
        process = time.perf_counter() - start
        if done.returncode != 0:
            reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"
            rows.append(f"| {name} | not measured: {reason} | | |")
            continue
        rows.append(f"| {name} | {float(done.stdout.strip()):.2f} s | {process:.2f} s | "
                    f"{_mib(out.stat().st_size)} |")
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--series", type=int, default=10)
    parser.add_argument("--updates", type=int, default=10_000)
    parser.add_argument("--checkpoints", type=int, default=100)
    parser.add_argument("--root", type=Path, default=None,
                        help="work directory (default: a temporary one, removed after)")
    parser.add_argument("--skip-libraries", action="store_true")
    args = parser.parse_args()
    work = Path(args.root or tempfile.mkdtemp(prefix="repro-report-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        run_id = make_run(work / "store", args.rows, args.series, args.updates,
                          args.checkpoints)
        made = time.perf_counter() - start
        result = time_report(work / "store", run_id, work / "report.html")
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python "
              f"{platform.python_version()}; the run took {made:.1f} s to log\n")
        print(f"Report of one run: {args.rows:,} metric rows ({args.series} series), "
              f"{args.updates:,} TTRL updates, {args.checkpoints} checkpoints\n")
        print("| generation | time | file size |\n|---|---:|---:|")
        print(f"| in process, first report (imports, plotly.js read) | {result['cold']:.2f} s "
              f"| {_mib(result['size'])} |")
        print(f"| in process, again | {result['warm']:.2f} s | {_mib(result['size'])} |")
        print(f"| new interpreter (as `repro report`) | {result['process']:.2f} s | "
              f"{_mib(result['size'])} |")
        if not args.skip_libraries:
            print("\nPlotting libraries: 10 series x 2,000 points\n")
            print("| library | imports + plots + file | whole process | file size |")
            print("|---|---:|---:|---:|")
            print("\n".join(compare_libraries(work)))
    finally:
        if args.root is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
