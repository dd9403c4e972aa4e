"""Lineage: which artifact came from which, and which run produced or used it.

A graph comes from one of two places:

- by hand, as with the seed's tracker: ``add_artifact(id, ..., parent_ids=[...])``;
- from a store: ``LineageTracker.from_store(root)`` reads the registry in a handful of bulk
  queries (never one per node, so 100k versions load in seconds) and builds the bipartite
  graph of DESIGN.md::

      dataset:v0 ──▶ run:1a2b ──▶ model:v0 ──▶ run:3c4d ──▶ evaluation:v0
                (used by)    (produced)    (used by)    (produced)

  plus ``parent ──▶ child`` edges for versions logged with ``parent_artifacts=``.

Edges point from cause to effect (parent → child), in a ``networkx.DiGraph``. Every traversal is
iterative (explicit queues, or networkx's own iterative algorithms): the original recursed and
overflowed the stack on chains of ~3,000 artifacts.

A parent named before it is added is kept as a *dangling reference*: a graph node with no
:class:`LineageNode`. Artifacts can therefore be added in any order (the edge is already there
when the parent arrives), dangling ids can be traversed like any other, and
``validate_lineage`` reports the ones still missing.
"""

from __future__ import annotations

import enum
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import networkx as nx

from . import _fsio
from .errors import (
    ArtifactNotFoundError,
    InvalidArgumentError,
    MissingFileError,
    SerializationError,
)
from .registry import Registry
from .serialize import canonical_json
from .store.local import LocalStorageBackend
from .types import utc_now

__all__ = ["ARTIFACT_KIND", "RUN_KIND", "LineageNode", "LineageTracker", "run_node_id"]

ARTIFACT_KIND = "artifact"
RUN_KIND = "run"
_KINDS = (ARTIFACT_KIND, RUN_KIND)
_FILE_FORMAT = "repro-lineage"
_FILE_VERSION = 1


def run_node_id(run_id: str) -> str:
    """The graph id of a run node (``run:<id>``); artifact ids look like ``name:vN``."""
    return f"run:{run_id}"


