"""The records of a lineage graph: node kinds, run ids, :class:`LineageNode`, and the read-only
view that renderers and checks take.

This is the bottom of the package: every other lineage module imports from here and this one
imports none of them, so a node record can be used (and pickled, and type-checked) without
pulling in the registry, the renderers or graphviz.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol

import networkx as nx

from ..errors import InvalidArgumentError

__all__ = ["ARTIFACT_KIND", "KINDS", "RUN_KIND", "GraphView", "LineageNode", "run_node_id"]

ARTIFACT_KIND = "artifact"
RUN_KIND = "run"
KINDS = (ARTIFACT_KIND, RUN_KIND)


def run_node_id(run_id: str) -> str:
    """The graph id of a run node (``run:<id>``).

    Artifact ids are whatever the caller (or, for a store-built graph, the registry row's
    ``key``) says; run ids get a fixed prefix so both kinds share one id space.
    """
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
        if self.kind not in KINDS:
            raise InvalidArgumentError(
                f"LineageNode kind {self.kind!r} is not one of {KINDS}", argument="kind"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (metadata copied, so editing it leaves the node alone)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LineageNode:
        """Inverse of :meth:`to_dict`; unknown keys are ignored so newer files still load."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class GraphView(Protocol):
    """What renderers and checks read: the structure and the node records.

    A protocol rather than ``LineageTracker`` itself, so those modules need not import the
    tracker (which imports them): the package's imports stay one-way. Ids in ``graph`` with no
    entry in ``nodes`` are dangling parent references.
    """

    @property
    def graph(self) -> nx.DiGraph: ...

    @property
    def nodes(self) -> Mapping[str, LineageNode]: ...
