"""HardwareMonitor: real psutil samples at short intervals; a fake NVML module for the GPU path."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from repro_core import monitor as monitor_module
from repro_core.errors import InvalidArgumentError
from repro_core.monitor import CPU_METRICS, GPU_METRICS, MONITOR_THREAD_NAME, HardwareMonitor

FAST = 0.05  # seconds between samples in these tests
GiB = 1 << 30


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


class FakeNvml:
    """Just the pynvml surface the monitor uses; GPU i reports values derived from i."""

    NVML_TEMPERATURE_GPU = 0
    NVMLError = FakeNVMLError

    def __init__(self, gpus: int = 2, *, fail: set[tuple[str, int]] | None = None,
                 init_error: Exception | None = None) -> None:
        self.gpus, self.fail, self.init_error = gpus, fail or set(), init_error
        self.init_calls = self.shutdown_calls = 0
        self.temp_calls = [0] * gpus

    def _check(self, metric: str, handle: tuple[str, int]) -> int:
        if (metric, handle[1]) in self.fail:
            raise FakeNVMLError(f"{metric} not supported on GPU {handle[1]}")
        return handle[1]

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.init_calls += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1

    def nvmlDeviceGetCount(self) -> int:
        return self.gpus

    def nvmlDeviceGetHandleByIndex(self, i: int) -> tuple[str, int]:
        return ("handle", i)

    def nvmlDeviceGetName(self, h: tuple[str, int]) -> bytes:
        return f"Fake H200 #{h[1]}".encode()  # old pynvml returns bytes

    def nvmlDeviceGetUtilizationRates(self, h: tuple[str, int]) -> SimpleNamespace:
        return SimpleNamespace(gpu=10 + 30 * self._check("util", h), memory=5)

    def nvmlDeviceGetMemoryInfo(self, h: tuple[str, int]) -> SimpleNamespace:
        i = self._check("memory", h)
        return SimpleNamespace(used=(i + 1) * GiB, total=80 * GiB, free=(79 - i) * GiB)

    def nvmlDeviceGetPowerUsage(self, h: tuple[str, int]) -> int:
        return 150_000 + 100_000 * self._check("power", h)  # milliwatts

    def nvmlDeviceGetTemperature(self, h: tuple[str, int], sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        i = self._check("temperature", h)
        self.temp_calls[i] += 1
        return 40 + i + self.temp_calls[i] - 1  # rises by 1 C per reading


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def monitor_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == MONITOR_THREAD_NAME]


def cpu_only_monitor(interval: float = FAST, **kwargs: Any) -> HardwareMonitor:
    return HardwareMonitor(interval, nvml_module=FakeNvml(gpus=0), **kwargs)


def test_first_cpu_sample_is_measured_over_a_real_interval() -> None:
    mon = cpu_only_monitor(0.2)
    mon.start()
    burn(0.5)  # busy in this thread: the process used CPU during the very first interval
    summary = mon.stop()
    first = mon.samples[0]
    assert first["process_cpu_percent"] > 0  # the seed's first sample was always 0.0
    assert first["cpu_percent"] is not None and first["cpu_percent"] > 0
    assert summary["process_cpu_percent"]["mean"] > 0
    assert summary["sample_count"] >= 2
    assert first["process_rss_bytes"] > 1 << 20 and first["memory_used_bytes"] > 0
    ts = [s["t"] for s in mon.samples]
    assert ts == sorted(ts) and ts[0] > 0.1  # first sample one interval after start
    assert all(abs(s["time"] - time.time()) < 60 for s in mon.samples)


def test_stop_joins_the_thread_promptly() -> None:
    mon = HardwareMonitor(30.0, nvml_module=FakeNvml(gpus=0))
    mon.start()
    assert len(monitor_threads()) == 1 and mon.running
    began = time.monotonic()
    mon.stop()
    assert time.monotonic() - began < 5.0  # Event.wait, not sleep(30)
    assert monitor_threads() == [] and not mon.running


def test_summary_matches_the_raw_samples() -> None:
    mon = cpu_only_monitor()
    mon.start()
    wait_for(lambda: len(mon.samples) >= 4)
    summary = mon.stop()
    samples = mon.samples
    assert summary["sample_count"] == len(samples) >= 4
    assert summary["duration_s"] >= samples[-1]["t"] > 0
    for metric in CPU_METRICS:
        values = [s[metric] for s in samples if s[metric] is not None]
        stats = summary[metric]
        assert stats["mean"] == pytest.approx(sum(values) / len(values))
        assert (stats["max"], stats["min"], stats["last"]) == (max(values), min(values),
                                                               values[-1])
    assert summary["monitor_cpu_seconds"] >= 0 and summary["gpus"] == []
    json.dumps(summary, allow_nan=False)  # goes into the registry as JSON as it is


def test_start_is_idempotent_and_restart_cycles_are_safe() -> None:
    fake = FakeNvml(gpus=1)
    mon = HardwareMonitor(FAST, nvml_module=fake)
    for cycle in range(5):
        mon.start()
        mon.start()  # already running: no second thread
        assert len(monitor_threads()) == 1
        wait_for(lambda: len(mon.samples) >= 1)
        summary = mon.stop()
        assert monitor_threads() == [], cycle
        assert summary["sample_count"] == len(mon.samples) >= 1
        assert summary["gpus"][0]["name"] == "Fake H200 #0"
    assert fake.init_calls == fake.shutdown_calls == 5  # NVML init/shutdown balanced per cycle


def test_stop_without_start_and_stop_twice() -> None:
    mon = cpu_only_monitor()
    empty = mon.stop()
    assert empty["sample_count"] == 0 and empty["duration_s"] == 0.0
    assert empty["cpu_percent"] == {"mean": None, "max": None, "min": None, "last": None}
    mon.start()
    wait_for(lambda: len(mon.samples) >= 2)
    first = mon.stop()
    second = mon.stop()
    assert second == first and first["sample_count"] >= 2
    second["sample_count"] = -1  # callers get copies, not the monitor's own dict
    assert mon.stop()["sample_count"] == first["sample_count"]


def test_failing_nvml_init_gives_cpu_only_stats_with_a_note() -> None:
    fake = FakeNvml(init_error=FakeNVMLError("NVML Shared Library Not Found"))
    mon = HardwareMonitor(FAST, nvml_module=fake)
    mon.start()
    wait_for(lambda: len(mon.samples) >= 1)
    summary = mon.stop()
    assert "NVML Shared Library Not Found" in summary["gpu_error"]
    assert summary["gpus"] == [] and mon.samples[0]["gpus"] == []
    assert summary["cpu_percent"]["mean"] is not None


def test_missing_pynvml_gives_cpu_only_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    mon = HardwareMonitor(FAST)
    mon.start()
    summary = mon.stop()
    assert "pip install 'repro-lightning[nvml]'" in summary["gpu_error"]
    assert summary["gpus"] == [] and monitor_threads() == []


def test_two_fake_gpus_give_per_gpu_stats() -> None:
    fake = FakeNvml(gpus=2)
    mon = HardwareMonitor(FAST, nvml_module=fake)
    mon.start()
    wait_for(lambda: len(mon.samples) >= 3)
    summary = mon.stop()
    n = summary["sample_count"]
    assert summary["gpu_error"] is None and summary["nvml_errors"] == 0
    assert fake.shutdown_calls == 1
    assert [g["name"] for g in summary["gpus"]] == ["Fake H200 #0", "Fake H200 #1"]
    for i, gpu in enumerate(summary["gpus"]):
        assert gpu["index"] == i and gpu["memory_total_bytes"] == 80 * GiB
        assert set(GPU_METRICS) <= set(gpu) and set(GPU_METRICS) <= set(mon.samples[0]["gpus"][i])
        const = {"utilization_percent": 10 + 30 * i, "memory_used_bytes": (i + 1) * GiB,
                 "power_watts": 150.0 + 100.0 * i}
        for metric, value in const.items():
            assert gpu[metric] == {"mean": value, "max": value, "min": value, "last": value}
        assert gpu["temperature_c"] == {"mean": 40 + i + (n - 1) / 2, "max": 40 + i + n - 1,
                                        "min": 40 + i, "last": 40 + i + n - 1}
    assert mon.samples[0]["gpus"][1]["power_watts"] == 250.0


def test_nvml_error_on_one_metric_is_recorded_as_none() -> None:
    mon = HardwareMonitor(FAST, nvml_module=FakeNvml(gpus=2, fail={("power", 1)}))
    mon.start()
    wait_for(lambda: len(mon.samples) >= 2)
    summary = mon.stop()
    for sample in mon.samples:
        assert sample["gpus"][1]["power_watts"] is None
        assert sample["gpus"][0]["power_watts"] == 150.0
        assert sample["gpus"][1]["temperature_c"] is not None
    gpu1 = summary["gpus"][1]
    assert gpu1["power_watts"]["mean"] is None
    assert gpu1["utilization_percent"]["last"] == 40
    assert summary["nvml_errors"] == summary["sample_count"]
    assert "not supported on GPU 1" in summary["last_error"]


def test_raising_on_sample_callback_does_not_stop_sampling() -> None:
    seen: list[dict[str, Any]] = []

    def callback(sample: dict[str, Any]) -> None:
        seen.append(sample)
        sample["cpu_percent"] = "mutated"  # must not reach the monitor's own samples
        raise RuntimeError("user bug")

    mon = cpu_only_monitor(on_sample=callback)
    mon.start()
    wait_for(lambda: len(mon.samples) >= 3)
    summary = mon.stop()
    assert len(seen) == len(mon.samples) == summary["sample_count"] >= 3
    assert summary["callback_errors"] == len(seen)
    assert all(s["cpu_percent"] != "mutated" for s in mon.samples)


def test_write_jsonl_round_trip(tmp_path: Path) -> None:
    mon = HardwareMonitor(FAST, nvml_module=FakeNvml(gpus=2))
    mon.start()
    wait_for(lambda: len(mon.samples) >= 3)
    mon.stop()
    target = tmp_path / "runs" / "r1" / "hardware.jsonl"
    target.parent.mkdir(parents=True)
    target.write_text("stale\n")
    assert mon.write_jsonl(target) == target
    lines = target.read_text().splitlines()
    assert [json.loads(line) for line in lines] == mon.samples
    assert list(target.parent.iterdir()) == [target]  # temp file replaced, none left behind
    assert HardwareMonitor(1.0).write_jsonl(tmp_path / "empty.jsonl").read_bytes() == b""


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, "5", None, True, 1e-9, 0.049])
def test_bad_interval_is_rejected(bad: Any) -> None:
    """1e-9 was accepted and sampled 4,000 times a second into unbounded memory."""
    with pytest.raises(InvalidArgumentError) as info:
        HardwareMonitor(bad)
    assert info.value.argument == "interval" and repr(bad) in str(info.value)
    assert HardwareMonitor(monitor_module.MIN_INTERVAL_S).interval == 0.05  # the floor itself


@pytest.mark.parametrize("bad", [1, 0, 2.5, True, None])
def test_bad_max_samples_is_rejected(bad: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="max_samples"):
        HardwareMonitor(1.0, max_samples=bad)


def test_kept_samples_are_bounded_and_the_summary_covers_every_sample() -> None:
    seen: list[dict[str, Any]] = []
    mon = HardwareMonitor(FAST, nvml_module=FakeNvml(gpus=1), on_sample=seen.append,
                          max_samples=4)
    mon.start()
    wait_for(lambda: len(seen) >= 21, timeout=30)
    summary = mon.stop()
    kept = mon.samples
    assert summary["sample_count"] == len(seen) >= 21
    assert len(kept) <= 4 and summary["kept_samples"] == len(kept)
    assert sum(s.get("samples", 1) for s in kept) == len(seen)  # each sample in one window
    assert [s["t"] for s in kept] == sorted(s["t"] for s in kept) and kept[0]["t"] == seen[0]["t"]
    for metric in CPU_METRICS:
        values = [s[metric] for s in seen if s[metric] is not None]
        stats = summary[metric]
        assert stats["mean"] == pytest.approx(sum(values) / len(values))
        assert (stats["max"], stats["min"], stats["last"]) == (max(values), min(values),
                                                               values[-1])
        # windows keep the extremes: nothing is averaged away
        assert max(s.get("max", s)[metric] for s in kept) == max(values)
        assert min(s.get("min", s)[metric] for s in kept) == min(values)
    temps = [s["gpus"][0]["temperature_c"] for s in seen]  # rises 1 C per reading
    assert summary["gpus"][0]["temperature_c"] == {
        "mean": pytest.approx(sum(temps) / len(temps)), "max": max(temps), "min": min(temps),
        "last": temps[-1]}
    assert max(s["gpus"][0].get("max", s["gpus"][0])["temperature_c"] for s in kept) == \
        max(temps)
    json.dumps(kept, allow_nan=False)  # hardware.jsonl still takes them


def test_context_manager_and_stop_from_the_callback_is_refused() -> None:
    errors: list[BaseException] = []

    def callback(sample: dict[str, Any]) -> None:
        try:
            mon.stop()  # would join its own thread: refused, and sampling goes on
        except Exception as exc:
            errors.append(exc)

    with HardwareMonitor(FAST, nvml_module=FakeNvml(gpus=0), on_sample=callback) as mon:
        wait_for(lambda: len(mon.samples) >= 2)
        assert mon.running
    assert not mon.running and monitor_threads() == []
    assert errors and all(type(e).__name__ == "RunStateError" for e in errors)


def test_hung_nvml_call_does_not_hang_stop_or_leak_into_a_restart(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(monitor_module, "_JOIN_TIMEOUT_S", 0.2)
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []

    def power(handle: tuple[str, int]) -> int:
        calls.append(1)
        if len(calls) == 1:  # the first reading hangs like a wedged driver, then says 999 W
            entered.set()
            release.wait(10)
            return 999_000
        return 1000

    fake = FakeNvml(gpus=1)
    fake.nvmlDeviceGetPowerUsage = power  # type: ignore[method-assign,assignment]
    mon = HardwareMonitor(FAST, nvml_module=fake)
    mon.start()
    assert entered.wait(5)
    summary = mon.stop()  # returns after the join timeout instead of hanging
    assert "still busy" in summary["last_error"] and fake.shutdown_calls == 0
    mon.start()
    release.set()  # the stale thread now finishes its sample: it must land in the old session
    wait_for(lambda: len(monitor_threads()) == 1 and len(mon.samples) >= 2)
    mon.stop()
    assert monitor_threads() == []
    assert {s["gpus"][0]["power_watts"] for s in mon.samples} == {1.0}


def test_import_does_not_load_pynvml() -> None:
    code = "import sys, repro_core.monitor; print('pynvml' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "False"
