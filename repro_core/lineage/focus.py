"""The lineage around one node, read breadth-first from the registry with indexed lookups.

Loading a 100k-version graph to answer "where did this checkpoint come from?" costs seconds;
walking outwards from the node costs a few queries per level (``artifact_parents``,
``run_outputs``, ``run_inputs`` are indexed both ways), whatever the store's size. Edges are the
same as in the whole-graph builder: run → version it logged, parent → child version,
version → run that used it; artifact ids are the registry rows' own ``key``.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArtifactNotFoundError, InvalidNameError
from ..registry import Registry
from ..types import parse_key
from .nodes import LineageNode, run_node_id
from .store import run_node, version_node

__all__ = ["read_neighbourhood"]

_Node = tuple[str, Any]  # ("v", version id) or ("r", run id)
# For each direction: (edge table, column matched, kind of the node it starts from).
_STEPS = {
    "up": (("artifact_parents", "child_id", "v"), ("run_outputs", "version_id", "v"),
           ("run_inputs", "run_id", "r")),
    "down": (("artifact_parents", "parent_id", "v"), ("run_inputs", "version_id", "v"),
             ("run_outputs", "run_id", "r")),
}
_KINDS = {"artifact_parents": ("v", "v"), "run_outputs": ("r", "v"), "run_inputs": ("v", "r")}


def read_neighbourhood(registry: Registry, node_id: str, *, depth: int | None = None,
                       direction: str | None = None
                       ) -> tuple[list[LineageNode], list[tuple[str, str]]]:
    """Nodes and edges within ``depth`` edges of ``node_id`` (``name:vN`` or ``run:<id>``),
    upstream (``"up"``), downstream (``"down"``) or both (None)."""
    start = _start_node(registry, node_id)
    seen: set[_Node] = {start}
    edges: set[tuple[_Node, _Node]] = set()
    for way in ("up", "down"):
        if direction in (None, way):
            _walk(registry, start, way, depth, seen, edges)
    return _materialise(registry, seen, edges)


def _start_node(registry: Registry, node_id: str) -> _Node:
    """``run:<id>`` names a run when such a run exists; otherwise the text is an artifact key
    (an artifact may be called ``run``: ``run:v1`` is then its version 1)."""
    if node_id.startswith("run:"):
        run_id = node_id.removeprefix("run:")
        if registry.runs_by_id([run_id]):
            return ("r", run_id)
        try:
            return ("v", registry.resolve(parse_key(node_id)).id)
        except (ArtifactNotFoundError, InvalidNameError):
            registry.get_run(run_id)  # the clearer error: no such run
    return ("v", registry.resolve(parse_key(node_id)).id)


def _walk(registry: Registry, start: _Node, way: str, depth: int | None,
          seen: set[_Node], edges: set[tuple[_Node, _Node]]) -> None:
    frontier, level = {start}, 0
    while frontier and (depth is None or level < depth):
        found: set[_Node] = set()
        for table, column, kind in _STEPS[way]:
            ids = [value for k, value in frontier if k == kind]
            if not ids:
                continue
            src_kind, dst_kind = _KINDS[table]
            for src, dst in registry.edges_touching(table, column, ids):
                edge = ((src_kind, src), (dst_kind, dst))
                edges.add(edge)
                found.add(edge[0] if way == "up" else edge[1])
        frontier = found - seen
        seen |= frontier
        level += 1


def _materialise(registry: Registry, seen: set[_Node], edges: set[tuple[_Node, _Node]]
                 ) -> tuple[list[LineageNode], list[tuple[str, str]]]:
    versions = registry.versions_by_id([v for k, v in seen if k == "v"])
    runs = registry.runs_by_id([r for k, r in seen if k == "r"])
    keys = {v.id: v.key for v in versions}

    def name(node: _Node) -> str:
        kind, value = node
        if kind == "r":
            return run_node_id(value)
        if value not in keys:
            raise ArtifactNotFoundError(f"lineage edge names missing version {value}",
                                        key=str(value))
        return keys[value]

    nodes = [run_node(r) for r in runs] + [version_node(v) for v in versions]
    everything = edges | _edges_among(registry, seen)  # as a whole-graph subgraph would have
    kept = {(name(a), name(b)) for a, b in everything if a in seen and b in seen}
    return nodes, sorted(kept)


def _edges_among(registry: Registry, seen: set[_Node]) -> set[tuple[_Node, _Node]]:
    """Every edge between two visited nodes, also those the walk did not travel (a dataset →
    model parent edge seen from the run between them)."""
    versions = [v for k, v in seen if k == "v"]
    runs = [r for k, r in seen if k == "r"]
    found: set[tuple[_Node, _Node]] = set()
    for table, column, ids in (("artifact_parents", "parent_id", versions),
                               ("run_outputs", "run_id", runs),
                               ("run_inputs", "version_id", versions)):
        src_kind, dst_kind = _KINDS[table]
        found.update(((src_kind, a), (dst_kind, b))
                     for a, b in registry.edges_touching(table, column, ids))
    return found
