"""An opened remote (its blob backend and its records) and the report of one push or pull."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError
from ..store._meta import RecordStore, records_for
from ..store._remote import redact_url
from ..store.base import StorageBackend
from ._config import is_wandb, open_backend

__all__ = ["Remote", "SyncReport"]


@dataclass
class Remote:
    """A remote store: blobs through ``backend``, registry rows through ``records``."""

    name: str
    url: str
    backend: StorageBackend
    records: RecordStore

    @classmethod
    def open(cls, name: str, url: str, **options: Any) -> Remote:
        backend = open_backend(url, **options)
        records = _NoRecords(url) if is_wandb(url) else records_for(backend)
        return cls(name, url, backend, records)

    @property
    def where(self) -> str:
        return redact_url(self.url)


class _NoRecords(RecordStore):
    """A W&B mirror keeps artifacts only: no registry rows to read or claim."""

    def __init__(self, url: str) -> None:
        self.where = url

    def _refuse(self, *_: Any, **__: Any) -> Any:
        raise InvalidArgumentError(f"{self.where} is a W&B mirror: it holds artifacts, not "
                                   "registry rows (push-only)", argument="remote")

    get = put = list = delete = _refuse


@dataclass
class SyncReport:
    """What one push or pull did (``--json`` prints :meth:`to_json`)."""

    direction: str
    remote: str
    url: str
    versions: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)
    blobs: int = 0
    bytes: int = 0
    aliases: int = 0
    skipped: int = 0
    skipped_runs: int = 0
    renumbered: list[tuple[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def transferred(self) -> bool:
        return bool(self.versions or self.runs or self.blobs or self.aliases)

    def to_json(self) -> dict[str, Any]:
        return {"direction": self.direction, "remote": self.remote,
                "url": redact_url(self.url), "versions": self.versions, "runs": self.runs,
                "blobs": self.blobs, "bytes": self.bytes, "aliases": self.aliases,
                "skipped_versions": self.skipped, "skipped_runs": self.skipped_runs,
                "renumbered": [{"from": a, "to": b} for a, b in self.renumbered],
                "problems": self.problems}
