"""``repro push``: copy versions, runs and their rows from this store to a remote.

Order, chosen so that an interruption at any point leaves the remote consistent and the next
push finishes the job: (1) blobs (each visible only complete, skipped when present), (2) one
version record per version, parents first (the atomic *claim* of its number), (3) run records
with their bundles (they name only versions already claimed), (4) aliases. A pull never sees a
version whose blobs are missing, nor an edge to a version that is not there.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import IntegrityError, StorageError
from ..hashing import hash_file
from ..registry import Registry, VersionRow
from ..store.local import LocalStorageBackend
from ._bundle import revision, write_bundle
from ._local import (
    local_max,
    note_move,
    pushed_numbers,
    record_numbers,
    renumber,
    snapshot,
    uid_map,
)
from ._records import (
    AliasRecord,
    RemoteVersion,
    RunRecord,
    VersionRef,
    alias_path,
    decode,
    encode,
    run_path,
    version_path,
)
from ._remote import Remote, SyncReport

__all__ = ["Pusher"]

_CLAIM_ATTEMPTS = 100


class Pusher:
    """One push of a selection to one remote."""

    def __init__(self, registry: Registry, store: LocalStorageBackend, remote: Remote,
                 report: SyncReport, advance: Callable[[int], None]) -> None:
        self.registry, self.store, self.remote = registry, store, remote
        self.report, self.advance = report, advance
        self.uids = uid_map(registry)
        self.numbers = pushed_numbers(registry, remote.url)
        self.listings: dict[tuple[str, str], dict[int, str]] = {}
        self.floor: dict[tuple[str, str], int] = {}  # per name: the number claimed last

    def push(self, version_ids: list[int], run_ids: list[str]) -> SyncReport:
        todo = [vid for vid in version_ids if vid not in self.numbers]
        rows = {vid: self.registry.get_version(vid) for vid in todo}
        self.report.skipped += len(version_ids) - len(todo)
        self._blobs([b for vid in todo for b in self._live_blobs(rows[vid])])
        for vid in todo:
            self._claim(rows[vid])
        for run_id in run_ids:
            self._run(run_id)
        names = {(r.project, r.name) for r in
                 (self.registry.get_version(v) for v in version_ids)}
        for project, name in sorted(names):
            self._aliases(project, name)
        return self.report

    # -- blobs ------------------------------------------------------------------------------

    def _live_blobs(self, row: VersionRow) -> list[tuple[str, int]]:
        blobs = self.registry.blobs_of(row.id) or [(row.digest, row.size)]
        if row.pruned_at is not None:  # pruned: its blobs may be gone; the row still travels
            return [b for b in blobs if self.store.exists(b[0])]
        return blobs

    def _blobs(self, blobs: list[tuple[str, int]]) -> None:
        for digest, size in sorted(set(blobs)):
            if self.remote.backend.exists(digest):
                self.advance(size)
                continue
            source = self.store.blob_path(digest)
            if not source.is_file():
                raise StorageError(f"blob {digest} is missing from {self.store.root}; "
                                   "`repro verify` names the damaged versions", path=source)
            self.remote.backend.upload(source, digest)
            self.report.blobs += 1
            self.report.bytes += size
            self.advance(size)

    # -- versions ---------------------------------------------------------------------------

    def _claim(self, row: VersionRow) -> None:
        """Record the version on the remote under its number, or, when another store took
        that number, under the next one free there; versions of one name keep their order
        (a version claimed after another of its name gets a higher number)."""
        row = self.registry.get_version(row.id)  # an earlier claim may have moved it
        uid, key = self.uids[row.id], (row.project, row.name)
        listing = self._listing(*key)
        number = max(row.version, self.floor.get(key, 0) + 1)
        for _ in range(_CLAIM_ATTEMPTS):
            ours = [n for n, held in listing.items() if held == uid]
            if ours:  # already there (an earlier push died before recording it here)
                return self._claimed(row, ours[0])
            if number in listing:
                number = max(listing) + 1
                continue
            if number != row.version:
                self._make_room(row, number)
            if self.remote.records.put(version_path(row.project, row.name, number),
                                       encode(self._record(row, number)), create=True):
                return self._claimed(row, number)
            listing = self._listing(*key, refresh=True)  # another store won that number
        raise StorageError(f"could not claim a version number for {row.key} on "
                           f"{self.remote.where} after {_CLAIM_ATTEMPTS} attempts",
                           path=self.remote.where)

    def _make_room(self, row: VersionRow, number: int) -> None:
        """Free ``number`` locally for ``row``: a version of this store that holds it has
        never reached this remote (it is numbered past the remote's versions), so it moves
        to the end; it is claimed in its turn."""
        with self.registry.transaction() as conn:
            held = conn.execute("SELECT id FROM versions WHERE project = ? AND name = ? AND"
                                " version = ?", (row.project, row.name, number)).fetchone()
            if held is None or int(held[0]) == row.id:
                return
            occupant = self.registry.get_version(int(held[0]))
            top = local_max(conn, row.project, row.name) + 1
            renumber(self.registry, occupant, top, conn=conn)
        self._moved(occupant.key, f"{row.project}/{row.name}:v{top}")

    def _listing(self, project: str, name: str, *, refresh: bool = False) -> dict[int, str]:
        """Number -> uid of every version the remote holds for a name. Records this store
        pushed or pulled are known; only the others are read."""
        key = (project, name)
        if refresh or key not in self.listings:
            known = self._known(project, name)
            listing: dict[int, str] = {}
            for path in self.remote.records.list(f"versions/{project}/{name}"):
                stem = path.rsplit("/", 1)[-1].removesuffix(".json")
                if not stem.isdigit():
                    continue
                number = int(stem)
                listing[number] = known.get(number) or self._read_uid(path, number)
            self.listings[key] = listing
        return self.listings[key]

    def _known(self, project: str, name: str) -> dict[int, str]:
        return {self.numbers[vid]: self.uids[vid] for (vid,) in self.registry._read(
            "SELECT id FROM versions WHERE project = ? AND name = ?", (project, name))
            if vid in self.numbers}

    def _read_uid(self, path: str, number: int) -> str:
        data = self.remote.records.get(path)
        where = f"{self.remote.where}/meta/{path}"
        record = decode(data, where) if data is not None else None
        if not isinstance(record, RemoteVersion) or record.number != number:
            raise IntegrityError(f"remote record {where} is not the record of v{number}",
                                 path=where)
        return record.uid

    def _record(self, row: VersionRow, number: int) -> RemoteVersion:
        parents: list[VersionRef] = []
        for parent in self.registry.parents_of(row.id):
            if parent.id in self.numbers:
                parents.append((self.uids[parent.id], parent.project, parent.name,
                                self.numbers[parent.id]))
        return RemoteVersion.from_row(row, number, self.registry.blobs_of(row.id)
                                      or [(row.digest, row.size)], parents)

    def _claimed(self, row: VersionRow, number: int) -> None:
        self.listings.setdefault((row.project, row.name), {})[number] = self.uids[row.id]
        with self.registry.transaction() as conn:
            if number != row.version:
                renumber(self.registry, row, number, conn=conn)
                self._moved(row.key, f"{row.project}/{row.name}:v{number}")
            record_numbers(conn, self.remote.url, {row.id: number})
        self.numbers[row.id] = number
        self.floor[(row.project, row.name)] = number
        self.report.versions.append(f"{row.project}/{row.name}:v{number}")

    def _moved(self, old: str, new: str) -> None:
        note_move(self.report.renumbered, old, new)

    # -- runs -------------------------------------------------------------------------------

    def _run(self, run_id: str) -> None:
        refs = {vid: self.uids[vid] for vid in self.numbers if vid in self.uids}
        with tempfile.TemporaryDirectory(prefix="push-", dir=self.store.tmp_dir) as tmp:
            path = Path(tmp) / "bundle.jsonl.gz"
            with snapshot(self.registry) as conn:  # one consistent read, no write lock
                rev = revision(conn, run_id)
                payloads = write_bundle(conn, run_id, refs, path, models=self.uids)
                named = self._named(conn, run_id)
            digest = hash_file(path, self.store.algorithm)
            known = self.registry._read("SELECT bundle FROM remote_runs WHERE url = ? AND"
                                        " run_id = ?", (self.remote.url, run_id))
            if known and known[0][0] == digest:
                self.report.skipped_runs += 1
                return
            remote_record = self.remote.records.get(run_path(run_id))
            if remote_record is not None:
                existing = decode(remote_record, f"{self.remote.where}/{run_path(run_id)}")
                if isinstance(existing, RunRecord) and existing.revision > rev:
                    self.report.problems.append(
                        f"run {run_id}: the remote holds a newer copy (revision "
                        f"{existing.revision} > {rev}); kept it")
                    return
            self._blobs(payloads)
            self.remote.backend.upload(path, digest)
            size = path.stat().st_size
        used = {int(r[0]) for r in self.registry._read(
            "SELECT version_id FROM run_inputs WHERE run_id = ?", (run_id,))}
        inputs = tuple(ref for vid, ref in named if vid in used)
        record = RunRecord(run_id, digest, size, rev, tuple(ref for _, ref in named), inputs)
        self.remote.records.put(run_path(run_id), encode(record))
        with self.registry.transaction() as conn:
            conn.execute("INSERT INTO remote_runs (url, run_id, bundle, at) VALUES (?, ?, ?,"
                         " datetime('now')) ON CONFLICT (url, run_id) DO UPDATE SET bundle ="
                         " excluded.bundle", (self.remote.url, run_id, digest))
        self.report.runs.append(run_id)

    def _named(self, conn: object, run_id: str) -> list[tuple[int, VersionRef]]:
        """Where the remote holds every version the run's bundle names (by local id)."""
        ids = {int(r[0]) for r in self.registry._read(
            "SELECT version_id FROM run_outputs WHERE run_id = ? UNION SELECT version_id FROM"
            " run_inputs WHERE run_id = ? UNION SELECT model_version_id FROM online_updates"
            " WHERE run_id = ? AND model_version_id IS NOT NULL", (run_id, run_id, run_id))}
        refs = []
        for vid in sorted(ids & set(self.numbers)):
            row = self.registry.get_version(vid)
            refs.append((vid, (self.uids[vid], row.project, row.name, self.numbers[vid])))
        return refs

    # -- aliases ----------------------------------------------------------------------------

    def _aliases(self, project: str, name: str) -> None:
        for alias, vid in self.registry._read(
                "SELECT alias, version_id FROM aliases WHERE project = ? AND name = ? AND"
                " alias != 'latest'", (project, name)):
            if vid not in self.numbers:
                continue
            path = alias_path(project, name, alias)
            current = self.remote.records.get(path)
            if current is not None:
                record = decode(current, f"{self.remote.where}/{path}")
                if isinstance(record, AliasRecord) and record.uid == self.uids[vid]:
                    continue
            self.remote.records.put(path, encode(AliasRecord(
                project, name, alias, self.uids[vid], self.numbers[vid],
                _now())))
            self.report.aliases += 1


def _now() -> str:
    from ..types import utc_now

    return utc_now()
