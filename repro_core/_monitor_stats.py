"""Bounded memory for :class:`~repro_core.monitor.HardwareMonitor`: running summary statistics
over every sample, and a fixed-size, whole-run record of the samples themselves.

The monitor used to keep every raw sample in a list: at ``interval=1e-9`` it sampled 4,000
times a second into unbounded memory, and even at 5 s a month-long run grows without limit.
Now the summary (mean/max/min/last per metric) is accumulated sample by sample, exact over all
of them whatever is kept, and the kept samples are bounded by decimation: when ``limit`` are
kept, adjacent pairs are merged into one *window* and later samples are merged ``stride`` at a
time, so the record always spans the whole run at uniform resolution. A window is a sample
whose values are the means over its raw samples, plus ``samples`` (how many), and ``min`` and
``max`` dicts, so a spike is never averaged away. Raw samples (nothing merged) are unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["Retained", "Running", "SampleStats"]

Sample = dict[str, Any]


class Running:
    """count/mean/max/min/last of the readings that succeeded (None = a failed reading), in
    O(1) memory; the mean uses Neumaier-compensated summation."""

    __slots__ = ("comp", "count", "hi", "last", "lo", "total")

    def __init__(self) -> None:
        self.count = 0
        self.total = self.comp = 0.0
        self.lo: Any = None
        self.hi: Any = None
        self.last: Any = None

    def add(self, value: Any) -> None:
        if value is None:
            return
        self.count += 1
        total = self.total + value
        if abs(self.total) >= abs(value):
            self.comp += (self.total - total) + value
        else:
            self.comp += (value - total) + self.total
        self.total = total
        self.lo = value if self.lo is None or value < self.lo else self.lo
        self.hi = value if self.hi is None or value > self.hi else self.hi
        self.last = value

    def stats(self) -> dict[str, Any]:
        if not self.count:
            return {"mean": None, "max": None, "min": None, "last": None}
        return {"mean": (self.total + self.comp) / self.count, "max": self.hi, "min": self.lo,
                "last": self.last}


class SampleStats:
    """Running statistics per CPU metric and per GPU metric, over every sample added."""

    def __init__(self, cpu_metrics: Sequence[str], gpu_metrics: Sequence[str]) -> None:
        self.count = 0
        self._cpu_metrics, self._gpu_metrics = tuple(cpu_metrics), tuple(gpu_metrics)
        self.cpu = {m: Running() for m in self._cpu_metrics}
        self.gpus: list[dict[str, Running]] = []

    def add(self, sample: Sample) -> None:
        self.count += 1
        for metric, running in self.cpu.items():
            running.add(sample[metric])
        for i, gpu in enumerate(sample["gpus"]):
            if i == len(self.gpus):
                self.gpus.append({m: Running() for m in
                                  (*self._gpu_metrics, "memory_total_bytes")})
            for metric, running in self.gpus[i].items():
                running.add(gpu[metric])

    def gpu_summary(self, names: Sequence[str | None]) -> list[dict[str, Any]]:
        """Per-GPU stats; GPU ``i`` is ``sample["gpus"][i]`` in every sample (fixed handles)."""
        out = []
        for i, name in enumerate(names):
            stats = self.gpus[i] if i < len(self.gpus) else {}
            total = stats.get("memory_total_bytes", Running()).last
            out.append({"index": i, "name": name, "memory_total_bytes": total,
                        **{m: stats.get(m, Running()).stats() for m in self._gpu_metrics}})
        return out


class Retained:
    """At most ``limit`` samples spanning the whole run (pairs merged when full)."""

    def __init__(self, limit: int, cpu_metrics: Sequence[str],
                 gpu_metrics: Sequence[str]) -> None:
        self.limit, self.stride = limit, 1
        self._metrics = (tuple(cpu_metrics), tuple(gpu_metrics))
        self._kept: list[Sample] = []
        self._partial: Sample | None = None  # the window being filled (stride > 1)

    def add(self, sample: Sample) -> None:
        if self.stride == 1:
            self._kept.append(sample)
        else:
            self._partial = sample if self._partial is None else self._merge(self._partial,
                                                                             sample)
            if self._partial.get("samples", 1) >= self.stride:
                self._kept.append(self._partial)
                self._partial = None
        if len(self._kept) >= self.limit:
            kept = self._kept
            self._kept = [self._merge(kept[i], kept[i + 1]) if i + 1 < len(kept) else kept[i]
                          for i in range(0, len(kept), 2)]
            self.stride *= 2

    def snapshot(self) -> list[Sample]:
        return self._kept + ([self._partial] if self._partial is not None else [])

    def _merge(self, a: Sample, b: Sample) -> Sample:
        na, nb = a.get("samples", 1), b.get("samples", 1)
        cpu, gpu = self._metrics
        out: Sample = {"t": a["t"], "time": a["time"], "samples": na + nb}
        _merge_values(out, a, b, cpu, na, nb)
        out["gpus"] = []
        for ga, gb in zip(a["gpus"], b["gpus"], strict=False):
            merged: Sample = {"index": ga["index"],
                              "memory_total_bytes": _last(ga["memory_total_bytes"],
                                                          gb["memory_total_bytes"])}
            _merge_values(merged, ga, gb, gpu, na, nb)
            out["gpus"].append(merged)
        return out


def _merge_values(out: Sample, a: Sample, b: Sample, metrics: Sequence[str], na: int,
                  nb: int) -> None:
    """Weighted means into ``out``, and the extremes (a window's own, or its raw value)."""
    lows, highs = {}, {}
    for m in metrics:
        va, vb = a[m], b[m]
        if va is None or vb is None:
            out[m] = va if vb is None else vb
        else:
            out[m] = (va * na + vb * nb) / (na + nb)
        lows[m] = _pick(min, a.get("min", {}).get(m, va), b.get("min", {}).get(m, vb))
        highs[m] = _pick(max, a.get("max", {}).get(m, va), b.get("max", {}).get(m, vb))
    out["min"], out["max"] = lows, highs


def _pick(choose: Any, x: Any, y: Any) -> Any:
    if x is None or y is None:
        return x if y is None else y
    return choose(x, y)


def _last(x: Any, y: Any) -> Any:
    return x if y is None else y
