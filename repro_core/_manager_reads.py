"""The manager's read API: list artifacts, lineage, runs, metrics.

Reads never create a store: without an active run they open the registry read-only (see
``_store_access``). Rank 0 answers; other ranks receive its answer (``distributed``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ._artifacts import metadata_from_row
from .distributed import Call, Exchange
from .errors import RunStateError
from .metrics import MetricsWriter, read_metrics
from .registry import Registry, VersionRow
from .types import ArtifactMetadata, ParsedKey, Run, parse_key

__all__ = ["ReadQueries"]


class ReadQueries:
    """Read-side methods of ``ArtifactManager`` (a mixin)."""

    _lock: threading.RLock
    _run: Run | None
    _metrics: MetricsWriter | None
    _exchange: Exchange

    _read_registry: Callable[[], Registry]  # provided by StoreAccess
    _resolve: Callable[[Any, ParsedKey], VersionRow]  # provided by the manager

    def list_artifacts(self, name: str | None = None) -> list[ArtifactMetadata]:
        """Metadata of every artifact version (or of one artifact's versions, ``name`` or
        ``project/name``); pruned versions (``prune_version``) are left out."""
        parsed = parse_key(name) if name is not None else None  # validates before any I/O

        def query() -> list[ArtifactMetadata]:
            registry = self._read_registry()
            rows = registry.list_versions(parsed.name if parsed else None,
                                          parsed.project if parsed else None)
            return [metadata_from_row(registry, row, None) for row in rows
                    if row.pruned_at is None]

        result = self._exchange.run_on_zero(
            Call("list_artifacts", name or ""), query, encode=lambda ms: [m.to_dict() for m in ms],
            decode=lambda ds: [ArtifactMetadata.from_dict(d) for d in ds],
        )
        return result or []

    def get_lineage(self, artifact_key: str) -> dict[str, Any]:
        """Full lineage of one artifact version: its transitive ``ancestors`` and
        ``descendants`` in the artifact → run → artifact graph (runs are ``run:<id>``), plus
        direct parents, children, producing run and consuming runs. For graph work use
        ``LineageTracker.from_store(root)``."""
        key = parse_key(artifact_key)
        result = self._exchange.run_on_zero(Call("get_lineage", artifact_key),
                                            lambda: self._lineage(key),
                                            encode=_identity, decode=_identity)
        return result or {}

    def _lineage(self, key: ParsedKey) -> dict[str, Any]:
        from .lineage import LineageTracker

        registry = self._read_registry()
        row = self._resolve(registry, key)
        producer = registry.get_run(row.run_id).__dict__ if row.run_id else None
        graph = LineageTracker.from_registry(registry, around=row.key)
        return {
            "ancestors": sorted(graph.get_ancestors(row.key)),
            "descendants": sorted(graph.get_descendants(row.key)),
            "artifact": metadata_from_row(registry, row, None).to_dict(),
            "produced_by": producer,
            "run_inputs": [v.key for v in registry.inputs_of(row.run_id)] if row.run_id else [],
            "parents": [p.key for p in registry.parents_of(row.id)],
            "children": [c.key for c in registry.children_of(row.id)],
            "used_by": registry.consumers_of(row.id),
        }

    def get_run(self, run_id: str) -> dict[str, Any]:
        """The stored record of a run (``run_id``: the id or a unique prefix of it), with its
        state history, inputs and outputs."""

        def query() -> dict[str, Any]:
            registry = self._read_registry()
            row = registry.get_run(run_id)
            return {
                **row.__dict__,
                "states": [list(s) for s in registry.run_state_history(row.id)],
                "inputs": [v.key for v in registry.inputs_of(row.id)],
                "outputs": [v.key for v in registry.outputs_of(row.id)],
            }

        return self._exchange.run_on_zero(  # type: ignore[no-any-return]
            Call("get_run", run_id), query, encode=_identity, decode=_identity) or {}

    def get_metrics(self, run_id: str | None = None, keys: list[str] | None = None, *,
                    segment: int | None = None) -> dict[str, list[tuple[int, float, float]]]:
        """``{key: [(step, value, unix_time), …]}`` for a run (default: the active one).

        For a resumed run, points logged again after the resume at steps recorded before it
        replace the earlier ones; ``segment=0`` (1, …) gives one stretch's points as logged."""
        with self._lock:
            if run_id is None:
                if self._run is None:
                    raise RunStateError("get_metrics() without run_id needs an active run")
                run_id = self._run.id
            if self._metrics is not None:
                self._metrics.flush()
        assert run_id is not None
        wanted = run_id

        def query() -> dict[str, list[tuple[int, float, float]]]:
            registry = self._read_registry()
            return read_metrics(registry, registry.resolve_run_id(wanted), keys,
                                segment=segment)

        result = self._exchange.run_on_zero(
            Call("get_metrics", run_id, {"keys": keys, "segment": segment}), query,
            encode=_identity,
            decode=lambda d: {k: [tuple(r) for r in v] for k, v in d.items()},
        )
        return result or {}


def _identity(value: Any) -> Any:
    return value
