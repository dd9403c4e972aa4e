"""Time ``capture_environment`` at each level (the issue's budget: STANDARD < 1 s).

    python benchmarks/capture_env.py [--repeat 9] [--path /some/git/repo] [--import-torch]

Each level runs in a fresh interpreter so its first call is cold (imports, file cache of the
package metadata), then ``--repeat`` more times in the same process; the table shows the first
call and the median / min of the repeats. ``--import-torch`` imports torch before timing (what a
training script looks like: the ``cuda``/``determinism`` sections are then filled at no extra
cost); without it BASIC/STANDARD never import torch and COMPLETE's first call pays its import.
Timings are printed, never asserted (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

_CHILD = """
import json, sys, time
if {import_torch}:
    import torch  # noqa: F401
t0 = time.perf_counter()
from repro_core.capture import capture_environment
import_s = time.perf_counter() - t0
times = []
for _ in range({repeat} + 1):
    t0 = time.perf_counter()
    env = capture_environment({level}, path={path!r})
    times.append(time.perf_counter() - t0)
print(json.dumps({{"import_s": import_s, "times": times, "packages": len(env.get("packages", {{}})),
                   "torch_loaded": "torch" in sys.modules}}))
"""


def time_level(level: int, repeat: int, path: str, import_torch: bool) -> dict[str, float]:
    """Run one level in a fresh interpreter and return its timings in seconds."""
    code = _CHILD.format(level=level, repeat=repeat, path=path, import_torch=import_torch)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    result = json.loads(out)
    first, rest = result["times"][0], result["times"][1:]
    return {
        "import": result["import_s"], "first": first, "median": statistics.median(rest),
        "min": min(rest), "packages": result["packages"], "torch": result["torch_loaded"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="timed calls after the first")
    parser.add_argument("--path", default=".", help="directory whose git state is captured")
    parser.add_argument("--import-torch", action="store_true",
                        help="import torch before timing, as a training script would have")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    started = time.perf_counter()
    print(f"torch imported first: {args.import_torch}; repeats: {args.repeat}\n")
    print("| level | import capture (s) | first call (s) | median (s) | min (s) | packages "
          "| torch in sys.modules |")
    print("|---|---|---|---|---|---|---|")
    for level, name in ((1, "BASIC"), (2, "STANDARD"), (3, "COMPLETE")):
        t = time_level(level, args.repeat, args.path, args.import_torch)
        print(f"| {name} | {t['import']:.3f} | {t['first']:.3f} | {t['median']:.3f} "
              f"| {t['min']:.3f} | {t['packages']} | {t['torch']} |")
    print(f"\ntotal wall time {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
