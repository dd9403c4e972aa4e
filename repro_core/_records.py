"""Typed rows of the registry (what ``Registry`` returns and takes)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["NewVersion", "RunRow", "VersionRow", "run_row", "version_row"]


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

    @property
    def key(self) -> str:
        return f"{self.name}:v{self.version}"


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


def version_row(r: Sequence[Any]) -> VersionRow:
    return VersionRow(id=r[0], name=r[1], type=r[2], version=r[3], digest=r[4], size=r[5],
                      format=r[6], run_id=r[7], created_at=r[8], metadata=json.loads(r[9]))


def run_row(r: Sequence[Any]) -> RunRow:
    return RunRow(id=r[0], name=r[1], project=r[2], state=r[3], tags=json.loads(r[4]),
                  config=json.loads(r[5]), created_at=r[6], ended_at=r[7], host=r[8], pid=r[9],
                  world_size=r[10])
