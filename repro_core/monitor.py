"""Background sampling of CPU, memory and (through NVML) GPUs while a run trains.

Three defects of the original this module exists to avoid:

- ``stop()`` returned while the sampling thread still ran: here ``stop()`` joins the thread, so a
  summary is final and nothing samples after it.
- The first CPU sample was always 0.0 (psutil's ``cpu_percent(None)`` has no baseline on its first
  call): here ``start()`` takes a baseline of ``cpu_times`` and every sample is a delta against
  the previous reading over a real interval. Our own baseline also means no other caller of
  ``psutil.cpu_percent`` in the process can shift our numbers.
- Raw samples were discarded: here they stay in :attr:`HardwareMonitor.samples` and
  :meth:`HardwareMonitor.write_jsonl` exports them (``runs/<id>/hardware.jsonl``).

Memory is bounded: ``interval`` may not be below ``MIN_INTERVAL_S`` (0.05 s; ``1e-9`` sampled
4,000 times a second, measuring only the 10 ms tick noise of CPU times and burning a core), and
at most ``max_samples`` samples are kept, decimated to span the whole run (see
:mod:`repro_core._monitor_stats`); the summary stays exact over every sample taken.

pynvml is imported in ``start()``, never at import time. A machine without pynvml or without a
GPU gets CPU-only stats and a ``gpu_error`` note, never an exception: monitoring must not fail
the user's training.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from . import _fsio
from ._monitor_stats import Retained, SampleStats
from .errors import InvalidArgumentError, RunStateError

__all__ = ["CPU_METRICS", "GPU_METRICS", "MAX_SAMPLES", "MIN_INTERVAL_S", "MONITOR_THREAD_NAME",
           "HardwareMonitor"]

Sample = dict[str, Any]

MONITOR_THREAD_NAME = "repro-hardware-monitor"
CPU_METRICS = ("cpu_percent", "process_cpu_percent", "process_rss_bytes", "memory_percent",
               "memory_used_bytes")
GPU_METRICS = ("utilization_percent", "memory_used_bytes", "power_watts", "temperature_c")
# A hung NVML call (wedged driver) must not hang the user's finalize forever.
_JOIN_TIMEOUT_S = 30.0
# The tail sample at stop() is skipped when shorter than this: CPU times tick every 10 ms, so a
# few-ms interval would give a noise figure, not a measurement.
_MIN_TAIL_S = 0.1
# Below this a sample measures CPU-time tick noise, not load, and the thread costs a core.
MIN_INTERVAL_S = 0.05
MAX_SAMPLES = 10_000  # kept samples (the summary covers all); 14 h at 5 s before decimating


def _validate_interval(interval: object) -> float:
    """Reject what would make the thread spin (0, tiny, NaN) or never sample (inf)."""
    ok = isinstance(interval, int | float) and not isinstance(interval, bool)
    if not ok or not math.isfinite(interval) or interval < MIN_INTERVAL_S:  # type: ignore
        raise InvalidArgumentError(
            f"interval must be a finite number of seconds >= {MIN_INTERVAL_S}; got "
            f"{interval!r}. Use e.g. HardwareMonitor(interval=5.0).", argument="interval")
    return float(interval)  # type: ignore[arg-type]


def _validate_max_samples(max_samples: object) -> int:
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 2:
        raise InvalidArgumentError(f"max_samples must be an int >= 2; got {max_samples!r}",
                                   argument="max_samples")
    return max_samples


def _percent(part: float, whole: float, cap: float | None = None) -> float | None:
    """``part/whole`` in percent, or None when nothing elapsed (no measurement, not a fake 0)."""
    if whole <= 0:
        return None
    value = max(part / whole * 100.0, 0.0)
    return round(min(value, cap) if cap is not None else value, 2)


class _CpuSampler:
    """CPU and memory figures, CPU from ``cpu_times`` deltas against the previous reading."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._last = self._read()  # the baseline that makes the first sample real

    def _read(self) -> tuple[float, float, float, float]:
        times = psutil.cpu_times()
        # As psutil does: guest time is already counted in user time on Linux.
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        busy = total - times.idle - getattr(times, "iowait", 0.0)
        proc = self._proc.cpu_times()
        return time.monotonic(), busy, total, proc.user + proc.system

    def sample(self) -> Sample:
        prev, now = self._last, self._read()
        self._last = now
        mem = psutil.virtual_memory()
        return {
            "cpu_percent": _percent(now[1] - prev[1], now[2] - prev[2], cap=100.0),
            # Like psutil's Process.cpu_percent: may exceed 100 with several busy threads.
            "process_cpu_percent": _percent(now[3] - prev[3], now[0] - prev[0]),
            "process_rss_bytes": self._proc.memory_info().rss,
            "memory_percent": mem.percent,
            "memory_used_bytes": mem.used,
        }


