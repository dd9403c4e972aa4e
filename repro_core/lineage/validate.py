"""Checks of a lineage graph: cycles, orphans, dangling references, missing blobs, and stats.

An issue keeps the seed's shape and adds to it::

    {"type": "orphaned", "message": "3 node(s) are orphaned: ...",
     "details": [first 10 ids],          # the seed's key and cap (callers print it as is)
     "severity": "warning" | "error",    # ours: only errors make is_valid False
     "count": 3,                         # ours: how many in all
     "items": [every one]}               # ours: the full list, richer where useful

The cap keeps a report printable on a 100k-node store with thousands of orphans; ``items``
still holds everything, because a tool that repairs a store needs the whole list and building
it costs nothing extra (the checks walk every node anyway).

``details`` per type: ``cycles`` → cycles (lists of ids); ``orphaned`` → ids;
``missing_references`` → the missing ids (``items`` adds who references each);
``missing_blobs`` → ``{"id", "digest", "path"}`` dicts, like ``items``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import networkx as nx

from ..errors import InvalidArgumentError
from ..store.local import LocalStorageBackend
from .nodes import ARTIFACT_KIND, GraphView

__all__ = ["DETAILS_LIMIT", "find_cycles", "missing_blobs", "validate"]

DETAILS_LIMIT = 10

BlobRefs = Mapping[str, tuple[str, ...]]


def validate(view: GraphView, blob_store: LocalStorageBackend | None = None,
             blob_refs: BlobRefs | None = None) -> dict[str, Any]:
    """``{"is_valid", "issues", "stats"}``; ``is_valid`` is False when any issue is an error.

    Orphans are a warning (a lone dataset is legitimate); cycles, missing references and
    missing blobs (only checked when ``blob_store`` is given) are errors.
    """
    issues = [
        issue for issue in (
            _cycle_issue(view.graph),
            _orphan_issue(view),
            _reference_issue(view),
            _blob_issue(blob_store, blob_refs or {}),
        ) if issue is not None
    ]
    return {
        "is_valid": not any(i["severity"] == "error" for i in issues),
        "issues": issues,
        "stats": stats(view),
    }


def find_cycles(graph: nx.DiGraph, max_cycles: int | None = 1000) -> list[list[str]]:
    """Elementary cycles, each rotated to start at its smallest id, sorted.

    Lineage should be acyclic, so any cycle is a recording error. A graph can hold
    exponentially many cycles; ``max_cycles`` caps the work (None: no cap).
    """
    if nx.is_directed_acyclic_graph(graph):  # the usual case, ~10x faster than below
        return []
    found: list[list[str]] = []
    for cycle in nx.simple_cycles(graph):
        if max_cycles is not None and len(found) >= max_cycles:
            break
        start = cycle.index(min(cycle))
        found.append(cycle[start:] + cycle[:start])
    return sorted(found)


def stats(view: GraphView) -> dict[str, Any]:
    """The seed's stats keys, plus ``total_runs`` (run nodes of a store-built graph)."""
    artifacts = [n for n in view.nodes.values() if n.kind == ARTIFACT_KIND]
    by_type = Counter(n.artifact_type for n in artifacts)
    by_run = Counter(n.run_id for n in artifacts if n.run_id is not None)
    return {
        "total_artifacts": len(artifacts),
        "total_runs": len(view.nodes) - len(artifacts),
        "total_edges": view.graph.number_of_edges(),
        "artifacts_by_type": dict(sorted(by_type.items())),
        "artifacts_by_run": dict(sorted(by_run.items())),
        "max_depth": max_depth(view.graph),
        "connected_components": nx.number_weakly_connected_components(view.graph),
    }


def max_depth(graph: nx.DiGraph) -> int:
    """Edges on the longest path; cycles are collapsed first so the answer stays finite."""
    if graph.number_of_nodes() == 0:
        return 0
    dag = graph if nx.is_directed_acyclic_graph(graph) else nx.condensation(graph)
    return int(nx.dag_longest_path_length(dag))


def missing_blobs(store: LocalStorageBackend, refs: BlobRefs) -> Iterator[dict[str, str]]:
    """``{"id", "digest", "path"}`` for every referenced blob that is not a file in ``store``."""
    for node_id, digests in refs.items():
        for digest in digests:
            try:
                path = str(store.blob_path(digest))
            except InvalidArgumentError:  # a malformed digest names no blob at all
                path = ""
            if not path or not store.exists(digest):
                yield {"id": node_id, "digest": digest, "path": path}


def _issue(kind: str, severity: str, message: str, items: Sequence[Any],
           details: Sequence[Any] | None = None) -> dict[str, Any]:
    shown = items if details is None else details
    return {"type": kind, "severity": severity, "message": message,
            "details": list(shown[:DETAILS_LIMIT]), "count": len(items), "items": list(items)}


def _cycle_issue(graph: nx.DiGraph) -> dict[str, Any] | None:
    cycles = find_cycles(graph)
    if not cycles:
        return None
    return _issue("cycles", "error", f"found {len(cycles)} cycle(s): an artifact cannot be its "
                  "own ancestor; fix the parent_ids that close each loop", cycles)


def _orphan_issue(view: GraphView) -> dict[str, Any] | None:
    orphans = [i for i in view.nodes if view.graph.degree(i) == 0]
    if not orphans:
        return None
    return _issue("orphaned", "warning", f"found {len(orphans)} orphaned node(s): no parent, "
                  "child or run links them (fine for a lone dataset)", orphans)


def _reference_issue(view: GraphView) -> dict[str, Any] | None:
    missing = [
        {"id": i, "referenced_by": sorted(view.graph.successors(i))}
        for i in view.graph.nodes if i not in view.nodes
    ]
    if not missing:
        return None
    return _issue("missing_references", "error", f"found {len(missing)} missing artifact "
                  "reference(s): ids named as parents but never added; add them with "
                  "add_artifact() or fix parent_ids", missing, [m["id"] for m in missing])


def _blob_issue(store: LocalStorageBackend | None, refs: BlobRefs) -> dict[str, Any] | None:
    if store is None:
        return None
    missing = list(missing_blobs(store, refs))
    if not missing:
        return None
    return _issue("missing_blobs", "error", f"{len(missing)} blob(s) are gone from "
                  f"{store.root}; restore them from a backup or remote, then run `repro verify`",
                  missing)
