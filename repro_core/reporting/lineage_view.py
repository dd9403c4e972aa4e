"""The report's lineage picture: the inputs and outputs of every run in the report, in one
graph (two runs that used one dataset share its box), drawn by the existing SVG renderer
(:func:`repro_core.lineage.render_svg`, graphviz when installed, else the built-in layout).

The renderer labels a version ``name:version`` over its type; a report also wants the full
key, the size and the digest, so each node is handed over with ``project/name`` as its name
and a second line in its version (``v3`` + ``12.0 KiB · blake3:1a2b3c4d5e6f``): both engines
split a label at line breaks and escape every line, and the type — which picks the colour —
stays the type, so the boxes keep the colours ``repro lineage`` gives them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

import networkx as nx

from ..lineage import RUN_KIND, LineageNode, LineageTracker, render_svg
from ..registry import Registry
from .records import ArtifactRow, RunData
from .units import fmt_size

__all__ = ["lineage_svg"]

_DIGEST_HEX = 12  # digest characters shown (as git's short hashes, a few more)
_PROLOG = re.compile(r"^.*?(?=<svg\b)", re.DOTALL)  # graphviz's <?xml ?> and <!DOCTYPE>


@dataclass
class _View:
    """A :class:`~repro_core.lineage.nodes.GraphView`: what ``render_svg`` reads."""

    graph: nx.DiGraph
    nodes: Mapping[str, LineageNode]


def lineage_svg(registry: Registry, runs: list[RunData]) -> str:
    """One SVG of every run's inputs and outputs (one edge away), ready to inline in HTML."""
    graph = nx.DiGraph()
    nodes: dict[str, LineageNode] = {}
    for data in runs:
        tracker = LineageTracker.from_registry(registry, around=f"run:{data.run.id}", depth=1)
        graph.add_nodes_from(tracker.graph.nodes)
        graph.add_edges_from(tracker.graph.edges)
        nodes.update(tracker.nodes)
    details = {a.key: a for data in runs for a in data.artifacts}
    labelled = {node_id: _labelled(node, details.get(node_id))
                for node_id, node in nodes.items()}
    svg = render_svg(_View(graph=graph, nodes=labelled))
    return _PROLOG.sub("", svg, count=1).strip()


def _labelled(node: LineageNode, row: ArtifactRow | None) -> LineageNode:
    """The node with its key, size and digest in the label (runs are left as they are)."""
    if node.kind == RUN_KIND or row is None:
        return node
    project, _, _ = row.key.partition("/")
    algorithm, _, hexdigest = row.digest.partition(":")
    facts = [fmt_size(row.size), f"{algorithm}:{hexdigest[:_DIGEST_HEX]}"]
    if row.pruned:
        facts.append("pruned")
    elif row.missing:
        facts.append("BLOB MISSING")
    return replace(node, artifact_name=f"{project}/{node.artifact_name}",
                   version=f"{node.version}\n{' · '.join(facts)}")