class _Nvml:
    """The NVML calls we sample, each guarded so one failing metric never loses the others."""

    def __init__(self, module: Any) -> None:
        self._nv = module
        self._error: type[BaseException] = getattr(module, "NVMLError", Exception)
        self.errors = 0
        self.last_error: str | None = None
        module.nvmlInit()
        try:
            count = module.nvmlDeviceGetCount()
            self._handles = [module.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except BaseException:
            module.nvmlShutdown()  # nvmlInit is reference-counted: balance it
            raise
        self.names = [self._name(h) for h in self._handles]

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._error as exc:
            self.errors += 1
            self.last_error = f"{getattr(fn, '__name__', fn)}: {exc}"
            return None

    def _name(self, handle: Any) -> str | None:
        name = self._call(self._nv.nvmlDeviceGetName, handle)
        return name.decode() if isinstance(name, bytes) else name

    def sample(self) -> list[Sample]:
        return [self._sample_one(i, h) for i, h in enumerate(self._handles)]

    def _sample_one(self, index: int, handle: Any) -> Sample:
        nv = self._nv
        util = self._call(nv.nvmlDeviceGetUtilizationRates, handle)
        mem = self._call(nv.nvmlDeviceGetMemoryInfo, handle)
        milliwatts = self._call(nv.nvmlDeviceGetPowerUsage, handle)
        sensor = getattr(nv, "NVML_TEMPERATURE_GPU", 0)
        return {
            "index": index,
            "utilization_percent": None if util is None else util.gpu,
            "memory_used_bytes": None if mem is None else mem.used,
            "memory_total_bytes": None if mem is None else mem.total,
            "power_watts": None if milliwatts is None else milliwatts / 1000.0,
            "temperature_c": self._call(nv.nvmlDeviceGetTemperature, handle, sensor),
        }

    def close(self) -> None:
        with contextlib.suppress(self._error):
            self._nv.nvmlShutdown()


def _open_nvml(module: Any) -> tuple[_Nvml | None, str | None]:
    """NVML when it works, else ``(None, why)``: a CPU-only machine is normal, not an error."""
    if module is None:
        try:
            module = importlib.import_module("pynvml")
        except ImportError:
            return None, ("pynvml is not installed (pip install 'repro-lightning[nvml]'); "
                          "CPU-only stats")
    try:
        return _Nvml(module), None
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, a broken fake, ...
        return None, f"NVML unavailable ({type(exc).__name__}: {exc}); CPU-only stats"


@dataclass
class _Session:
    """State of one start()..stop(); a fresh one per start() so a restart never mixes runs."""

    cpu: _CpuSampler | None = None  # None: the never-started placeholder stop() summarises
    nvml: _Nvml | None = None
    gpu_error: str | None = None
    t0: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    stop_event: threading.Event = field(default_factory=threading.Event)
    # Per session, so a thread stuck past stop()'s join timeout can never write into the next one.
    kept: Retained = field(default_factory=lambda: Retained(MAX_SAMPLES, CPU_METRICS,
                                                            GPU_METRICS))
    stats: SampleStats = field(default_factory=lambda: SampleStats(CPU_METRICS, GPU_METRICS))
    last_t: float = 0.0
    duration_s: float = 0.0
    callback_errors: int = 0
    sample_errors: int = 0
    last_error: str | None = None
    thread_cpu_s: float = 0.0


class HardwareMonitor:
    """Monitor hardware usage during experiments, in a daemon thread every ``interval`` seconds.

    ``start()`` begins a fresh recording (samples of a previous one are dropped: write them out
    first); ``stop()`` joins the thread and returns the summary. ``nvml_module`` replaces
    ``pynvml`` (tests inject a fake); ``on_sample(sample)`` is called from the sampling thread
    with a copy of every sample, and an exception in it is counted, never fatal. At most
    ``max_samples`` samples are kept (older ones merged into windows, see
    :mod:`repro_core._monitor_stats`); the summary covers every sample. Usable as a context
    manager.
    """

    def __init__(self, interval: float = 5.0, *, nvml_module: Any = None,
                 on_sample: Callable[[Sample], object] | None = None,
                 max_samples: int = MAX_SAMPLES) -> None:
        self.interval = _validate_interval(interval)
        self.max_samples = _validate_max_samples(max_samples)
        if on_sample is not None and not callable(on_sample):
            raise InvalidArgumentError(f"on_sample must be callable; got {on_sample!r}",
                                       argument="on_sample")
        self._nvml_module = nvml_module
        self._on_sample = on_sample
        self._lifecycle = threading.Lock()  # serialises start/stop
        self._lock = threading.Lock()  # guards the session's samples list
        self._thread: threading.Thread | None = None
        self._session = _Session()  # placeholder until start(): no samples, never started
        self._summary: dict[str, Any] | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def samples(self) -> list[Sample]:
        """The kept samples so far, oldest first (a new list; treat the dicts as read-only):
        every raw sample until ``max_samples``, then windows spanning the whole run."""
        with self._lock:
            return self._session.kept.snapshot()

    def start(self) -> None:
        """Start monitoring in a background thread; does nothing if already running."""
        with self._lifecycle:
            if self._thread is not None:
                return
            nvml, gpu_error = _open_nvml(self._nvml_module)
            session = _Session(cpu=_CpuSampler(), nvml=nvml, gpu_error=gpu_error,
                               started_at=time.time(),
                               kept=Retained(self.max_samples, CPU_METRICS, GPU_METRICS))
            session.last_t = session.t0
            self._session, self._summary = session, None
            self._thread = threading.Thread(target=self._run, args=(session,),
                                            name=MONITOR_THREAD_NAME, daemon=True)
            self._thread.start()

    def stop(self) -> dict[str, Any]:
        """Stop monitoring, wait for the thread to end and return summary stats (idempotent)."""
        if threading.current_thread() is self._thread:
            # Joining ourselves would deadlock; reaching this from on_sample is a caller bug.
            raise RunStateError("HardwareMonitor.stop() was called from its own sampling thread "
                                "(on_sample); call it from another thread.")
        with self._lifecycle:
            thread, session = self._thread, self._session
            if thread is not None:
                session.stop_event.set()
                thread.join(_JOIN_TIMEOUT_S)
                session.duration_s = time.monotonic() - session.t0
                self._thread = None
                if thread.is_alive():  # still inside a hung NVML call: leave NVML to it
                    session.last_error = f"sampling thread still busy after {_JOIN_TIMEOUT_S} s"
                elif session.nvml is not None:
                    session.nvml.close()
            if self._summary is None:  # first stop() since start(), or never started
                self._summary = self._summarize(session)
            return copy.deepcopy(self._summary)

    def __enter__(self) -> HardwareMonitor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def write_jsonl(self, path: str | os.PathLike[str]) -> Path:
        """Write the samples as JSON lines, atomically (a reader never sees half a file)."""
        target = Path(path)
        data = "".join(json.dumps(s, allow_nan=False, separators=(",", ":")) + "\n"
                       for s in self.samples).encode()
        return _fsio.write_file_atomic(target, data)

    # -- sampling thread ---------------------------------------------------------------------

    def _run(self, session: _Session) -> None:
        cpu_start = time.thread_time()
        try:
            while not session.stop_event.wait(self.interval):
                self._record(session)
            if time.monotonic() - session.last_t >= min(self.interval, _MIN_TAIL_S):
                self._record(session)  # the tail since the last tick: short runs get a sample
        finally:
            session.thread_cpu_s = time.thread_time() - cpu_start

    def _record(self, session: _Session) -> None:
        try:
            assert session.cpu is not None  # set by start() for every real session
            now = time.monotonic()
            sample: Sample = {"t": round(now - session.t0, 6), "time": time.time(),
                              **session.cpu.sample(),
                              "gpus": session.nvml.sample() if session.nvml else []}
            session.last_t = now
        except Exception as exc:  # a psutil/NVML surprise must not end monitoring for the run
            session.sample_errors += 1
            session.last_error = f"{type(exc).__name__}: {exc}"
            return
        with self._lock:
            session.stats.add(sample)
            session.kept.add(sample)
        if self._on_sample is not None:
            try:
                self._on_sample({**sample, "gpus": [dict(g) for g in sample["gpus"]]})
            except Exception:  # the user's callback must not kill sampling
                session.callback_errors += 1

    def _summarize(self, session: _Session) -> dict[str, Any]:
        nvml = session.nvml
        with self._lock:
            stats, kept = session.stats, session.kept
            return {
                "interval_s": self.interval,
                "sample_count": stats.count,
                "kept_samples": len(kept.snapshot()),
                "samples_per_kept": kept.stride,
                "duration_s": session.duration_s,
                "started_at": session.started_at,
                **{m: stats.cpu[m].stats() for m in CPU_METRICS},
                "gpus": stats.gpu_summary(nvml.names if nvml else []),
                **self._health(session),
            }

    def _health(self, session: _Session) -> dict[str, Any]:
        nvml = session.nvml
        return {
            "gpu_error": session.gpu_error,
            "nvml_errors": nvml.errors if nvml else 0,
            "callback_errors": session.callback_errors,
            "sample_errors": session.sample_errors,
            "last_error": session.last_error or (nvml.last_error if nvml else None),
            "monitor_cpu_seconds": session.thread_cpu_s,
            "monitor_cpu_percent": _percent(session.thread_cpu_s, session.duration_s),
        }
