"""Why do two runs differ? Config, packages, git, CUDA/GPU, determinism, seeds, final metrics.

Each section compares flattened key paths (``optimizer.lr``, ``gpu.devices.0.name``) and
reports ``changed`` (``[a, b]``), ``added`` (only in b) and ``removed`` (only in a); metrics are
shown side by side (last value of every key in either run). The environment comes from the
``environment`` artifact each run logged (``ExperimentContext`` logs it), the config from the
run record, the metrics from the metrics store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import constants
from .errors import InvalidArgumentError
from .metrics import read_metrics
from .registry import Registry
from .store.local import LocalStorageBackend

__all__ = ["diff_runs"]

# environment keys compared, by section; everything else (hostname, memory free…) is noise
_ENV_SECTIONS = {
    "git": ("commit", "branch", "dirty", "remotes", "remote"),
    "cuda": None,  # whole section
    "gpu": None,
    "determinism": None,
    "seeds": None,
}


def diff_runs(run_a: str, run_b: str, *, root: str | Path | None = None) -> dict[str, Any]:
    """Differences between two runs of one store, grouped by section (JSON-safe)."""
    root_path = Path(root or constants.REPRO_HOME or constants.DEFAULT_HOME).absolute()
    if not (root_path / "registry.sqlite").is_file():
        raise InvalidArgumentError(f"no repro store at {root_path}", argument="root")
    registry = Registry(root_path / "registry.sqlite")
    try:
        store = LocalStorageBackend(root_path, algorithm=registry.hash_algorithm())
        sides = [_side(registry, store, run_id) for run_id in (run_a, run_b)]
    finally:
        registry.close()
    a, b = sides
    result: dict[str, Any] = {
        "runs": {"a": a["run"], "b": b["run"]},
        "config": _compare(_flatten(a["config"]), _flatten(b["config"])),
        "packages": _compare(a["env"].get("packages", {}), b["env"].get("packages", {})),
    }
    for section, keys in _ENV_SECTIONS.items():
        left, right = a["env"].get(section, {}), b["env"].get(section, {})
        if keys is not None and isinstance(left, dict) and isinstance(right, dict):
            left = {k: v for k, v in left.items() if k in keys}
            right = {k: v for k, v in right.items() if k in keys}
        result[section] = _compare(_flatten(left), _flatten(right))
    result["metrics"] = _metrics_side_by_side(a["metrics"], b["metrics"])
    return result


def _side(registry: Registry, store: LocalStorageBackend, run_id: str) -> dict[str, Any]:
    run = registry.get_run(run_id)
    config = {k: v for k, v in run.config.items() if k != "_repro"}
    env: dict[str, Any] = {}
    for version in registry.outputs_of(run_id):
        if version.name == "environment" and version.format == "json":
            env = json.loads(store.check(version.digest, version.size, full=False).read_bytes())
    metrics = {key: points[-1][1] for key, points in read_metrics(registry, run_id).items()
               if points}
    summary = {"id": run.id, "name": run.name, "state": run.state, "created_at": run.created_at}
    return {"run": summary, "config": config, "env": env, "metrics": metrics}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists to ``{"a.b.0": leaf}`` (iterative: configs can be deep)."""
    out: dict[str, Any] = {}
    stack: list[tuple[str, Any]] = [(prefix, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict) and item:
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in item.items())
        elif isinstance(item, list) and item:
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(item))
        else:
            out[path] = item
    return out


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {
        "changed": {k: [a[k], b[k]] for k in sorted(a.keys() & b.keys()) if a[k] != b[k]},
        "added": {k: b[k] for k in sorted(b.keys() - a.keys())},
        "removed": {k: a[k] for k in sorted(a.keys() - b.keys())},
    }


def _metrics_side_by_side(a: dict[str, float], b: dict[str, float]) -> dict[str, list[Any]]:
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys())}