@dataclass
class LineageNode:
    """Node in the lineage graph: an artifact version, or (``kind="run"``) a run."""

    artifact_id: str
    artifact_name: str
    artifact_type: str
    version: str
    created_at: str
    run_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = ARTIFACT_KIND

    def __post_init__(self) -> None:
        # The seed's signature defaults metadata to None; keep accepting an explicit None.
        if self.metadata is None:
            self.metadata = {}
        if self.kind not in _KINDS:
            raise InvalidArgumentError(
                f"LineageNode kind {self.kind!r} is not one of {_KINDS}", argument="kind"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (metadata copied, so editing it leaves the node alone)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LineageNode:
        """Inverse of :meth:`to_dict`; unknown keys are ignored so newer files still load."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


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
        """The node added under ``artifact_id`` (dangling references have none)."""
        self._require(artifact_id)
        try:
            return self.nodes[artifact_id]
        except KeyError:
            raise ArtifactNotFoundError(
                f"{artifact_id!r} is only referenced as a parent of "
                f"{sorted(self.graph.successors(artifact_id))}; add it with add_artifact()",
                key=artifact_id,
            ) from None

    def get_ancestors(self, artifact_id: str, max_depth: int | None = None) -> set[str]:
        """All ids upstream of ``artifact_id``, at most ``max_depth`` edges away (None: all)."""
        self._require(artifact_id)
        return _reach(artifact_id, self.graph.predecessors, _check_depth(max_depth))

    def get_descendants(self, artifact_id: str, max_depth: int | None = None) -> set[str]:
        """All ids downstream of ``artifact_id``, at most ``max_depth`` edges away (None: all)."""
        self._require(artifact_id)
        return _reach(artifact_id, self.graph.successors, _check_depth(max_depth))

    def get_lineage_path(self, from_id: str, to_id: str) -> list[str] | None:
        """A shortest path between two ids, edges taken as undirected (as the original did, so
        two siblings are connected through their parent); None when unconnected."""
        self._require(from_id)
        self._require(to_id)
        try:
            path = nx.shortest_path(self.graph.to_undirected(as_view=True), from_id, to_id)
        except nx.NetworkXNoPath:
            return None
        return list(path)

    def get_run_lineage(self, run_id: str) -> dict[str, Any]:
        """The artifacts a run produced and every edge into them (or into the run's own node,
        for a store-built graph), i.e. where each came from. Unknown runs give empty lists."""
        members = [n for n in self.nodes.values() if n.run_id == run_id and n.kind == ARTIFACT_KIND]
        targets = [n.artifact_id for n in members]
        run_node = self.nodes.get(run_node_id(run_id))
        if run_node is not None and run_node.kind == RUN_KIND:
            targets.append(run_node.artifact_id)
        edges = [{"from": p, "to": t} for t in targets for p in self.graph.predecessors(t)]
        return {"run_id": run_id, "artifacts": [n.to_dict() for n in members], "edges": edges}

    def detect_cycles(self, *, max_cycles: int | None = 1000) -> list[list[str]]:
        """Elementary cycles, each rotated to start at its smallest id, sorted.

        Lineage should be acyclic, so any cycle is a recording error. A graph can hold
        exponentially many cycles; ``max_cycles`` caps the work (None: no cap).
        """
        if nx.is_directed_acyclic_graph(self.graph):  # the usual case, ~10x faster than below
            return []
        found: list[list[str]] = []
        for cycle in nx.simple_cycles(self.graph):
            if max_cycles is not None and len(found) >= max_cycles:
                break
            start = cycle.index(min(cycle))
            found.append(cycle[start:] + cycle[:start])
        return sorted(found)

    # -- validation -------------------------------------------------------------------------

    def validate_lineage(self) -> dict[str, Any]:
        """Check the graph; ``is_valid`` is False when any issue has severity ``error``.

        Issues are ``{"type", "severity", "message", "items"}`` with type ``cycles``
        (items: cycles), ``missing_references`` (items: ``{"id", "referenced_by"}``),
        ``missing_blobs`` (store-built with a root; items: ``{"id", "digest", "path"}``) — all
        errors — and ``orphaned`` (items: ids with no edge at all), a warning, since a lone
        dataset is legitimate.
        """
        checks = (self._cycle_issue, self._orphan_issue, self._reference_issue, self._blob_issue)
        issues = [issue for check in checks if (issue := check()) is not None]
        return {
            "is_valid": not any(i["severity"] == "error" for i in issues),
            "issues": issues,
            "stats": self._stats(),
        }

    def _cycle_issue(self) -> dict[str, Any] | None:
        cycles = self.detect_cycles()
        if not cycles:
            return None
        return _issue("cycles", "error", f"{len(cycles)} cycle(s): an artifact cannot be its "
                      "own ancestor; fix the parent_ids that close each loop", cycles)

    def _orphan_issue(self) -> dict[str, Any] | None:
        orphans = [i for i in self.nodes if self.graph.degree(i) == 0]
        if not orphans:
            return None
        return _issue("orphaned", "warning",
                      f"{len(orphans)} node(s) have no parent, child or run", orphans)

    def _reference_issue(self) -> dict[str, Any] | None:
        missing = [
            {"id": i, "referenced_by": sorted(self.graph.successors(i))}
            for i in self.graph.nodes if i not in self.nodes
        ]
        if not missing:
            return None
        return _issue("missing_references", "error", f"{len(missing)} referenced id(s) were "
                      "never added; add them with add_artifact() or fix parent_ids", missing)

    def _blob_issue(self) -> dict[str, Any] | None:
        if self._blob_store is None:
            return None
        from ._lineage_store import missing_blobs

        missing = list(missing_blobs(self._blob_store, self._blob_refs))
        if not missing:
            return None
        return _issue("missing_blobs", "error", f"{len(missing)} blob(s) are gone from "
                      f"{self._blob_store.root}; restore them from a backup or remote, then "
                      "run `repro verify`", missing)

    def _stats(self) -> dict[str, Any]:
        artifacts = [n for n in self.nodes.values() if n.kind == ARTIFACT_KIND]
        by_type = Counter(n.artifact_type for n in artifacts)
        by_run = Counter(n.run_id for n in artifacts if n.run_id is not None)
        return {
            "total_artifacts": len(artifacts),
            "total_runs": len(self.nodes) - len(artifacts),
            "total_edges": self.graph.number_of_edges(),
            "artifacts_by_type": dict(sorted(by_type.items())),
            "artifacts_by_run": dict(sorted(by_run.items())),
            "max_depth": self._max_depth(),
            "connected_components": nx.number_weakly_connected_components(self.graph),
        }

    def _max_depth(self) -> int:
        """Edges on the longest path; cycles are collapsed first so the answer stays finite."""
        if self.graph.number_of_nodes() == 0:
            return 0
        dag = self.graph
        if not nx.is_directed_acyclic_graph(dag):
            dag = nx.condensation(dag)
        return int(nx.dag_longest_path_length(dag))

    # -- export -----------------------------------------------------------------------------

    def export_to_dot(self, output_path: Path | None = None) -> str:
        """Graphviz DOT text (ids and labels quoted and escaped); written too if a path is given."""
        from .lineage_render import to_dot

        text = to_dot(self)
        if output_path is not None:
            _fsio.write_file_atomic(Path(output_path), text.encode("utf-8"))
        return text

    def export_to_mermaid(self) -> str:
        """Mermaid ``flowchart TD`` text for Markdown (ids ``n0, n1, …``; labels entity-escaped)."""
        from .lineage_render import to_mermaid

        return to_mermaid(self)

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the graph as JSON (atomically), dangling references and metadata included.

        Metadata that JSON would silently change (NaN, non-str keys, objects) is refused with
        the path of the offending value, before anything is written.
        """
        document = {
            "format": _FILE_FORMAT,
            "format_version": _FILE_VERSION,
            "nodes": [n.to_dict() for n in self.nodes.values()],
            # Sorted: the file is then the same bytes whatever order edges were added in.
            "edges": sorted([u, v] for u, v in self.graph.edges),
        }
        data = canonical_json(document, root="lineage")
        _fsio.write_file_atomic(Path(path), data + b"\n")

    def load(self, path: Path) -> None:
        """Replace this tracker's graph with the one saved at ``path``.

        The file is parsed and checked completely first, so a bad file leaves the tracker as
        it was.
        """
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise MissingFileError(f"no lineage file at {path}", path=path) from None
        except (OSError, ValueError) as exc:
            raise SerializationError(f"cannot read lineage file {path}: {exc}",
                                     path=str(path)) from exc
        nodes, edges = _parse_document(document, path)
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

    # -- store ------------------------------------------------------------------------------

    @classmethod
    def from_registry(cls, registry: Registry, root: Path | None = None, *,
                      around: str | None = None, depth: int | None = None,
                      direction: str | None = None) -> LineageTracker:
        """Build the artifact → run → artifact graph of a registry in a few bulk reads.

        With ``root`` (the store directory), ``validate_lineage`` also reports versions whose
        blobs are missing from ``root/blobs``. With ``around`` (``name:vN``, an alias key or
        ``run:<id>``) only that node's neighbourhood is read — ``depth`` edges away,
        ``direction`` ``"up"``/``"down"``/None for both — in indexed queries per level, so
        the cost does not grow with the store.
        """
        from ._lineage_store import read_registry

        if around is not None:
            return cls._focused(registry, around, _check_depth(depth), direction)
        tracker = cls()
        nodes, edges, blob_refs = read_registry(registry, with_blobs=root is not None)
        for node in nodes:
            tracker._insert(node)
        tracker.graph.add_edges_from(edges)
        if root is not None:
            tracker._blob_store = LocalStorageBackend(root)
            tracker._blob_refs = blob_refs
        return tracker

    @classmethod
    def _focused(cls, registry: Registry, around: str, depth: int | None,
                 direction: str | None) -> LineageTracker:
        from ._lineage_focus import read_neighbourhood

        if direction not in (None, "up", "down"):
            raise InvalidArgumentError(f"direction must be 'up', 'down' or None, got "
                                       f"{direction!r}", argument="direction")
        tracker = cls()
        nodes, edges = read_neighbourhood(registry, around, depth=depth, direction=direction)
        for node in nodes:
            tracker._insert(node)
        tracker.graph.add_edges_from(edges)
        return tracker

    @classmethod
    def from_store(cls, root: str | Path) -> LineageTracker:
        """Open ``root/registry.sqlite``, build the graph with blob checks, close it."""
        root = Path(root)
        db = root / "registry.sqlite"
        if not db.is_file():
            raise MissingFileError(
                f"no registry at {db}; pass the store directory given to init_run(root=...) "
                "or $REPRO_HOME",
                path=db,
            )
        registry = Registry(db)
        try:
            return cls.from_registry(registry, root)
        finally:
            registry.close()

    # -- helpers ----------------------------------------------------------------------------

    def _require(self, artifact_id: str) -> None:
        if artifact_id not in self.graph:
            raise ArtifactNotFoundError(
                f"no artifact {artifact_id!r} in the lineage graph ({len(self.nodes)} nodes); "
                "add it with add_artifact() first",
                key=artifact_id,
            )


def _issue(kind: str, severity: str, message: str, items: Sequence[Any]) -> dict[str, Any]:
    return {"type": kind, "severity": severity, "message": message, "count": len(items),
            "items": list(items)}


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


def _parse_document(document: object,
                    path: Path) -> tuple[list[LineageNode], list[tuple[str, str]]]:
    """Check a loaded lineage file completely before anything is replaced."""
    if not isinstance(document, dict) or document.get("format") != _FILE_FORMAT:
        raise SerializationError(f"{path} is not a repro lineage file", path=str(path))
    if document.get("format_version") != _FILE_VERSION:
        raise SerializationError(
            f"{path} has lineage format version {document.get('format_version')!r}; this "
            f"repro reads version {_FILE_VERSION}; upgrade repro-lightning",
            path=str(path),
        )
    try:
        nodes = [LineageNode.from_dict(n) for n in document["nodes"]]
        edges = [(str(u), str(v)) for u, v in document["edges"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise SerializationError(f"{path} is a damaged lineage file: {exc!r}",
                                 path=str(path)) from exc
    return nodes, edges
