"""Reading a whole lineage graph out of a store's registry, in a fixed handful of bulk queries.

(This is the lineage side of a store; the blobs themselves live in :mod:`repro_core.store`.)

One query per node (``parents_of`` / ``inputs_of`` for each version) would be 100k round trips on
a 100k-version store; here it is six reads whatever the size: ``run_outputs``,
``artifact_parents``, ``run_inputs``, versions, runs, and (for blob checks) ``version_blobs``.

Artifact node ids are the registry rows' own ``key`` (never formatted here), so whatever the
registry calls a version — ``name:vN`` or ``project/name:vN`` — is what the graph calls it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..registry import Registry, RunRow, VersionRow
from .nodes import RUN_KIND, LineageNode, run_node_id

__all__ = ["open_store_registry", "read_registry", "run_node", "version_node"]

_Edge = tuple[str, str]


def open_store_registry(root: Path) -> Registry:
    """The registry of the store at ``root``, read-only: never creates one (a typo must not
    make a store). No store is ``StoreNotFoundError``; a lost registry in a store that holds
    data is ``RegistryDamagedError`` (which names ``repro recover``)."""
    registry = Registry(root / "registry.sqlite", readonly=True)
    registry.open()
    return registry


def read_registry(registry: Registry, *, with_blobs: bool
                  ) -> tuple[list[LineageNode], list[_Edge], dict[str, tuple[str, ...]]]:
    """Nodes (runs, then versions), edges, and the blobs each version needs (if asked)."""
    # Read order matters without a shared snapshot: edges first, then versions, then runs.
    # Versions and runs are never deleted and an edge only names rows that existed when it was
    # written, so each later read covers everything the earlier ones refer to, even when a
    # writer commits in between.
    output_rows = registry.output_edges()
    parent_rows = registry.parent_edges()
    input_rows = registry.input_edges()
    versions = registry.list_versions()
    runs = registry.list_runs()
    keys = {v.id: v.key for v in versions}
    nodes = [run_node(r) for r in runs] + [version_node(v) for v in versions]
    edges = list(_store_edges(output_rows, parent_rows, input_rows, keys))
    blobs = _blob_refs(registry, versions, keys) if with_blobs else {}
    return nodes, edges, blobs


def run_node(run: RunRow) -> LineageNode:
    """A run as a graph node (``run:<id>``; project, state and tags kept as metadata)."""
    return LineageNode(
        artifact_id=run_node_id(run.id), artifact_name=run.name, artifact_type=RUN_KIND,
        version="", created_at=run.created_at, run_id=run.id,
        metadata={"project": run.project, "state": run.state, "tags": list(run.tags)},
        kind=RUN_KIND,
    )


def version_node(version: VersionRow) -> LineageNode:
    """An artifact version as a graph node, named by the row's own ``key``."""
    return LineageNode(
        artifact_id=version.key, artifact_name=version.name, artifact_type=version.type,
        version=f"v{version.version}", created_at=version.created_at, run_id=version.run_id,
        metadata=dict(version.metadata),
    )


def _store_edges(output_rows: Sequence[tuple[Any, ...]], parent_rows: Sequence[tuple[Any, ...]],
                 input_rows: Sequence[tuple[Any, ...]], keys: dict[int, str]) -> Iterator[_Edge]:
    """logged-by (run → version; the creator and every run whose identical content
    deduplicated to it), parent-of (version → version), used-by (version → run).

    A row naming a version id missing from ``keys`` (possible only with foreign keys off)
    becomes a dangling ``version-id:N`` reference: reported by validation, never dropped.
    """
    for run_id, version_id in output_rows:
        yield run_node_id(run_id), _key(keys, version_id)
    for parent_id, child_id in parent_rows:
        yield _key(keys, parent_id), _key(keys, child_id)
    for version_id, run_id in input_rows:
        yield _key(keys, version_id), run_node_id(run_id)


def _key(keys: dict[int, str], version_id: int) -> str:
    return keys.get(version_id, f"version-id:{version_id}")


def _blob_refs(registry: Registry, versions: Sequence[VersionRow],
               keys: dict[int, str]) -> dict[str, tuple[str, ...]]:
    """Each version's own digest plus every blob it lists (a directory lists its files)."""
    refs: dict[str, set[str]] = {v.key: {v.digest} for v in versions}
    for version_id, digest in registry.version_blob_pairs():
        key = keys.get(version_id)
        if key is not None:  # committed after list_versions(): not part of this graph
            refs[key].add(digest)
    return {key: tuple(sorted(digests)) for key, digests in refs.items()}
