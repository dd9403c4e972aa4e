"""What the overhead benchmarks measure the same way."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil


def cpu_seconds() -> float:
    """user + system CPU seconds of this process (every thread) and its live children (the
    W&B service)."""
    total = 0.0
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def run_worker(cmd: list[str], env: dict[str, str], cwd: Path | str, mark: str, label: str,
               *, echo_stderr: bool = False) -> dict[str, Any]:
    """Run one benchmark worker interpreter; its result is the last stdout line starting
    with ``mark`` (JSON). A failing worker ends the benchmark with its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=3600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(mark)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{label} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-3000:]}")
    if echo_stderr:
        print(proc.stderr)
    return json.loads(lines[-1][len(mark):])  # type: ignore[no-any-return]
