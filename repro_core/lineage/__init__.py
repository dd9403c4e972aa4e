"""Lineage: which artifact came from which, and which run produced or used it.

A graph comes from one of two places:

- by hand, as with the seed's tracker: ``add_artifact(id, ..., parent_ids=[...])``;
- from a store: ``LineageTracker.from_store(root)`` reads the registry in a handful of bulk
  queries (never one per node, so 100k versions load in seconds) and builds the bipartite
  graph of DESIGN.md, artifact ids being the registry's own version keys (``row.key``, e.g.
  ``default/model:v1``; shortened below)::

      dataset:v1 ──▶ run:1a2b ──▶ model:v1 ──▶ run:3c4d ──▶ evaluation:v1
                (used by)    (produced)    (used by)    (produced)

  plus ``parent ──▶ child`` edges for versions logged with ``parent_artifacts=``.

Modules import one way (a test parses them to keep it so)::

    nodes        LineageNode, kinds, run_node_id, GraphView   (imports no sibling)
      ├── render     DOT / Mermaid / SVG of a GraphView
      ├── validate   issues and stats of a GraphView
      ├── persist    the JSON lineage file
      └── store      whole graph from a registry
            └── focus    one node's neighbourhood from a registry
    tracker      LineageTracker: imports all of the above, none of them imports it
"""

from .nodes import ARTIFACT_KIND, RUN_KIND, LineageNode, run_node_id
from .render import render_svg, to_dot, to_mermaid
from .tracker import LineageTracker

__all__ = [
    "ARTIFACT_KIND",
    "RUN_KIND",
    "LineageNode",
    "LineageTracker",
    "render_svg",
    "run_node_id",
    "to_dot",
    "to_mermaid",
]
