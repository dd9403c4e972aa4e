"""What the overhead benchmarks measure the same way."""

from __future__ import annotations

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
