"""``repro push``: copy versions, runs and their rows from this store to a remote.

Order, chosen so that an interruption at any point leaves the remote consistent and the next
push finishes the job: (1) blobs (each visible only complete, skipped when present), (2) one
version record per version, parents first (the atomic *claim* of its number), (3) run records
with their bundles (they name only versions already claimed), (4) aliases. A pull never sees a
version whose blobs are missing, nor an edge to a version that is not there.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, ReproError, StorageError
from ..hashing import hash_file
from ..registry import Registry, VersionRow
from ..registry.dialect import DBConnection
from ..store.local import LocalStorageBackend
from ..types import utc_now
from ._aliases import push_aliases
from ._bundle import revision, write_bundle
from ._local import (
    journal_moves,
    local_max,
    note_move,
    pinned,
    pushed_numbers,
    record_numbers,
    renumber,
    snapshot,
    uid_map,
    version_blobs,
    version_in,
)
from ._records import (
    RemoteVersion,
    RunRecord,
    VersionRef,
    decode,
    encode,
    run_path,
    version_path,
)
from ._remote import Remote, SyncReport

__all__ = ["Pusher"]

_CLAIM_ATTEMPTS = 100
_FOREIGN_CACHE = 1_000_000
_FOREIGN_UIDS: dict[tuple[str, str], str] = {}  # (remote URL, record path) -> uid


class Pusher:
    """One push of a selection to one remote."""

    def __init__(self, registry: Registry, store: LocalStorageBackend, remote: Remote,
                 report: SyncReport, advance: Callable[[int], None], *,
                 refresh_runs: bool = True, check: bool = False) -> None:
        """``refresh_runs=False`` (background mirroring of each checkpoint) sends a run only
        the first time: its versions need it on the remote, but rewriting its whole bundle
        for every checkpoint of a long run would not pay; finishing the run sends it.
        ``check``: do not trust what this store recorded of the remote (it lost data, was
        restored from a backup): every record and blob is looked up there again."""
        self.registry, self.store, self.remote = registry, store, remote
        self.report, self.advance = report, advance
        self.uids = uid_map(registry)
        self.numbers = {} if check else pushed_numbers(registry, remote.url)
        self.check = check
        self.listings: dict[tuple[str, str], dict[int, str]] = {}
        # per name: (number here when the push began, number on the remote) of what it claimed
        self.claimed: dict[tuple[str, str], list[tuple[int, int]]] = {}
        self.start: dict[int, int] = {}  # version id -> its number here when the push began
        self.refresh_runs = refresh_runs

    def push(self, version_ids: list[int], run_ids: list[str]) -> SyncReport:
        clashes = {run_id for run_id in run_ids if not self._same_run(run_id)}
        if clashes:  # left out, with their versions; the rest goes
            run_ids = [r for r in run_ids if r not in clashes]
            version_ids = [v for v in version_ids
                           if self.registry.get_version(v).run_id not in clashes]
        self._sweep()
        todo = [vid for vid in version_ids if vid not in self.numbers]
        if todo:
            self.remote.records.check_atomic()  # numbering needs create-if-absent
        rows = {vid: self.registry.get_version(vid) for vid in todo}
        self.start = {vid: row.version for vid, row in rows.items()}
        self.report.skipped += len(version_ids) - len(todo)
        self._blobs([b for vid in todo for b in self._live_blobs(rows[vid])])
        for vid in todo:
            self._claim(rows[vid])
        for run_id in run_ids:
            self._run(run_id)
        names = {(r.project, r.name) for r in
                 (self.registry.get_version(v) for v in version_ids)}
        push_aliases(self.registry, self.remote, self.uids, self.numbers, names, self.report,
                     check=self.check)
        return self.report

    def _sweep(self) -> None:
        """What killed pushes left on the remote: a directory's temp files of dead writers,
        an object store's multipart uploads abandoned over a day ago (best effort)."""
        backend: Any = self.remote.backend
        local = getattr(backend, "_local", None)
        with contextlib.suppress(ReproError, OSError):
            if local is not None:
                local.sweep_tmp()
            elif hasattr(backend, "sweep_uploads"):
                backend.sweep_uploads()

    def _same_run(self, run_id: str) -> bool:
        """False when the remote holds this run id for another run (ids may be chosen:
        ``init_run(run_id="baseline")`` in two stores): that run and its versions are left
        out (they would be filed under the other run), reported; the rest is pushed."""
        data = self.remote.records.get(run_path(run_id))
        record = decode(data, f"{self.remote.where}/meta/{run_path(run_id)}") \
            if data is not None else None
        mine = self.registry.get_run(run_id).created_at
        if isinstance(record, RunRecord) and record.created_at not in ("", mine):
            self.report.problems.append(
                f"run {run_id} was not pushed, nor its versions: {self.remote.where} holds "
                f"another run under that id (created {record.created_at}; this store's was "
                f"created {mine}). Its artifacts can reach that remote re-logged from a run "
                "with another id")
            return False
        return True

    # -- blobs ------------------------------------------------------------------------------

    def _live_blobs(self, row: VersionRow) -> list[tuple[str, int]]:
        blobs = version_blobs(self.registry, row)
        if row.pruned_at is not None:  # pruned: its blobs may be gone; the row still travels
            return [b for b in blobs if self.store.exists(b[0])]
        if row.manifest is not None:
            # the manifest read back and checked against the row: a push never sends a
            # chunked version whose parts do not make its file (only the missing parts go)
            from ..chunks.read import manifest_of

            manifest_of(self.store, self.registry, row, full=False)
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
        that number, under the next one free there. Versions of one name keep their order:
        one that had a higher number here than another of its name gets a higher number
        there too (numbers as they were when the push began: the moves it makes do not
        count)."""
        uid, key, mine = self.uids[row.id], (row.project, row.name), self.start[row.id]
        listing = self._listing(*key)
        number = max([mine] + [n + 1 for was, n in self.claimed.get(key, []) if was < mine])
        for _ in range(_CLAIM_ATTEMPTS):
            ours = [n for n, held in listing.items() if held == uid]
            if ours:  # already there (an earlier push died before recording it here)
                return self._claimed(row.id, ours[0], sent=False)
            if number in listing:
                number = max(listing) + 1
                continue
            if self.remote.records.put(version_path(row.project, row.name, number),
                                       encode(self._record(row, number)), create=True):
                return self._claimed(row.id, number)
            listing = self._listing(*key, refresh=True)  # another store won that number
        raise StorageError(f"could not claim a version number for {row.key} on "
                           f"{self.remote.where} after {_CLAIM_ATTEMPTS} attempts",
                           path=self.remote.where)

    def _claimed(self, vid: int, number: int, *, sent: bool = True) -> None:
        """Note the claim here; give the version that number here too when nothing is in the
        way (``_follow``). Journal lines are written once the transaction has committed."""
        moves: list[dict[str, Any]] = []
        with self.registry.transaction() as conn:
            row = version_in(conn, vid)  # as it is now: another pusher may have moved it
            if number != row.version and not self._follow(conn, row, number, moves):
                self.report.problems.append(
                    f"{row.key} is v{number} on {self.remote.where} (its number was taken "
                    f"there); it keeps v{row.version} here: it is on another remote already, "
                    f"or its run (or that of the version holding v{number} here) may still "
                    "be running")
            record_numbers(conn, self.remote.url, {vid: number})
        journal_moves(self.registry, moves)
        key = (row.project, row.name)
        self.listings.setdefault(key, {})[number] = self.uids[vid]
        self.numbers[vid] = number
        self.claimed.setdefault(key, []).append((self.start.get(vid, row.version), number))
        if sent:
            self.report.versions.append(f"{row.project}/{row.name}:v{number}")
        else:  # found there (--check, or a push cut after its claim): nothing was sent
            self.report.skipped += 1

    def _follow(self, conn: DBConnection, row: VersionRow, number: int,
                moves: list[dict[str, Any]]) -> bool:
        """Move ``row`` to ``number`` here. A version of this push in the way (not yet
        claimed) steps aside to the end, for now: its own claim places it. Neither moves when
        it is pinned (``pinned``): then ``row`` keeps its number here and the remote's is
        recorded beside it. Returns whether it moved."""
        held = conn.execute("SELECT id FROM versions WHERE project = ? AND name = ? AND"
                            " version = ?", (row.project, row.name, number)).fetchone()
        occupant = version_in(conn, int(held[0])) if held and int(held[0]) != row.id else None
        if pinned(conn, row) or (occupant is not None and pinned(conn, occupant)):
            return False
        if occupant is not None:
            top = local_max(conn, row.project, row.name) + 1
            moves.append(renumber(conn, occupant, top))
            self._moved(occupant.key, f"{row.project}/{row.name}:v{top}")
        moves.append(renumber(conn, row, number))
        self._moved(row.key, f"{row.project}/{row.name}:v{number}")
        return True


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
        """The uid of another store's version record. A claimed record never changes, so
        each is read once per process (a long run's mirror pushes many times)."""
        cache_key = (self.remote.url, path)
        if cache_key in _FOREIGN_UIDS and not self.check:  # (--check trusts nothing noted)
            return _FOREIGN_UIDS[cache_key]
        data = self.remote.records.get(path)
        where = f"{self.remote.where}/meta/{path}"
        record = decode(data, where) if data is not None else None
        if not isinstance(record, RemoteVersion) or record.number != number:
            raise IntegrityError(f"remote record {where} is not the record of v{number}",
                                 path=where)
        if len(_FOREIGN_UIDS) < _FOREIGN_CACHE:
            _FOREIGN_UIDS[cache_key] = record.uid
        return record.uid

    def _record(self, row: VersionRow, number: int) -> RemoteVersion:
        parents: list[VersionRef] = []
        for parent in self.registry.parents_of(row.id):
            if parent.id in self.numbers:
                parents.append((self.uids[parent.id], parent.project, parent.name,
                                self.numbers[parent.id]))
        return RemoteVersion.from_row(row, number, version_blobs(self.registry, row), parents)

    def _moved(self, old: str, new: str) -> None:
        note_move(self.report.renumbered, old, new)

    # -- runs -------------------------------------------------------------------------------

    def _run(self, run_id: str) -> None:
        known = self.registry._read("SELECT bundle FROM remote_runs WHERE url = ? AND"
                                    " run_id = ?", (self.remote.url, run_id))
        if self.check:
            known = []
        if known and not self.refresh_runs:
            self.report.skipped_runs += 1
            return
        refs = {vid: self.uids[vid] for vid in self.numbers if vid in self.uids}
        with tempfile.TemporaryDirectory(prefix="push-", dir=self.store.tmp_dir) as tmp:
            path = Path(tmp) / "bundle.jsonl.gz"
            with snapshot(self.registry) as conn:  # one consistent read, no write lock
                rev = revision(conn, run_id)
                payloads = write_bundle(conn, run_id, refs, path, models=self.uids)
                named = self._named(conn, run_id)
            digest = hash_file(path, self.store.algorithm)
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
                if isinstance(existing, RunRecord) and existing.bundle == digest \
                        and self.remote.backend.exists(digest):  # (--check: it is all there)
                    self._ran(run_id, digest)
                    self.report.skipped_runs += 1
                    return
            self._blobs(payloads)
            self.remote.backend.upload(path, digest)
            size = path.stat().st_size
        used = {int(r[0]) for r in self.registry._read(
            "SELECT version_id FROM run_inputs WHERE run_id = ?", (run_id,))}
        inputs = tuple(ref for vid, ref in named if vid in used)
        replaced = existing if remote_record is not None and isinstance(existing, RunRecord) \
            else None
        record = RunRecord(run_id, digest, size, rev, tuple(ref for _, ref in named), inputs,
                           created_at=self.registry.get_run(run_id).created_at,
                           previous=replaced.bundle if replaced is not None else None)
        self.remote.records.put(run_path(run_id), encode(record))
        stale = replaced.previous if replaced is not None else None
        if stale is not None and stale not in (digest, record.previous):
            # two pushes old: no record names it, and a pull that read the record before
            # the last one had a whole push's time to fetch it
            with contextlib.suppress(ReproError):
                self.remote.backend.delete(stale)
        self._ran(run_id, digest)
        self.report.runs.append(run_id)

    def _ran(self, run_id: str, digest: str) -> None:
        """Note that the remote holds this bundle of the run."""
        with self.registry.transaction() as conn:
            conn.execute("INSERT INTO remote_runs (url, run_id, bundle, at) VALUES (?, ?, ?, ?)"
                         " ON CONFLICT (url, run_id) DO UPDATE SET bundle = excluded.bundle",
                         (self.remote.url, run_id, digest, utc_now()))

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
