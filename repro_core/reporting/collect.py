"""Read what a report shows from a store: the run rows, the environment a run logged, its
artifacts (and which of their blobs are gone), its metrics split into training series and
hardware samples.

Read-only throughout: the registry is opened read-only and blobs are only looked at, so a
report can be made of an archived (``chmod -R a-w``) store, or of one another process is
still writing. A store is untrusted input: whatever cannot be read (a missing or corrupt
blob, a damaged row) becomes a line in ``RunData.problems`` and the report still renders —
only an unknown run or a missing store stop it, as in every other command.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import numpy as np

from ..errors import ReproError
from ..metrics import read_metrics
from ..registry import Registry, RunRow, VersionRow
from ..store.local import LocalStorageBackend
from .records import ArtifactRow, RunData, Series
from .ttrl_data import collect_ttrl

__all__ = ["HARDWARE_PREFIX", "collect_run"]

HARDWARE_PREFIX = "hardware/"  # ExperimentContext stores monitor samples as these series
_CLOCKS = ("hardware/t", "hardware/time")  # the samples' clocks: axes, not measurements
_T = TypeVar("_T")


def collect_run(registry: Registry, store: LocalStorageBackend, run: RunRow) -> RunData:
    """Everything about ``run`` (a row from ``registry.get_run``: its id is the full one)."""
    problems: list[str] = []

    def attempt(what: str, read: Callable[[], _T], fallback: _T) -> _T:
        try:
            return read()
        except (ReproError, OSError, ValueError) as exc:  # a damaged store: say so, go on
            problems.append(f"{what}: {exc}")
            return fallback

    states: list[tuple[str, str, str | None]] = attempt(
        "state history", lambda: registry.run_state_history(run.id), [])
    outputs: list[VersionRow] = attempt("outputs", lambda: registry.outputs_of(run.id), [])
    inputs: list[VersionRow] = attempt("inputs", lambda: registry.inputs_of(run.id), [])
    artifacts: list[ArtifactRow] = attempt(
        "artifacts", lambda: _artifacts(registry, store, outputs, inputs), [])
    environment = _environment(store, outputs, problems)
    series: dict[str, list[tuple[int, float, float]]] = attempt(
        "metrics", lambda: read_metrics(registry, run.id), {})
    metrics = {k: _by_step(points) for k, points in series.items()
               if not k.startswith(HARDWARE_PREFIX)}
    hardware = _hardware(series, _start_time(run))
    checkpoints = [v for v in outputs if v.type == "checkpoint"]
    ttrl = attempt("online updates", lambda: collect_ttrl(registry, run.id, checkpoints), None)
    return RunData(run=run, states=states, environment=environment, metrics=metrics,
                   hardware=hardware, ttrl=ttrl, artifacts=artifacts, problems=problems)


# -- artifacts ------------------------------------------------------------------------------


def _artifacts(registry: Registry, store: LocalStorageBackend, outputs: list[VersionRow],
               inputs: list[VersionRow]) -> list[ArtifactRow]:
    stored = registry.new_bytes([v.id for v in outputs if v.pruned_at is None])
    rows = []
    for role, versions in (("output", outputs), ("input", inputs)):
        for v in versions:
            pruned = v.pruned_at is not None
            rows.append(ArtifactRow(
                role=role, key=v.key, type=v.type, size=v.size,
                stored_bytes=stored.get(v.id) if role == "output" else None,
                digest=v.digest, aliases=registry.aliases_of(v.id), pruned=pruned,
                # a pruned version's blobs are gone on purpose: not "missing"
                missing=[] if pruned else _missing_blobs(registry, store, v)))
    return rows


def _missing_blobs(registry: Registry, store: LocalStorageBackend, v: VersionRow) -> list[str]:
    """The digests of the blobs ``v`` needs that the store does not hold (a forged digest
    counts as missing: no blob can be found under it)."""
    missing = []
    for digest, _size in registry.blobs_of(v.id):
        try:
            present = store.exists(digest)
        except (ReproError, ValueError):
            present = False
        if not present:
            missing.append(digest)
    return missing


def _environment(store: LocalStorageBackend, outputs: list[VersionRow],
                 problems: list[str]) -> dict[str, Any] | None:
    """The ``environment`` artifact the run logged (as ``repro diff`` reads it), checked
    against its digest: it is small, and a forged one must not pose as the run's."""
    logged = [v for v in outputs if v.name == "environment" and v.format == "json"]
    if not logged:
        return None
    v = logged[-1]
    try:
        path = store.check(v.digest, v.size, full=True, identity=False)
        env = json.loads(path.read_bytes())
    except (ReproError, OSError, ValueError, RecursionError) as exc:
        problems.append(f"environment ({v.key}): {exc}")
        return None
    if not isinstance(env, dict):
        problems.append(f"environment ({v.key}) is not a JSON object")
        return None
    return env


# -- metrics --------------------------------------------------------------------------------


def _by_step(points: list[tuple[int, float, float]]) -> Series:
    """A series ordered by step (a resumed run's segments may interleave in storage). Steps
    stay int64: as floats, steps past 2**53 would merge."""
    n = len(points)
    steps = np.fromiter((p[0] for p in points), dtype=np.int64, count=n)
    values = np.fromiter((p[1] for p in points), dtype=np.float64, count=n)
    if n > 1 and bool((steps[1:] < steps[:-1]).any()):
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
    return Series(x=steps, y=values)


def _hardware(series: dict[str, list[tuple[int, float, float]]], start: float | None
              ) -> dict[str, Series]:
    """Monitor samples by seconds since the run started: ``hardware/time`` (unix time of
    each sample, continuous across resumes) when recorded, else ``hardware/t`` (seconds
    since the monitor started), else the sample number."""
    clock = _clock(series, start)
    out = {}
    for key, points in series.items():
        if not key.startswith(HARDWARE_PREFIX) or key in _CLOCKS:
            continue
        by_sample = _by_step(points)
        x = by_sample.x.astype(np.float64)
        if clock is not None:
            at = np.clip(np.searchsorted(clock.x, by_sample.x), 0, len(clock.x) - 1)
            x = np.where(clock.x[at] == by_sample.x, clock.y[at], np.nan)
        keep = np.isfinite(x)
        order = np.argsort(x[keep], kind="stable")
        out[key.removeprefix(HARDWARE_PREFIX)] = Series(x=x[keep][order],
                                                        y=by_sample.y[keep][order])
    return out


def _clock(series: dict[str, list[tuple[int, float, float]]], start: float | None
           ) -> Series | None:
    if series.get("hardware/time") and start is not None:
        unix = _by_step(series["hardware/time"])
        return Series(x=unix.x, y=unix.y - start)
    if series.get("hardware/t"):
        return _by_step(series["hardware/t"])
    return None


def _start_time(run: RunRow) -> float | None:
    try:
        return datetime.fromisoformat(run.created_at).timestamp()
    except (TypeError, ValueError):  # checked by the registry; a forged one: no clock
        return None
