"""Run exports for runs that came from a remote: ``runs/<id>/run.json`` and a journal.

A run logged here has its export and its append-only journal (``_journal.py``), which
``repro recover`` rebuilds a lost registry from and ``repro gc`` consults. A pulled run gets
the same, written from this store's rows after the pull (so the numbers are this store's): its
journal is *derived*, marked by ``runs/<id>/.pulled``, and rewritten whole at the next pull of
the run. A run that was logged here keeps its own journal untouched.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .. import _fsio
from .._journal import JOURNAL_NAME, run_export
from .._safepath import real_dirs
from ..capture import scrub
from ..registry import Registry, VersionRow

__all__ = ["export_pulled_run", "logged_here"]

_MARKER = ".pulled"


def export_pulled_run(registry: Registry, root: Path, run_id: str) -> None:
    """Write the export and the derived journal of a pulled run (not of a run logged here)."""
    run_dir = root / "runs" / run_id
    real_dirs(root, "runs", run_id)  # never write through a planted symlink
    if logged_here(root, run_id):
        return  # its export and journal are the originals
    run_dir.mkdir(parents=True, exist_ok=True)
    row = registry.get_run(run_id)
    # the marker first: a crash before the export is written must not make the run look
    # logged here (a run logged here is never updated by a pull)
    _write(run_dir / _MARKER, "written by repro pull: derived from the registry\n")
    _write(run_dir / "run.json", json.dumps(scrub(run_export(registry, run_id)), indent=2,
                                            sort_keys=True, default=str))
    _write(run_dir / "config.json", json.dumps(scrub(row.config), indent=2, sort_keys=True,
                                               default=str))
    lines = [json.dumps(e, sort_keys=True, separators=(",", ":"), default=str, allow_nan=False)
             for e in _events(registry, run_id)]
    _write(run_dir / JOURNAL_NAME, "".join(line + "\n" for line in lines))


def logged_here(root: Path, run_id: str) -> bool:
    """Whether run ``run_id`` was logged in the store at ``root``: it has an export or a
    journal that no pull wrote (``.pulled``, written before them, marks a pulled run)."""
    run_dir = root / "runs" / run_id
    return any((run_dir / name).exists() for name in (JOURNAL_NAME, "run.json")) \
        and not (run_dir / _MARKER).exists()


def _events(registry: Registry, run_id: str) -> list[dict[str, Any]]:
    logged = {v.id: at for v, at in _with_times(registry, run_id, "run_outputs", "logged_at")}
    events: list[dict[str, Any]] = []
    for row in registry.outputs_of(run_id):
        at = logged.get(row.id) or row.created_at
        events.append(_version_event(registry, row, at, created=row.run_id == run_id))
        if row.pruned_at is not None:
            events.append({"event": "prune", "at": row.pruned_at, "key": row.key,
                           "digest": row.digest, "aliases": []})
    for row, at in _with_times(registry, run_id, "run_inputs", "used_at"):
        events.append({"event": "use", "at": at, "key": row.key, "digest": row.digest})
    for event in events:
        event["derived"] = True  # numbered as this store numbers them now (``recover``)
    return sorted(events, key=lambda e: str(e["at"]))


def _with_times(registry: Registry, run_id: str, table: str, column: str
                ) -> list[tuple[VersionRow, str]]:
    rows = registry._read(f"SELECT version_id, {column} FROM {table} WHERE run_id = ?",
                          (run_id,))
    return [(registry.get_version(int(vid)), str(at)) for vid, at in rows]


def _version_event(registry: Registry, row: VersionRow, at: str, *,
                   created: bool) -> dict[str, Any]:
    """As ``_manager_artifacts._version_event`` writes it for a version logged here."""
    return {"event": "version", "at": at, "created": created, "linked": True,
            "project": row.project, "name": row.name, "version": row.version,
            "type": row.type, "digest": row.digest, "size": row.size, "format": row.format,
            "filename": row.filename, "metadata": row.metadata, "created_at": row.created_at,
            "parents": [p.key for p in registry.parents_of(row.id)],
            "aliases": registry.aliases_of(row.id), "blobs":
                [list(b) for b in registry.blobs_of(row.id)], "manifest": row.manifest}


def _write(path: Path, text: str) -> None:
    _fsio.write_file_atomic(path, text.encode("utf-8"))
