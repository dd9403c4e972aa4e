"""The seed's ``LineageTracker``: build a lineage graph by hand or from a store, query it,
check it, export it, save it.

Edges point from cause to effect (parent → child) in a ``networkx.DiGraph``. Every traversal is
iterative (explicit queues, or networkx's own iterative algorithms): the original recursed and
overflowed the stack on chains of ~3,000 artifacts.

A parent named before it is added is kept as a *dangling reference*: a graph node with no
:class:`LineageNode`. Artifacts can therefore be added in any order (the edge is already there
when the parent arrives), dangling ids can be traversed like any other, and
``validate_lineage`` reports the ones still missing.

Queries are lenient with ids the graph has never seen, as the seed's were (code written
against it tests the result, not an exception): ``get_ancestors`` / ``get_descendants`` give
an empty set and ``get_lineage_path`` gives None. ``get_node`` still raises
``ArtifactNotFoundError``: it has no empty answer to give. Store-backed entry points
(``ArtifactManager.get_lineage``, ``repro lineage``) resolve keys in the registry first and
raise typed errors there.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import networkx as nx

from .. import _fsio
from ..errors import ArtifactNotFoundError, InvalidArgumentError
from ..registry import Registry
from ..store.local import LocalStorageBackend
from ..types import utc_now
from .focus import read_neighbourhood
from .nodes import ARTIFACT_KIND, RUN_KIND, LineageNode, run_node_id
from .persist import read_lineage_file, write_lineage_file
from .render import to_dot, to_mermaid
from .store import open_store_registry, read_registry
from .validate import find_cycles, validate

__all__ = ["LineageTracker"]


class LineageTracker:
    """Track and visualize artifact lineage and dependencies.

    ``graph`` (a ``networkx.DiGraph``, parent → child) holds the structure; ``nodes`` maps each
    added id to its :class:`LineageNode`. Ids in ``graph`` but not in ``nodes`` are dangling
    parent references.
    """

    def __init__(self) -> None:
        """Initialize lineage tracker."""
        self.graph: nx.DiGraph = nx.DiGraph()
        self.nodes: dict[str, LineageNode] = {}
        # Set only by from_registry(root=...): which blobs each version needs, and where.
        self._blob_refs: dict[str, tuple[str, ...]] = {}
        self._blob_store: LocalStorageBackend | None = None

    # -- building ---------------------------------------------------------------------------

    def add_artifact(
        self,
        artifact_id: str,
        name: str,
        artifact_type: str,
        version: str,
        run_id: str | None = None,
        parent_ids: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> LineageNode:
        """Add an artifact (with edges from each parent) and return its node.

        Adding an id again replaces its node record and adds any new parent edges; edges
        already recorded stay (lineage only grows). Parents not added yet become dangling
        references until they are.
        """
        _check_id(artifact_id, "artifact_id")
        parents = _check_parent_ids(parent_ids)
        if isinstance(artifact_type, enum.Enum):  # ArtifactType.MODEL → "model", so stats and
            artifact_type = str(artifact_type.value)  # JSON see one plain string per type
        node = LineageNode(
            artifact_id=artifact_id, artifact_name=name, artifact_type=artifact_type,
            version=version, created_at=utc_now(), run_id=run_id, metadata=dict(metadata or {}),
        )
        self._insert(node, parents)
        return node

    def _insert(self, node: LineageNode, parents: Iterable[str] = ()) -> None:
        self.nodes[node.artifact_id] = node
        self.graph.add_node(node.artifact_id)
        self.graph.add_edges_from((p, node.artifact_id) for p in parents)

    # -- queries ----------------------------------------------------------------------------

    def get_node(self, artifact_id: str) -> LineageNode:
        """The node added under ``artifact_id``; raises ``ArtifactNotFoundError`` for an
        unknown id or a dangling reference (neither has a record to return)."""
        try:
            return self.nodes[artifact_id]
        except KeyError:
            pass
        if artifact_id in self.graph:
            message = (f"{artifact_id!r} is only referenced as a parent of "
                       f"{sorted(self.graph.successors(artifact_id))}; add it with add_artifact()")
        else:
            message = (f"no artifact {artifact_id!r} in the lineage graph ({len(self.nodes)} "
                       "nodes); add it with add_artifact() first")
        raise ArtifactNotFoundError(message, key=artifact_id)

    def get_ancestors(self, artifact_id: str, max_depth: int | None = None) -> set[str]:
        """All ids upstream of ``artifact_id``, at most ``max_depth`` edges away (None: all);
        an empty set for an id the graph does not hold."""
        depth = _check_depth(max_depth)
        if artifact_id not in self.graph:
            return set()
        return _reach(artifact_id, self.graph.predecessors, depth)

    def get_descendants(self, artifact_id: str, max_depth: int | None = None) -> set[str]:
        """All ids downstream of ``artifact_id``, at most ``max_depth`` edges away (None: all);
        an empty set for an id the graph does not hold."""
        depth = _check_depth(max_depth)
        if artifact_id not in self.graph:
            return set()
        return _reach(artifact_id, self.graph.successors, depth)

    def get_lineage_path(self, from_id: str, to_id: str) -> list[str] | None:
        """A shortest path between two ids, edges taken as undirected (as the original did, so
        two siblings are connected through their parent); None when unconnected or when
        either id is not in the graph."""
        if from_id not in self.graph or to_id not in self.graph:
            return None
        try:
            path = nx.shortest_path(self.graph.to_undirected(as_view=True), from_id, to_id)
        except nx.NetworkXNoPath:
            return None
        return list(path)

    def get_run_lineage(self, run_id: str) -> dict[str, Any]:
        """``{"run_id", "artifacts", "edges"}``: the run's own artifacts, then the artifacts
        they directly descend from in other runs, and every edge into the run's artifacts
        (``{"from": parent, "to": child}``) — where each came from, one step back.

        In a store-built graph a run's outputs hang off its ``run:<id>`` node, so edges into
        that node (the versions the run used) count too, and those inputs are listed. A
        dangling parent appears in ``edges`` only (it has no node to list). Unknown runs give
        empty lists.
        """
        own = [n for n in self.nodes.values() if n.run_id == run_id and n.kind == ARTIFACT_KIND]
        targets = [n.artifact_id for n in own]
        run_node = self.nodes.get(run_node_id(run_id))
        if run_node is not None and run_node.kind == RUN_KIND:
            targets.append(run_node.artifact_id)
        edges = [{"from": p, "to": t} for t in targets for p in self.graph.predecessors(t)]
        listed = {n.artifact_id for n in own}
        artifacts = [n.to_dict() for n in own]
        for edge in edges:
            parent = self.nodes.get(edge["from"])
            if parent is not None and parent.kind == ARTIFACT_KIND and edge["from"] not in listed:
                listed.add(edge["from"])
                artifacts.append(parent.to_dict())
        return {"run_id": run_id, "artifacts": artifacts, "edges": edges}

    def detect_cycles(self, *, max_cycles: int | None = 1000) -> list[list[str]]:
        """Elementary cycles, each rotated to start at its smallest id, sorted (at most
        ``max_cycles``: a graph can hold exponentially many). Lineage should have none."""
        return find_cycles(self.graph, max_cycles)

    def validate_lineage(self) -> dict[str, Any]:
        """``{"is_valid", "issues", "stats"}`` in the seed's shape; see
        :mod:`repro_core.lineage.validate` for each issue's keys. Orphans are a warning and
        keep ``is_valid`` True; cycles, missing references and (store-built with a root)
        missing blobs are errors."""
        return validate(self, self._blob_store, self._blob_refs)

    # -- export and persistence -------------------------------------------------------------

    def export_to_dot(self, output_path: Path | None = None) -> str:
        """Graphviz DOT text (``digraph lineage {``, left to right, ids and labels quoted and
        escaped); written atomically too if a path is given."""
        text = to_dot(self)
        if output_path is not None:
            _fsio.write_file_atomic(Path(output_path), text.encode("utf-8"))
        return text

    def export_to_mermaid(self) -> str:
        """Mermaid ``flowchart TD`` text for Markdown (ids ``n0, n1, …``; labels entity-escaped)."""
        return to_mermaid(self)

    def save(self, path: Path) -> None:
        """Write the graph as JSON (atomically), dangling references and metadata included;
        metadata JSON cannot hold exactly (NaN, objects) is refused before writing."""
        write_lineage_file(Path(path), self.nodes.values(), self.graph.edges)

    def load(self, path: Path) -> None:
        """Replace this tracker's graph with the one saved at ``path``; a bad file raises and
        leaves the tracker as it was."""
        nodes, edges = read_lineage_file(Path(path))
        graph = nx.DiGraph()
        graph.add_nodes_from(n.artifact_id for n in nodes)
        graph.add_edges_from(edges)
        self.graph, self.nodes = graph, {n.artifact_id: n for n in nodes}
        self._blob_refs, self._blob_store = {}, None

    def subgraph(self, ids: Iterable[str]) -> LineageTracker:
        """A new tracker holding only ``ids`` and the edges among them (for focused views)."""
        keep = set(ids)
        sub = type(self)()
        sub.graph = self.graph.subgraph(keep).copy()
        sub.nodes = {i: n for i, n in self.nodes.items() if i in keep}
        sub._blob_refs = {i: r for i, r in self._blob_refs.items() if i in keep}
        sub._blob_store = self._blob_store
        return sub

    # -- from a store -----------------------------------------------------------------------

    @classmethod
    def from_registry(cls, registry: Registry, root: Path | None = None, *,
                      around: str | None = None, depth: int | None = None,
                      direction: str | None = None) -> LineageTracker:
        """Build the artifact → run → artifact graph of a registry in a few bulk reads.

        Artifact ids are the registry's version keys (``row.key``). With ``root`` (the store
        directory), ``validate_lineage`` also reports versions whose blobs are missing from
        ``root/blobs``. With ``around`` (a version key, an alias key or ``run:<id>``) only
        that node's neighbourhood is read — ``depth`` edges away, ``direction``
        ``"up"``/``"down"``/None for both — in indexed queries per level, so the cost does not
        grow with the store.
        """
        if around is not None:
            return cls._focused(registry, around, _check_depth(depth), direction)
        nodes, edges, blob_refs = read_registry(registry, with_blobs=root is not None)
        tracker = cls._assembled(nodes, edges)
        if root is not None:
            tracker._blob_store = LocalStorageBackend(root)
            tracker._blob_refs = blob_refs
        return tracker

    @classmethod
    def from_store(cls, root: str | Path) -> LineageTracker:
        """Open ``root/registry.sqlite`` (never creating one), build the graph with blob
        checks, close it."""
        root = Path(root)
        registry = open_store_registry(root)
        try:
            return cls.from_registry(registry, root)
        finally:
            registry.close()

    @classmethod
    def _focused(cls, registry: Registry, around: str, depth: int | None,
                 direction: str | None) -> LineageTracker:
        if direction not in (None, "up", "down"):
            raise InvalidArgumentError(f"direction must be 'up', 'down' or None, got "
                                       f"{direction!r}", argument="direction")
        nodes, edges = read_neighbourhood(registry, around, depth=depth, direction=direction)
        return cls._assembled(nodes, edges)

    @classmethod
    def _assembled(cls, nodes: Iterable[LineageNode],
                   edges: Iterable[tuple[str, str]]) -> LineageTracker:
        tracker = cls()
        for node in nodes:
            tracker._insert(node)
        tracker.graph.add_edges_from(edges)
        return tracker


def _reach(start: str, neighbours: Callable[[str], Iterable[str]],
           max_depth: int | None) -> set[str]:
    """Breadth-first, level by level, so ``max_depth`` counts edges and no recursion occurs."""
    seen = {start}
    frontier = [start]
    depth = 0
    while frontier and (max_depth is None or depth < max_depth):
        next_frontier: list[str] = []
        for node in frontier:
            for other in neighbours(node):
                if other not in seen:
                    seen.add(other)
                    next_frontier.append(other)
        frontier = next_frontier
        depth += 1
    seen.discard(start)
    return seen


def _check_id(value: object, argument: str) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidArgumentError(
            f"{argument} must be a non-empty str, got {value!r}", argument=argument
        )


def _check_parent_ids(parent_ids: object) -> list[str]:
    if parent_ids is None:
        return []
    if isinstance(parent_ids, (str, bytes)) or not isinstance(parent_ids, Iterable):
        # A bare string would otherwise be iterated character by character.
        raise InvalidArgumentError(
            f"parent_ids must be a list of ids, got {parent_ids!r}; wrap one id as [id]",
            argument="parent_ids",
        )
    parents = list(parent_ids)
    for parent in parents:
        _check_id(parent, "parent_ids")
    return parents


def _check_depth(max_depth: object) -> int | None:
    if max_depth is None:
        return None
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 0:
        raise InvalidArgumentError(
            f"max_depth must be None or an int >= 0, got {max_depth!r}", argument="max_depth"
        )
    return max_depth
