"""Typed rows of the registry (what ``Registry`` returns and takes), and the one place that
knows which columns make them.

Rows are built from what is stored, and a store may have been written by someone else: a
column holding JSON that does not parse is a damaged row, reported as ``IntegrityError``
naming the table, never a bare ``json.JSONDecodeError`` from deep inside a query.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import IntegrityError
from ..types import ArtifactType

__all__ = [
    "ARTIFACT_JOIN", "RUN_COLUMNS", "VERSION_COLUMNS", "VERSION_FROM", "NewVersion", "RunRow",
    "VersionRow", "dumps", "load_json", "run_row", "version_row",
]

# SELECT list and FROM clause of every query that returns VersionRow (``v`` = versions,
# ``a`` = artifacts, for the type).
VERSION_COLUMNS = (
    "v.id, v.name, a.type, v.version, v.digest, v.size, v.format, v.run_id, v.created_at, "
    "v.metadata, v.project, v.filename, v.pruned_at, v.manifest"
)
ARTIFACT_JOIN = "JOIN artifacts a ON a.project = v.project AND a.name = v.name"
VERSION_FROM = f"versions v {ARTIFACT_JOIN}"
RUN_COLUMNS = ("id, name, project, state, tags, config, created_at, ended_at, host, pid,"
               " world_size, pid_started, process_ns, segment")


@dataclass(frozen=True)
class VersionRow:
    """One artifact version as stored."""

    id: int
    name: str
    type: str
    version: int
    digest: str
    size: int
    format: str
    run_id: str | None
    created_at: str
    metadata: dict[str, Any]
    project: str = "default"
    filename: str | None = None
    pruned_at: str | None = None  # pruned (``prune_version``): kept for lineage, content gone
    manifest: str | None = None  # chunked content: the blob listing its parts (``chunks``)

    @property
    def key(self) -> str:
        """``project/name:vN``: names this version in any context."""
        return f"{self.project}/{self.name}:v{self.version}"


@dataclass(frozen=True)
class RunRow:
    """One run as stored."""

    id: str
    name: str
    project: str
    state: str
    tags: list[str]
    config: dict[str, Any]
    created_at: str
    ended_at: str | None
    host: str | None
    pid: int | None
    world_size: int | None
    pid_started: float | None = None
    process_ns: str | None = None  # "<boot id>/<pid namespace>": where ``pid`` means anything
    segment: int = 0  # how many times the run was resumed (metrics carry the segment they came in)


@dataclass(frozen=True)
class NewVersion:
    """Everything ``add_version`` needs, validated and hashed by the caller beforehand."""

    name: str
    type: str
    digest: str
    size: int
    format: str
    run_id: str | None
    metadata: dict[str, Any]
    parent_ids: Sequence[int] = ()
    aliases: Sequence[str] = ()
    blobs: Sequence[tuple[str, int]] = ()
    project: str = "default"
    filename: str | None = None
    manifest: str | None = None  # chunked content (``chunks``): its manifest's digest


_TYPES = frozenset(t.value for t in ArtifactType)


def _is_time(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def dumps(value: Any) -> str:
    """Canonical JSON for registry columns (sorted keys, never NaN)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def load_json(text: object, where: str) -> Any:
    """Parse a JSON column; a damaged value is an ``IntegrityError`` naming where it was."""
    try:
        return json.loads(text)  # type: ignore[arg-type]
    except (TypeError, ValueError, RecursionError) as exc:
        raise IntegrityError(f"the registry's {where} is not valid JSON ({exc}); the store "
                             "is damaged: `repro verify` names what else is affected") from None


def version_row(r: Sequence[Any]) -> VersionRow:
    """A version as stored, every column checked: a forged one is an ``IntegrityError``."""
    if not isinstance(r[3], int) or not isinstance(r[5], int) or not isinstance(r[4], str) \
            or not all(isinstance(r[i], str) for i in (1, 6, 10)):
        raise IntegrityError(f"registry row of version {r[0]} ({r[1]!r}) has a forged version "
                             "number, size, digest, name, format or project")
    if r[2] not in _TYPES:
        raise IntegrityError(f"registry row of version {r[0]} ({r[1]!r}) has the unknown type "
                             f"{r[2]!r}")
    metadata = load_json(r[9], f"metadata of version {r[0]}")
    if not isinstance(metadata, dict):
        raise IntegrityError(f"the registry's metadata of version {r[0]} is not a JSON object")
    return VersionRow(id=r[0], name=r[1], type=r[2], version=r[3], digest=r[4], size=r[5],
                      format=r[6], run_id=r[7], created_at=r[8], metadata=metadata,
                      project=r[10], filename=r[11],
                      pruned_at=r[12] if isinstance(r[12], str) else None,
                      manifest=_manifest_column(r))


def _manifest_column(r: Sequence[Any]) -> str | None:
    """The chunk manifest's digest, or None; anything but a string or NULL is forged (its
    form is checked where it is used: ``_safepath.check_digest``)."""
    value = r[13] if len(r) > 13 else None
    if value is not None and not isinstance(value, str):
        raise IntegrityError(f"registry row of version {r[0]} ({r[1]!r}) has a forged "
                             f"manifest {value!r}")
    return value


def run_row(r: Sequence[Any]) -> RunRow:
    if not all(isinstance(r[i], str) for i in (0, 1, 2, 3, 6)) or not _is_time(r[6]):
        raise IntegrityError(f"registry row of run {r[0]!r} has a forged id, name, project, "
                             "state or start time")
    return RunRow(id=r[0], name=r[1], project=r[2], state=r[3],
                  tags=load_json(r[4], f"tags of run {r[0]}"),
                  config=load_json(r[5], f"config of run {r[0]}"), created_at=r[6],
                  ended_at=r[7], host=r[8], pid=r[9], world_size=r[10], pid_started=r[11],
                  process_ns=r[12], segment=_segment(r[0], r[13]))


def _segment(run_id: object, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1_000_000:
        raise IntegrityError(f"registry row of run {run_id!r} has a forged segment {value!r}")
    return value
