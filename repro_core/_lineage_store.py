"""Reading a lineage graph out of the registry, in a fixed handful of bulk queries.

One query per node (``parents_of`` / ``inputs_of`` for each version) would be 100k round trips on
a 100k-version store; here it is five reads whatever the size: ``artifact_parents``,
``run_inputs``, versions, runs, and (for blob checks) ``version_blobs``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from .errors import InvalidArgumentError
from .lineage import RUN_KIND, LineageNode, run_node_id
from .registry import Registry, RunRow, VersionRow
from .store.local import LocalStorageBackend

__all__ = ["missing_blobs", "read_registry", "run_node", "version_node"]

_Edge = tuple[str, str]


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
    return LineageNode(
        artifact_id=run_node_id(run.id), artifact_name=run.name, artifact_type=RUN_KIND,
        version="", created_at=run.created_at, run_id=run.id,
        metadata={"project": run.project, "state": run.state, "tags": list(run.tags)},
        kind=RUN_KIND,
    )


def version_node(version: VersionRow) -> LineageNode:
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


def missing_blobs(store: LocalStorageBackend,
                  refs: dict[str, tuple[str, ...]]) -> Iterator[dict[str, str]]:
    """``{"id", "digest", "path"}`` for every referenced blob that is not a file in ``store``."""
    for node_id, digests in refs.items():
        for digest in digests:
            try:
                path = str(store.blob_path(digest))
            except InvalidArgumentError:  # a malformed digest names no blob at all
                path = ""
            if not path or not store.exists(digest):
                yield {"id": node_id, "digest": digest, "path": path}
