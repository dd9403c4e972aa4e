"""Registry reads for graph walks, storage use and Test-Time RL: bulk edge lists, id batches,
logical against stored bytes (``repro du``, ``repro artifacts``), TTRL rows.

A mixin over ``Registry._read`` / ``_write``, kept apart so ``registry/`` stays the core
(runs, versions, aliases) and stays small.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from ._metrics_rows import decode_real
from .errors import InvalidArgumentError
from .registry.dialect import DBConnection
from .registry.records import (
    RUN_COLUMNS,
    VERSION_COLUMNS,
    VERSION_FROM,
    RunRow,
    VersionRow,
    load_json,
    run_row,
    version_row,
)

__all__ = ["BulkQueries"]

# (source column, target column) of each edge table, in edge direction.
_EDGE_COLUMNS = {"artifact_parents": ("parent_id", "child_id"),
                 "run_outputs": ("run_id", "version_id"),
                 "run_inputs": ("version_id", "run_id")}


def _chunks(ids: list[Any], size: int = 500) -> Iterator[list[Any]]:
    for start in range(0, len(ids), size):
        yield ids[start:start + size]



class BulkQueries:
    """Read helpers that need only ``_read`` and ``_write``, which ``Registry`` provides."""

    _read: Callable[..., list[tuple[Any, ...]]]
    _write: Callable[[], AbstractContextManager[DBConnection]]

    def versions_by_id(self, ids: Sequence[int]) -> list[VersionRow]:
        """The versions with these ids (any order), in chunks small enough for SQLite."""
        return [version_row(r) for chunk in _chunks(list(ids)) for r in self._read(
            f"SELECT {VERSION_COLUMNS} FROM {VERSION_FROM}"
            f" WHERE v.id IN ({', '.join('?' * len(chunk))})", chunk)]

    def runs_by_id(self, ids: Sequence[str]) -> list[RunRow]:
        return [run_row(r) for chunk in _chunks(list(ids)) for r in self._read(
            f"SELECT {RUN_COLUMNS} FROM runs WHERE id IN ({', '.join('?' * len(chunk))})",
            chunk)]

    def edges_touching(self, table: str, column: str, ids: Sequence[Any]
                       ) -> list[tuple[Any, Any]]:
        """Rows of one lineage edge table whose ``column`` is in ``ids`` (indexed lookups);
        for breadth-first walks that must not load the whole graph."""
        columns = _EDGE_COLUMNS[table]
        if column not in columns:
            raise InvalidArgumentError(f"{table} has no edge column {column!r}")
        return [(a, b) for chunk in _chunks(list(ids)) for a, b in self._read(
            f"SELECT {columns[0]}, {columns[1]} FROM {table}"
            f" WHERE {column} IN ({', '.join('?' * len(chunk))})", chunk)]

    def parent_edges(self) -> list[tuple[int, int]]:
        """Every ``(parent_id, child_id)`` artifact edge, in one read (for graph builders)."""
        return [(int(a), int(b)) for a, b in self._read(
            "SELECT parent_id, child_id FROM artifact_parents")]

    def output_edges(self) -> list[tuple[str, int]]:
        """Every ``(run_id, version_id)`` logged-by edge, in one read."""
        return [(str(a), int(b)) for a, b in self._read(
            "SELECT run_id, version_id FROM run_outputs ORDER BY logged_at")]

    def input_edges(self) -> list[tuple[int, str]]:
        """Every ``(version_id, run_id)`` used-by edge, oldest first, in one read."""
        return [(int(a), str(b)) for a, b in self._read(
            "SELECT version_id, run_id FROM run_inputs ORDER BY used_at")]

    def version_blob_pairs(self) -> list[tuple[int, str]]:
        """Every ``(version_id, digest)`` a version needs, in one read."""
        return [(int(a), str(b)) for a, b in self._read(
            "SELECT version_id, digest FROM version_blobs")]

    def usage_totals(self) -> tuple[int, int, int, int, int]:
        """``(versions, chunked versions, their bytes, distinct blobs, those blobs' bytes)``
        over live (unpruned) versions: what was logged against what is stored for it, each
        blob counted once however many versions (or chunked manifests) share it."""
        versions = self._read(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN manifest IS NOT NULL THEN 1 ELSE 0 END),"
            " 0), COALESCE(SUM(size), 0) FROM versions WHERE pruned_at IS NULL")[0]
        blobs = self._read(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM (SELECT b.digest, MAX(b.size) AS size"
            " FROM version_blobs b JOIN versions v ON v.id = b.version_id"
            " WHERE v.pruned_at IS NULL GROUP BY b.digest) AS live")[0]
        return (int(versions[0]), int(versions[1]), int(versions[2]), int(blobs[0]),
                int(blobs[1]))

    def new_bytes(self, ids: Sequence[int]) -> dict[int, int]:
        """For each version id: the bytes of its blobs that no earlier-logged (lower id) live
        version references — what logging it added to the store. Over the live versions these
        add up to ``usage_totals``' stored bytes."""
        out = {int(i): 0 for i in ids}
        for chunk in _chunks(list(out)):
            for version_id, size in self._read(
                    "SELECT b.version_id, COALESCE(SUM(b.size), 0) FROM version_blobs b"
                    f" WHERE b.version_id IN ({', '.join('?' * len(chunk))}) AND NOT EXISTS"
                    " (SELECT 1 FROM version_blobs e JOIN versions ev ON ev.id = e.version_id"
                    " WHERE e.digest = b.digest AND e.version_id < b.version_id"
                    " AND ev.pruned_at IS NULL) GROUP BY b.version_id", chunk):
                out[int(version_id)] = int(size)
        return out

    def online_updates(self, run_id: str, model_version_id: int | None
                       ) -> list[dict[str, Any]]:
        """A run's online updates made under one model version (None: before any), in order."""
        where = "model_version_id IS NULL" if model_version_id is None else "model_version_id = ?"
        params: list[Any] = [run_id] if model_version_id is None else [run_id, model_version_id]
        return [_update(r)[0] for r in self._read(
            f"SELECT {_UPDATE_SELECT} FROM online_updates WHERE run_id = ? AND {where}"
            " ORDER BY id", params)]

    def count_online_updates(self, run_id: str) -> int:
        """How many online updates a run has (a resumed TTRL run numbers on from there)."""
        rows = self._read("SELECT COUNT(*) FROM online_updates WHERE run_id = ?", [run_id])
        return int(rows[0][0]) if rows else 0

    def run_online_updates(self, run_id: str) -> list[dict[str, Any]]:
        """Every online update of a run, in order, each with its ``model_version_id``."""
        out = []
        for r in self._read(f"SELECT {_UPDATE_SELECT} FROM online_updates WHERE run_id = ?"
                            " ORDER BY id", [run_id]):
            update, version = _update(r)
            out.append({**update, "model_version_id": version})
        return out

    def insert_experience(self, row: tuple[Any, ...], columns: Sequence[str]) -> None:
        """One experience row, committed now (large payloads; small ones are batched)."""
        with self._write() as conn:
            conn.execute(f"INSERT INTO experiences ({', '.join(columns)}) VALUES "
                         f"({', '.join('?' * len(columns))})", row)

    def experiences(self, run_id: str) -> list[dict[str, Any]]:
        """A run's experiences in order; ``input``/``output`` decoded unless stored as a blob
        (then ``payload_digest`` names it)."""
        rows = self._read(
            "SELECT experience_id, input, output, payload_digest, payload_size, metadata, time"
            " FROM experiences WHERE run_id = ? ORDER BY time, id", [run_id])
        return [{"experience_id": r[0],
                 "input": None if r[3] else load_json(r[1], "an experience input"),
                 "output": None if r[3] else load_json(r[2], "an experience output"),
                 "payload_digest": r[3], "payload_size": r[4],
                 "metadata": load_json(r[5], "experience metadata"),
                 "timestamp": r[6]}
                for r in rows]


_UPDATE_SELECT = ("update_id, experience_id, reward, confidence, kl_divergence, metadata, time,"
                  " model_version_id")


def _update(r: Sequence[Any]) -> tuple[dict[str, Any], int | None]:
    """An online update as ``log_online_update`` returned it; NaN/±inf were stored as text
    (SQLite would have made a NaN REAL a NULL) and become floats again."""
    return ({"update_id": r[0], "experience_id": r[1], "reward": decode_real(r[2]),
             "confidence": decode_real(r[3]), "kl_divergence": decode_real(r[4]),
             "metadata": load_json(r[5], "update metadata"), "timestamp": r[6]}, r[7])
