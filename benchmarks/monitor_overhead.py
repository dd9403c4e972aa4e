"""CPU overhead of HardwareMonitor's sampling thread; the target is < 1 % of one core at 1 s.

    python benchmarks/monitor_overhead.py [--duration 20] [--intervals 1.0 0.1]

For each interval the monitor runs ``--duration`` seconds in an otherwise idle process, with
real NVML when pynvml and a GPU are present (else CPU-only; the table says which). The thread's
CPU time is measured twice: ``time.thread_time`` inside the thread (``monitor_cpu_seconds`` in the
summary) and the kernel's per-thread user+system time read through psutil from outside, just
before ``stop()`` (the sampling thread is idle in ``Event.wait`` then). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading

import psutil

from repro_core.monitor import MONITOR_THREAD_NAME, HardwareMonitor


def _kernel_thread_cpu(native_id: int | None) -> float:
    """user+system seconds of one thread of this process, as the kernel accounts them."""
    for t in psutil.Process().threads():
        if t.id == native_id:
            return t.user_time + t.system_time
    return float("nan")


def measure(interval: float, duration: float) -> dict[str, object]:
    mon = HardwareMonitor(interval)
    mon.start()
    thread = next(t for t in threading.enumerate() if t.name == MONITOR_THREAD_NAME)
    threading.Event().wait(duration)
    kernel_cpu = _kernel_thread_cpu(thread.native_id)
    summary = mon.stop()
    samples = max(int(summary["sample_count"]), 1)
    cpu_s = float(summary["monitor_cpu_seconds"])
    return {
        "interval": interval, "duration": float(summary["duration_s"]),
        "samples": summary["sample_count"], "gpus": len(summary["gpus"]),
        "cpu_s": cpu_s, "kernel_cpu_s": kernel_cpu,
        "percent": 100.0 * cpu_s / float(summary["duration_s"]),
        "per_sample_ms": 1000.0 * cpu_s / samples,
        "note": "CPU-only (no NVML)" if summary["gpu_error"] else "NVML",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per interval")
    parser.add_argument("--intervals", type=float, nargs="+", default=[1.0])
    args = parser.parse_args()
    rows = [measure(interval, args.duration) for interval in args.intervals]
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"psutil {psutil.__version__}\n")
    print("| interval s | run s | samples | GPUs | thread CPU s | kernel view s (10 ms ticks) "
          "| % of one core | CPU ms / sample | GPU path |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['interval']:g} | {r['duration']:.1f} | {r['samples']} | {r['gpus']} "
              f"| {r['cpu_s']:.4f} | {r['kernel_cpu_s']:.3f} | {r['percent']:.3f} % "
              f"| {r['per_sample_ms']:.3f} | {r['note']} |")


if __name__ == "__main__":
    main()
