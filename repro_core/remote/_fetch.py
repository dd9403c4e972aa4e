"""Blobs another host logged: fetched from a remote when a shared registry names them.

With a PostgreSQL registry, hosts share one set of rows but each keeps its blobs under its own
``REPRO_HOME``: a row logged on host A names a blob host B has never seen. Host A's run
mirrors what it logs to a remote (``init_run(remote=...)``, ``REPRO_REMOTE``), and the shared
registry records which remote holds which version (``remote_versions``). When B uses such a
version, the missing blobs are downloaded from those remotes — digest-verified, never more
than the recorded size — into B's store, which then serves them as its own. (A SQLite store
never needs this: its rows only name blobs it holds, or that ``repro pull`` brought.)
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from .. import constants
from ..errors import ArtifactNotFoundError, ReproError
from ..registry import Registry, VersionRow
from ..store.local import LocalStorageBackend
from ._config import is_wandb, list_remotes, normalize_url, open_backend

__all__ = ["fetch_missing"]


def _logged_here(store: LocalStorageBackend, row: VersionRow) -> bool:
    """Whether the run that logged ``row`` wrote its journal in this store (this host)."""
    return row.run_id is not None and (store.root / "runs" / row.run_id).is_dir()


def _candidates(registry: Registry, row: VersionRow) -> list[str]:
    """Remotes that hold the version first (as recorded), then every other one known."""
    holding = [str(r[0]) for r in registry._read(
        "SELECT url FROM remote_versions WHERE version_id = ? ORDER BY at", (row.id,))]
    known = list(list_remotes(registry).values())
    if constants.REPRO_REMOTE and "://" in constants.REPRO_REMOTE:
        known.append(normalize_url(constants.REPRO_REMOTE))
    return [u for u in dict.fromkeys(holding + known) if not is_wandb(u)]


def fetch_missing(store: LocalStorageBackend, registry: Registry, row: VersionRow) -> int:
    """Download the blobs of ``row`` this store lacks from a remote holding them. Returns how
    many were fetched. A version logged elsewhere whose blobs no remote has is an
    ``ArtifactNotFoundError`` saying so (not a "corrupt store": nothing here is damaged)."""
    missing = [(d, s) for d, s in registry.blobs_of(row.id) if not store.exists(d)]
    if not missing:
        return 0
    urls = _candidates(registry, row)
    if not urls:
        if _logged_here(store, row):
            return 0  # this host's own blob is gone: the caller's check reports the damage
        raise ArtifactNotFoundError(
            f"{row.key} was logged on another host (run {row.run_id}) and no remote holds "
            "its content: the host that logs must mirror to a remote every host can read "
            "(REPRO_REMOTE or init_run(..., remote=...))", key=row.key)
    store.ensure_layout()
    fetched, failures = 0, []
    with tempfile.TemporaryDirectory(dir=store.root / "tmp", prefix="fetch-") as scratch:
        target = Path(scratch) / "blob"
        for digest, size in missing:
            for url in urls:
                try:
                    open_backend(url).download(digest, target,  # type: ignore[call-arg]
                                               expected_size=size)
                except (ArtifactNotFoundError, ReproError, OSError) as exc:
                    target.unlink(missing_ok=True)
                    failures.append(f"{url}: {exc}")
                    continue  # not there (or unreachable): the next remote
                store.upload(target, digest)
                target.unlink(missing_ok=True)
                fetched += 1
                break
    if fetched < len(missing):  # the caller's check names the blob; say why it is not here
        warnings.warn(f"{row.key}: {len(missing) - fetched} blob(s) logged on another host "
                      f"could not be fetched ({'; '.join(failures[:3])})", RuntimeWarning,
                      stacklevel=3)
    return fetched
