"""Rebuild a lost registry from what the store still holds: run exports and journals, blobs.

``runs/<id>/run.json`` gives each run (name, project, state history, config);
``runs/<id>/events.jsonl`` gives every version the run logged (digest, size, format, type,
metadata, parents, aliases, the blobs it needs) and every version it used. Everything read is
untrusted: a field of the wrong type, a name outside the grammar, a digest that is not one or
a blob that is missing is reported and skipped, never used to build a path or a row.

What cannot come back: metrics and TTRL updates/experiences (they live only in the registry),
and state changes after a run's last export. The report says so, with everything it skipped.

The new registry is built beside the old location (``tmp/``) and renamed into place, so a
crash half-way leaves no half-registry; an existing registry is never overwritten (the caller
moves it aside first: ``repro recover --force``).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from . import _fsio, constants
from ._journal import JOURNAL_NAME, read_events
from ._safepath import check_digest, read_untrusted, safe_component
from .capture.scrub import scrub, scrub_text
from .chunks.manifest import MAX_MANIFEST, check_manifest_row, parse_manifest
from .errors import IntegrityError, InvalidArgumentError, ReproError
from .hashing import parse_digest
from .registry import Registry, dumps
from .registry.dialect import redact_url
from .registry.target import configured_url
from .store.local import LocalStorageBackend, stored_algorithm
from .types import (
    ArtifactType,
    RunState,
    parse_key,
    utc_now,
    validate_alias,
    validate_name,
)

__all__ = ["RecoverReport", "recover_store"]

# What init_run accepts as a run id (generated ids are 12 hex digits; run_id= chooses one).
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{3,63}")
_FORMATS = {"json", "text", "bytes", "safetensors", "npy", "file", "directory"}


@dataclass
class RecoverReport:
    """What ``recover_store`` rebuilt, and what it could not."""

    registry_path: Path
    runs: int = 0
    versions: int = 0
    aliases: int = 0
    edges: int = 0
    problems: list[str] = field(default_factory=list)
    not_recoverable: tuple[str, ...] = (
        "metrics and TTRL updates/experiences (kept only in the registry)",
        "state changes after each run's last export",
    )


def recover_store(root: str | Path) -> RecoverReport:
    """Rebuild ``root/registry.sqlite`` from ``root/runs/*`` and ``root/blobs``."""
    root_path = Path(root).expanduser().absolute()
    final = root_path / "registry.sqlite"
    bound = configured_url(root_path)
    if bound is not None:  # a shared server's database: not ours to rebuild from one host
        raise InvalidArgumentError(
            f"the store {root_path} keeps its registry on PostgreSQL ({redact_url(bound)}): "
            "restore that database from the server's backups. repro recover rebuilds a "
            "SQLite registry (remove registry.url first to rebuild one from this host's "
            "journals)", argument="root")
    if final.exists() and final.stat().st_size > 0:
        raise InvalidArgumentError(
            f"{final} exists; move it aside first (repro recover --force does) so nothing "
            "is overwritten", argument="root")
    if not (root_path / "runs").is_dir() and not (root_path / "blobs").is_dir():
        raise InvalidArgumentError(f"{root_path} holds no repro store (no runs/, no blobs/)",
                                   argument="root")
    store = LocalStorageBackend(root_path, algorithm=stored_algorithm(root_path)
                                 or constants.REPRO_HASH)
    store.ensure_layout()
    building = store.tmp_dir / f".recover-{os.getpid()}-{secrets.token_hex(4)}.sqlite"
    report = RecoverReport(registry_path=final)
    registry = Registry(building, algorithm=store.algorithm, create=True)
    try:
        _Rebuild(registry, store, report).run(root_path / "runs")
        registry.close()
        _fsio.fsync_dir(building.parent)
        _set_aside_leftovers(final)
        _fsio.replace(building, final)
        _fsio.fsync_dir(root_path)
    except BaseException:
        registry.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{building}{suffix}").unlink(missing_ok=True)
        raise
    return report


def _set_aside_leftovers(final: Path) -> None:
    """A ``-wal`` left by the lost registry would be replayed into the new one by SQLite:
    move such files aside (kept, with a time stamp, never deleted)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for suffix in ("-wal", "-shm", "-journal"):
        leftover = Path(f"{final}{suffix}")
        if leftover.exists():
            _fsio.replace(leftover, leftover.with_name(f"{leftover.name}.bak-{stamp}"))


class _Rebuild:
    """One recovery pass: runs, then versions, then aliases, parents and uses."""

    def __init__(self, registry: Registry, store: LocalStorageBackend,
                 report: RecoverReport) -> None:
        self.registry, self.store, self.report = registry, store, report
        self.ids: dict[str, int] = {}  # version key -> row id
        self.pending_parents: list[tuple[str, Any]] = []
        self.uses: list[tuple[str, Any]] = []
        self.aliases: list[tuple[str, Any]] = []
        self.prunes: list[tuple[str, str]] = []  # (version key, when)
        self.missing: list[tuple[str, str]] = []  # (version key, problem): unless pruned

    def run(self, runs_dir: Path) -> None:
        run_dirs = sorted(d for d in runs_dir.iterdir() if d.is_dir() and not d.is_symlink()) \
            if runs_dir.is_dir() and not runs_dir.is_symlink() else []
        events: list[tuple[str, str, dict[str, Any]]] = []
        with self.registry.transaction() as conn:
            for run_dir in run_dirs:
                if not _RUN_ID.fullmatch(run_dir.name):
                    self.report.problems.append(f"skipped runs/{run_dir.name!r}: not a run id")
                    continue
                if not any((run_dir / n).exists() for n in ("run.json", JOURNAL_NAME)):
                    self.report.problems.append(f"skipped runs/{run_dir.name!r}: not a run "
                                                "(no run.json, no journal)")
                    continue
                self._run(conn, run_dir)
                skipped: list[int] = []
                events += [(str(e.get("at", "")), run_dir.name, e)
                           for e in read_events(run_dir / JOURNAL_NAME, skipped)]
                if skipped:
                    self.report.problems.append(
                        f"run {run_dir.name}: skipped {len(skipped)} unreadable journal "
                        f"line(s) (torn or forged): line {', '.join(map(str, skipped[:5]))}"
                        f"{', …' if len(skipped) > 5 else ''}")
            for _, run_id, event in sorted(_renumbered(events), key=lambda t: (t[0], t[1])):
                self._event(conn, run_id, event)
            self._link(conn)

    # -- runs -------------------------------------------------------------------------------

    def _run(self, conn: Any, run_dir: Path) -> None:
        run_id = run_dir.name
        export = _read_json(run_dir / "run.json")
        row = export.get("run") if isinstance(export, dict) else None
        if not isinstance(row, dict):
            row = {}
            self.report.problems.append(f"run {run_id}: no readable run.json; recorded with "
                                        "what its journal says")
        states = export.get("states", []) if isinstance(export, dict) else []
        fields = _run_fields(run_id, row)
        conn.execute(
            "INSERT INTO runs (id, name, project, state, tags, config, created_at, ended_at,"
            " host, pid, world_size, pid_started, process_ns, segment) VALUES (?, ?, ?, ?, ?,"
            " ?, ?, ?, ?, ?, ?, ?, ?, ?)", fields)
        history = [s for s in states if isinstance(s, dict) and _is_state(s.get("state"))
                   and isinstance(s.get("at"), str)] or [{"state": fields[3], "at": fields[6]}]
        conn.executemany("INSERT INTO run_states (run_id, state, at, reason) VALUES"
                         " (?, ?, ?, ?)",
                         [(run_id, s["state"], s["at"], _text(s.get("reason"))) for s in history])
        self.report.runs += 1

    # -- events -----------------------------------------------------------------------------

    def _event(self, conn: Any, run_id: str, event: dict[str, Any]) -> None:
        try:
            if event["event"] == "version":
                self._version(conn, run_id, event)
            elif event["event"] in ("use", "prune"):
                key = event.get("key")
                parse_key(key)  # a forged key is reported, not silently dropped
                if event["event"] == "use":
                    self.uses.append((run_id, key))
                else:
                    self.prunes.append((str(key), _time(event.get("at")) or utc_now()))
            else:
                raise ValueError(f"unknown event {event['event']!r}")
        except KeyError as exc:
            self.report.problems.append(f"run {run_id}: skipped a {event.get('event')!r} "
                                        f"journal line without {exc}")
        except (ReproError, TypeError, ValueError, sqlite3.IntegrityError) as exc:
            self.report.problems.append(f"run {run_id}: skipped a journal line ({exc})")

    def _version(self, conn: Any, run_id: str, event: dict[str, Any]) -> None:
        key = parse_key(f"{event['project']}/{event['name']}:v{int(event['version'])}")
        assert key.project is not None and key.version is not None
        text = key.text()
        self.aliases.append((text, event.get("aliases", [])))
        self.pending_parents.append((text, event.get("parents", [])))
        if text in self.ids:  # a later log of the same content: link the logging run
            existing = conn.execute("SELECT digest FROM versions WHERE id = ?",
                                    (self.ids[text],)).fetchone()
            if existing[0] != event.get("digest"):
                raise ValueError(f"{text} is named twice with different content")
            if event.get("linked", True) is not False:  # the live registry linked it too
                _insert_output(conn, run_id, self.ids[text], event.get("at"))
            return
        if event.get("created") is False:
            raise ValueError(f"{text} was logged again but its first log is missing")
        vid = self._insert_version(conn, run_id, key, event)
        self.ids[text] = vid
        _insert_output(conn, run_id, vid, event.get("at"))
        self.report.versions += 1

    def _insert_version(self, conn: Any, run_id: str, key: Any, event: dict[str, Any]) -> int:
        type_ = ArtifactType.coerce(event["type"]).value
        digest, size, fmt = event["digest"], event["size"], event["format"]
        parse_digest(digest)
        if not isinstance(size, int) or size < 0 or fmt not in _FORMATS:
            raise ValueError(f"{key.text()} has a forged size or format")
        metadata = event.get("metadata", {})
        if not isinstance(metadata, dict):
            raise ValueError(f"{key.text()} has forged metadata")
        metadata = scrub(metadata)  # a journal from elsewhere may carry what we never store
        manifest = _manifest(key.text(), event, digest, fmt)
        blobs = self._blobs(key.text(), event.get("blobs", []), digest, size, manifest)
        filename = safe_component(event.get("filename"))  # a forged one: named by digest
        conn.execute("INSERT INTO artifacts (project, name, type, created_at) VALUES"
                     " (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                     (key.project, key.name, type_, str(event.get("created_at", ""))))
        cursor = conn.execute(
            "INSERT INTO versions (project, name, version, digest, size, format, run_id,"
            " created_at, metadata, filename, manifest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " ?) RETURNING id",
            (key.project, key.name, key.version, digest, size, fmt, run_id,
             str(event.get("created_at", "")), dumps(metadata),
             filename if isinstance(filename, str) else None, manifest))
        vid = int(cursor.fetchone()[0])
        conn.executemany("INSERT INTO version_blobs (version_id, digest, size) VALUES (?, ?, ?)"
                         " ON CONFLICT DO NOTHING", [(vid, d, s) for d, s in blobs])
        return vid

    def _blobs(self, key: str, raw: Any, digest: str, size: int,
               manifest: str | None) -> list[tuple[str, int]]:
        """The blobs a version line lists; a line without (an older journal) means the one
        blob of its digest — never for chunked content, whose digest is no blob: its line
        must list the manifest, and the parts the manifest names (checked when it is here)."""
        blobs = []
        for item in raw if isinstance(raw, list) else []:
            if isinstance(item, list) and len(item) == 2 and type(item[1]) is int \
                    and item[1] >= 0:
                blobs.append((check_digest(item[0], where=f"{key} blob"), item[1]))
        if not blobs and manifest is None:
            blobs = [(digest, size)]
        if manifest is not None:
            self._check_chunked(key, blobs, digest, size, manifest)
        for blob, blob_size in blobs:
            path = self.store.blob_path(blob)
            if not path.is_file() or path.stat().st_size != blob_size:
                self.missing.append((key, f"{key}: blob {blob} is missing or damaged (the "
                                          "version is restored; `repro verify` lists it)"))
        return blobs

    def _check_chunked(self, key: str, blobs: list[tuple[str, int]], digest: str, size: int,
                       manifest: str) -> None:
        """A chunked version's line names its manifest among its blobs; when the manifest is
        in the store it must describe this version and list only those blobs (a forged line
        is skipped, never a row whose parts do not make its file). A missing manifest is
        reported like any missing blob."""
        recorded = dict(blobs)
        if manifest not in recorded:
            raise ValueError(f"{key} names the chunk manifest {manifest}, which is not among "
                             "its blobs")
        path = self.store.blob_path(manifest)
        try:
            if not path.is_file() or path.stat().st_size != recorded[manifest]:
                return  # reported with the missing blobs
            if recorded[manifest] > MAX_MANIFEST:
                raise ValueError(f"{key} names a chunk manifest of {recorded[manifest]} "
                                 "bytes, more than any repro writes")
            raw = self.store.check(manifest, recorded[manifest], full=True).read_bytes()
        except (IntegrityError, OSError):
            return  # a damaged manifest blob: restored, reported as a damaged blob
        try:
            check_manifest_row(parse_manifest(raw, digest=manifest), key, digest, size,
                               recorded)
        except IntegrityError as exc:  # an intact blob, but no manifest of this version
            raise ValueError(f"{key}: its line is forged ({exc})") from None

    # -- edges ------------------------------------------------------------------------------

    def _link(self, conn: Any) -> None:
        for child, parents in self.pending_parents:
            for parent in parents if isinstance(parents, list) else []:
                if parent not in self.ids or child not in self.ids:
                    self.report.problems.append(
                        f"{child}: parent {str(parent)[:80]!r} is not a recovered version; "
                        "edge skipped")
                    continue
                if parent != child:
                    conn.execute("INSERT INTO artifact_parents (child_id, parent_id) VALUES"
                                 " (?, ?) ON CONFLICT DO NOTHING",
                                 (self.ids[child], self.ids[parent]))
                    self.report.edges += 1
        for run_id, key in self.uses:
            if key not in self.ids:
                self.report.problems.append(f"run {run_id}: used {str(key)[:80]!r}, which is "
                                            "not a recovered version; edge skipped")
            else:
                # The registry's own rule: a run that logged a version never used it (a
                # forged use line must not close a lineage cycle).
                self.report.edges += conn.execute(
                    "INSERT INTO run_inputs (run_id, version_id, used_at) SELECT ?, ?, ''"
                    " WHERE NOT EXISTS (SELECT 1 FROM run_outputs WHERE run_id = ? AND"
                    " version_id = ?) ON CONFLICT DO NOTHING",
                    (run_id, self.ids[key], run_id, self.ids[key])).rowcount
        for key, aliases in self.aliases:
            self._aliases(conn, key, aliases)
        for key, at in self.prunes:  # as prune_version did: no aliases, pruned_at set
            if key in self.ids:
                conn.execute("DELETE FROM aliases WHERE version_id = ?", (self.ids[key],))
                conn.execute("UPDATE versions SET pruned_at = ? WHERE id = ?",
                             (at, self.ids[key]))
        pruned = {key for key, _ in self.prunes}  # their blobs were released on purpose
        self.report.problems += [problem for key, problem in self.missing if key not in pruned]
        conn.execute(
            "INSERT INTO aliases (project, name, alias, version_id) SELECT project, name,"
            " 'latest', id FROM versions v WHERE version = (SELECT MAX(version) FROM versions"
            " w WHERE w.project = v.project AND w.name = v.name AND w.pruned_at IS NULL)"
            " ON CONFLICT DO UPDATE SET version_id = excluded.version_id")

    def _aliases(self, conn: Any, key: str, aliases: Any) -> None:
        parsed = parse_key(key)
        for alias in aliases if isinstance(aliases, list) else []:
            if alias == "latest" or key not in self.ids:
                continue
            try:
                validate_alias(alias)
            except ReproError:
                self.report.problems.append(f"{key}: skipped forged alias {alias!r}")
                continue
            conn.execute("INSERT INTO aliases (project, name, alias, version_id) VALUES"
                         " (?, ?, ?, ?) ON CONFLICT DO UPDATE SET version_id ="
                         " excluded.version_id", (parsed.project, parsed.name, alias,
                                                  self.ids[key]))
            self.report.aliases += 1


def _manifest(key: str, event: dict[str, Any], digest: str, fmt: str) -> str | None:
    """The chunk manifest a version line names (``chunks``), or None (not chunked, or a line
    written before chunked storage)."""
    manifest = event.get("manifest")
    if manifest is None:
        return None
    manifest = check_digest(manifest, where=f"{key} chunk manifest")
    if fmt == "directory":
        raise ValueError(f"{key} is a directory with a chunk manifest")
    if parse_digest(manifest)[0] != parse_digest(digest)[0]:
        raise ValueError(f"{key} names a chunk manifest of another digest algorithm")
    return manifest


def _renumbered(events: list[tuple[str, str, dict[str, Any]]]
                ) -> list[tuple[str, str, dict[str, Any]]]:
    """Apply the journal's ``renumber`` lines (a push or pull moved a version to another
    number: ``remote/_local.py``) to the lines written before them, and drop them.

    A line written here before the move names the version by its old number: a version, use
    or prune line (they carry the digest) is matched by name and digest, a parent key by the
    number alone. Journals derived by ``repro pull`` (``"derived": true``) already use this
    store's final numbers and are left as they are.
    """
    moves = sorted((str(e.get("at", "")), e) for _, _, e in events
                   if e.get("event") == "renumber")
    kept = [t for t in events if t[2].get("event") != "renumber"]
    for when, move in moves:
        try:
            project, name = str(move["project"]), str(move["name"])
            old, new, digest = int(move["from"]), int(move["to"]), move.get("digest")
        except (KeyError, TypeError, ValueError):
            continue  # a forged line: nothing to apply
        old_key, new_key = f"{project}/{name}:v{old}", f"{project}/{name}:v{new}"
        for at, _, event in kept:
            if at > when or event.get("derived"):
                continue
            kind = event.get("event")
            if kind == "version" and (event.get("project"), event.get("name"),
                                      event.get("digest"), event.get("version")) == (
                                          project, name, digest, old):
                event["version"] = new
            elif kind in ("use", "prune") and event.get("key") == old_key \
                    and event.get("digest") == digest:
                event["key"] = new_key
            if kind == "version" and isinstance(event.get("parents"), list):
                event["parents"] = [new_key if p == old_key else p for p in event["parents"]]
    return kept


def _insert_output(conn: Any, run_id: str, version_id: int, at: Any) -> None:
    conn.execute("INSERT INTO run_outputs (run_id, version_id, logged_at) VALUES (?, ?, ?)"
                 " ON CONFLICT DO NOTHING", (run_id, version_id, str(at or "")))


def _read_json(path: Path) -> Any:
    """An export from the store: a regular file of at most 64 MiB, else None."""
    data = read_untrusted(path, 64 * 1024 * 1024)
    try:
        return None if data is None else json.loads(data)
    except (ValueError, RecursionError):
        return None


def _run_fields(run_id: str, row: dict[str, Any]) -> tuple[Any, ...]:
    """A run row from an untrusted export: every field checked, defaults where it is bad."""
    def text(name: str, default: str) -> str:
        value = row.get(name)
        return value if isinstance(value, str) and value and "\x00" not in value else default

    def integer(name: str) -> int | None:
        value = row.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    project = text("project", "default")
    try:
        validate_name(project, what="project")
    except ReproError:
        project = "default"
    state = row.get("state") if _is_state(row.get("state")) else RunState.CRASHED.value
    tags = row.get("tags") if isinstance(row.get("tags"), list) else []
    config = row.get("config") if isinstance(row.get("config"), dict) else {}
    started = row.get("pid_started")
    ended = row.get("ended_at")
    return (run_id, scrub_text(text("name", run_id)), project, state, _json_or(tags, []),
            _json_or(config, {}), _time(row.get("created_at")) or utc_now(),
            _time(ended), text("host", ""), integer("pid"), integer("world_size"),
            started if isinstance(started, (int, float)) else None,
            row.get("process_ns") if isinstance(row.get("process_ns"), str) else None,
            min(max(integer("segment") or 0, 0), 999_999))


def _time(value: Any) -> str | None:
    """An ISO time from an export, or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return None
    return value


def _json_or(value: Any, default: Any) -> str:
    try:
        return dumps(value)
    except (TypeError, ValueError):
        return dumps(default)


def _is_state(value: Any) -> bool:
    return isinstance(value, str) and value in {s.value for s in RunState}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
