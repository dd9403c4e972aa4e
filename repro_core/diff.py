"""Why do two runs differ? Config, packages, git, CUDA/GPU, determinism, seeds, final metrics.

Each section compares flattened key paths (``optimizer.lr``, ``gpu.devices.0.name``) and
reports ``changed`` (``[a, b]``), ``added`` (only in b) and ``removed`` (only in a), plus
``captured`` (``{"a": bool, "b": bool}``): whether each run recorded that section at all. A
section one run did not capture is not compared — "same" would claim a match nobody checked,
and listing the other run's values as added would be noise — so its differences stay empty
and ``captured`` says why. Metrics are shown side by side (last value of every key in either
run). The environment comes from the ``environment`` artifact each run logged
(``ExperimentContext`` logs it), the config from the run record, the metrics from the metrics
store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import IntegrityError
from .metrics import read_metrics
from .registry import Registry
from .store.local import LocalStorageBackend

__all__ = ["diff_runs"]

# environment keys compared, by section; everything else (hostname, memory free…) is noise
_ENV_SECTIONS = {
    "packages": None,  # whole section
    "git": ("commit", "branch", "dirty", "remotes", "remote"),
    "cuda": None,
    "gpu": None,
    "determinism": None,
    "seeds": None,
}


def diff_runs(run_a: str, run_b: str, *, root: str | Path | None = None) -> dict[str, Any]:
    """Differences between two runs of one store, grouped by section (JSON-safe).

    ``run_a``/``run_b`` are run ids or unique prefixes. ``root`` defaults to the store the
    ``ArtifactManager`` uses (``set_root``, ``init_run(root=)``, ``REPRO_HOME``). The registry
    is opened read-only: nothing is created or written, a missing store is
    ``StoreNotFoundError``.
    """
    root_path = Path(root).expanduser().absolute() if root is not None else _manager_root()
    registry = Registry(root_path / "registry.sqlite", readonly=True)
    try:
        registry.open()
        store = LocalStorageBackend(root_path, algorithm=registry.hash_algorithm())
        a, b = (_side(registry, store, run_id) for run_id in (run_a, run_b))
    finally:
        registry.close()
    result: dict[str, Any] = {
        "runs": {"a": a["run"], "b": b["run"]},
        "config": _section(a["config"], b["config"]),
    }
    for section, keys in _ENV_SECTIONS.items():
        left, right = a["env"].get(section), b["env"].get(section)
        if keys is not None and isinstance(left, dict) and isinstance(right, dict):
            left = {k: v for k, v in left.items() if k in keys}
            right = {k: v for k, v in right.items() if k in keys}
        result[section] = _section(left, right)
    result["metrics"] = _metrics_side_by_side(a["metrics"], b["metrics"])
    return result


def _manager_root() -> Path:
    """The singleton manager's store (imported here: the manager imports this package)."""
    from .manager import ArtifactManager

    return ArtifactManager().root


def _side(registry: Registry, store: LocalStorageBackend, run_id: str) -> dict[str, Any]:
    run = registry.get_run(run_id)  # resolves a prefix: query by run.id from here on
    config = {k: v for k, v in run.config.items() if k != "_repro"}
    env: dict[str, Any] = {}
    for version in registry.outputs_of(run.id):
        if version.name == "environment" and version.format == "json":
            env = _read_environment(store, version.digest, version.size)
    metrics = {key: points[-1][1] for key, points in read_metrics(registry, run.id).items()
               if points}
    summary = {"id": run.id, "name": run.name, "project": run.project, "state": run.state,
               "created_at": run.created_at}
    return {"run": summary, "config": config, "env": env, "metrics": metrics}


def _read_environment(store: LocalStorageBackend, digest: str, size: int) -> dict[str, Any]:
    """The environment a run logged, verified (it is small) and checked to be an object."""
    path = store.check(digest, size, full=True, identity=False)  # read-only: no cache write
    try:
        env = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"environment blob {digest} is not JSON ({exc})",
                             digest=digest) from None
    if not isinstance(env, dict):
        raise IntegrityError(f"environment blob {digest} is not a JSON object", digest=digest)
    return env


def _section(a: Any, b: Any) -> dict[str, Any]:
    """One section's comparison; a side that did not capture it (None) is not compared."""
    captured = {"a": a is not None, "b": b is not None}
    if a is None or b is None:
        return {"changed": {}, "added": {}, "removed": {}, "captured": captured}
    return {**_compare(_flatten(a), _flatten(b)), "captured": captured}


def _flatten(value: Any) -> dict[str, Any]:
    """Nested dicts/lists to ``{"a.b.0": leaf}`` (iterative: configs can be deep). An empty
    section flattens to nothing (not to a ``"": {}`` entry)."""
    out: dict[str, Any] = {}
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict) and item:
            stack.extend((f"{path}.{k}" if path else str(k), v) for k, v in item.items())
        elif isinstance(item, list) and item:
            stack.extend((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(item))
        elif path:
            out[path] = item
        elif not isinstance(item, (dict, list)):
            out["(value)"] = item  # a scalar section: compared as one value
    return out


def _compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {
        "changed": {k: [a[k], b[k]] for k in sorted(a.keys() & b.keys()) if a[k] != b[k]},
        "added": {k: b[k] for k in sorted(b.keys() - a.keys())},
        "removed": {k: a[k] for k in sorted(a.keys() - b.keys())},
    }


def _metrics_side_by_side(a: dict[str, float], b: dict[str, float]) -> dict[str, list[Any]]:
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys())}
