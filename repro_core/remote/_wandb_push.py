"""Pushing to a ``wandb://[entity/]project`` remote: a push-only mirror in W&B Artifacts.

W&B users see each repro version as a W&B artifact (named by digest, with aliases
``<name>-v<N>``, ``<name>-<alias>``) logged by one mirror run; lineage is mirrored through
``use_artifact`` when online (W&B cannot reference unsynced artifacts offline). Offline, what
is logged lands in the offline run directory, ready for ``wandb sync``. The local store stays
the source of truth: what this store mirrored is recorded per URL in ``remote_versions`` (so a
second push sends nothing), and a W&B failure leaves the local copy as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._cache import serve_version
from ..registry import Registry
from ..store.local import LocalStorageBackend
from ._local import pushed_numbers, record_numbers
from ._remote import Remote, SyncReport

__all__ = ["WandbPusher"]


class WandbPusher:
    """One push of a selection of versions to a W&B mirror."""

    def __init__(self, registry: Registry, store: LocalStorageBackend, remote: Remote,
                 report: SyncReport, advance: Callable[[int], None]) -> None:
        self.registry, self.store, self.remote = registry, store, remote
        self.report, self.advance = report, advance
        self.numbers = pushed_numbers(registry, remote.url)

    def push(self, version_ids: list[int], run_ids: list[str]) -> SyncReport:
        """Mirror every version not mirrored yet; recorded as pushed only once the W&B run's
        log is complete on disk (``close``): an offline run's ``.wandb`` file is what
        ``wandb sync`` uploads, and W&B 0.31 finishes writing it after ``finish()`` returns."""
        del run_ids  # W&B holds artifacts only; runs and metrics stay in repro
        backend: Any = self.remote.backend
        mirrored: dict[int, int] = {}
        try:
            for vid in version_ids:
                if vid in self.numbers:
                    self.report.skipped += 1
                    continue
                number = self._mirror(backend, vid)
                if number is not None:
                    mirrored[vid] = number
        finally:
            backend.close()
        with self.registry.transaction() as conn:
            record_numbers(conn, self.remote.url, mirrored)
        self.numbers.update(mirrored)
        return self.report

    def _mirror(self, backend: Any, vid: int) -> int | None:
        row = self.registry.get_version(vid)
        if row.pruned_at is not None:
            self.report.skipped += 1
            return None
        # W&B gets the version's real bytes: a chunked one is put together (never its
        # manifest). A file is hashed against the row's digest by ``mirror_version``, so it
        # is served with the cheap check only (hashing it twice would buy nothing); a
        # directory is not re-hashed there, so its files are checked here in full.
        path = serve_version(self.store, self.registry, row, full=row.format == "directory")
        aliases = [a for a in self.registry.aliases_of(vid) if a != "latest"]
        if self.registry._read("SELECT 1 FROM aliases WHERE version_id = ? AND alias ="
                               " 'latest'", (vid,)):
            aliases.append("latest")
        backend.mirror_version(
            path, digest=row.digest, project=row.project, name=row.name, version=row.version,
            type=row.type, aliases=aliases,
            parents=[p.digest for p in self.registry.parents_of(vid)],
            metadata=row.metadata)
        self.report.versions.append(row.key)
        self.report.blobs += 1
        self.report.bytes += row.size
        self.advance(row.size)
        return row.version
