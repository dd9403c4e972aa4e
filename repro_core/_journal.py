"""Each run's append-only journal, ``runs/<run_id>/events.jsonl``: the second copy of what the
registry knows about the run's artifacts, kept beside the blobs.

Why: a registry can be lost (deleted, truncated, corrupted by a bad sync) while the blobs
survive. The journal is what ``repro recover`` rebuilds the registry from, and what ``repro gc``
consults so it never deletes a blob an export still names. ``run.json`` is written at start and
finish only; a run killed half-way has only its journal, which is appended as things happen.

One JSON object per line, appended with ``O_APPEND`` and fsynced (the line is small; the blob
it names was fsynced just before). A line torn by a crash is skipped when read, and whatever
is read is untrusted: readers validate every field before using it.

Events::

    {"event": "version", "at": …, "created": true|false, "project", "name", "version",
     "type", "digest", "size", "format", "filename", "metadata", "parents": [keys],
     "aliases": [...], "blobs": [[digest, size], …], "manifest": digest|null}
                                                  (manifest: chunked content, ``chunks``)
    {"event": "use", "at": …, "key": "project/name:vN", "digest": …}
    {"event": "prune", "at": …, "key": "project/name:vN", "digest": …, "aliases": [...]}
      (in the pruning run's journal, or the producing run's when no run was active)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import _fsio
from ._safepath import open_untrusted, real_dirs
from .errors import StorageError

__all__ = ["JOURNAL_NAME", "append_event", "journal_digests", "read_events", "run_export"]

JOURNAL_NAME = "events.jsonl"
_MAX_LINE = 16 * 1024 * 1024  # a forged journal must not make a reader allocate without bound


def run_export(registry: Any, run_id: str) -> dict[str, Any]:
    """What ``runs/<id>/run.json`` holds beside the journal (derived from the registry)."""
    return {
        "run": registry.get_run(run_id).__dict__,
        "states": [{"state": s, "at": at, "reason": r}
                   for s, at, r in registry.run_state_history(run_id)],
        "inputs": [v.key for v in registry.inputs_of(run_id)],
        "outputs": [v.key for v in registry.outputs_of(run_id)],
    }


def append_event(root: Path, run_id: str, event: dict[str, Any]) -> None:
    """Append one event line to the run's journal, durably."""
    path = root / "runs" / run_id / JOURNAL_NAME
    line = (json.dumps(event, sort_keys=True, separators=(",", ":"), default=str,
                       allow_nan=False) + "\n").encode("utf-8")
    real_dirs(root, "runs", run_id)  # a planted runs/<id> -> /elsewhere is refused
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o644)
        try:
            _fsio.write_all(fd, line)
            _fsio.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot append to {path}: {exc}", path=path,
                           errno=exc.errno) from exc


def read_events(path: Path, skipped: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """The parseable events of one journal file. A torn or forged line is skipped; with
    ``skipped`` (a list) its line number is appended there, so a caller can report it. The
    file is untrusted: a symlink, FIFO or device is not read, and no line is read past
    ``_MAX_LINE`` bytes (a longer one is skipped, not loaded)."""
    fd = open_untrusted(path)
    if fd is None:
        return
    with os.fdopen(fd, "rb") as handle:
        number = 0
        while raw := handle.readline(_MAX_LINE + 1):
            number += 1
            oversized = len(raw) > _MAX_LINE and not raw.endswith(b"\n")
            while oversized and (rest := handle.readline(_MAX_LINE + 1)) \
                    and not rest.endswith(b"\n"):
                pass  # drop the rest of an oversized line, a bounded piece at a time
            event = None if oversized else _parse(raw)
            if event is None:
                if skipped is not None and raw.strip():
                    skipped.append(number)
                continue
            yield event


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        event = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if isinstance(event, dict) and isinstance(event.get("event"), str):
        return event
    return None


def journal_digests(root: Path) -> set[str]:
    """Every blob digest any run journal names (gc keeps them: a registry that lost rows
    must not let gc delete what ``repro recover`` could still restore) — except the digests
    named only by versions a journal records as pruned (``prune_version``: released on
    purpose)."""
    runs = root / "runs"
    if not runs.is_dir():
        return set()
    loose: set[str] = set()
    by_key: dict[str, set[str]] = {}
    pruned: set[str] = set()
    for journal in runs.glob(f"*/{JOURNAL_NAME}"):
        for event in read_events(journal):
            key = _event_key(event)
            if event.get("event") == "prune" and key is not None:
                pruned.add(key)
                continue
            found = by_key.setdefault(key, set()) if key is not None else loose
            if isinstance(event.get("digest"), str):
                found.add(event["digest"])
            blobs = event.get("blobs")
            for item in blobs if isinstance(blobs, list) else []:
                if isinstance(item, list) and item and isinstance(item[0], str):
                    found.add(item[0])
    kept = set(loose)
    for key, digests in by_key.items():
        if key not in pruned:
            kept |= digests
    return kept


def _event_key(event: dict[str, Any]) -> str | None:
    """The version key (``project/name:vN``) an event is about, if it names one."""
    if event.get("event") == "version":
        project, name, number = event.get("project"), event.get("name"), event.get("version")
        if isinstance(project, str) and isinstance(name, str) and isinstance(number, int):
            return f"{project}/{name}:v{number}"
        return None
    key = event.get("key")
    return key if isinstance(key, str) else None
