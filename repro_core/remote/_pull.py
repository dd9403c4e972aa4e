"""``repro pull``: copy versions, runs and their rows from a remote into this store.

Everything read from the remote is untrusted: records are checked field by field
(``_records``), bundles line by line (``_bundle``), blobs by digest and size while they stream.
The network work (records, bundles, blobs) happens first; then **one registry transaction**
inserts every row, so an interrupted pull leaves nothing half-imported (the blobs it already
fetched make the next pull faster, and gc reclaims them if it never comes).

Numbers: a pulled version keeps its remote number. If this store holds another version under
that number which it never pushed (logged here offline), that one moves to the next free
number (as W&B numbers offline versions when they sync); the report lists every move.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._metrics_rows import insert_rows
from ..errors import ArtifactNotFoundError, IntegrityError, InvalidArgumentError
from ..registry import Registry
from ..registry.dialect import DBConnection
from ..registry.records import RUN_COLUMNS, dumps
from ..registry.runs import is_alive_here
from ..store.local import LocalStorageBackend
from ..types import utc_now
from ._aliases import pull_aliases
from ._bundle import Bundle, read_bundle, revision
from ._exports import logged_here
from ._local import (
    journal_moves,
    local_max,
    note_move,
    pinned,
    pushed_numbers,
    record_numbers,
    renumber,
    reset_latest,
    snapshot,
    uid_map,
    version_in,
)
from ._records import (
    RUN_ID,
    AliasRecord,
    RemoteVersion,
    RunRecord,
    alias_path,
    decode,
    ref_path,
    run_path,
)
from ._remote import Remote, SyncReport

__all__ = ["Puller"]

_RUN_FIELDS = [c.strip() for c in RUN_COLUMNS.split(",")]


@dataclass
class _Plan:
    versions: dict[str, RemoteVersion] = field(default_factory=dict)  # uid -> record
    runs: dict[str, RunRecord] = field(default_factory=dict)
    bundles: dict[str, Bundle] = field(default_factory=dict)
    aliases: list[AliasRecord] = field(default_factory=list)


class Puller:
    """One pull of a selection from one remote."""

    def __init__(self, registry: Registry, store: LocalStorageBackend, remote: Remote,
                 report: SyncReport, advance: Callable[[int], None]) -> None:
        self.registry, self.store, self.remote = registry, store, remote
        self.report, self.advance = report, advance
        self.local = {uid: vid for vid, uid in uid_map(registry).items()}
        self.numbers = pushed_numbers(registry, remote.url)
        self.foreign: set[str] = set()  # run ids the remote holds for other runs
        self.moves: list[dict[str, Any]] = []  # renumberings to journal after the commit
        self.touched: set[str] = set()  # runs whose versions or rows this pull brought
        self.everything = False  # pull --all: every alias record is read
        # the bytes/rate bar of the blob downloads, once their total is known
        self.bar: Callable[[int], contextlib.AbstractContextManager[Callable[[int], None]]] = \
            lambda _: contextlib.nullcontext(self.advance)

    def pull(self, version_paths: list[str], run_ids: list[str]) -> SyncReport:
        plan = self._gather(version_paths, run_ids)
        self.store.ensure_layout()
        with tempfile.TemporaryDirectory(prefix="pull-", dir=self.store.tmp_dir) as tmp:
            self._bundles(plan, Path(tmp))
            self._blobs(plan, Path(tmp))
        self._check_manifests(plan)
        plan.aliases = self._alias_records(plan)
        with self.registry.transaction() as conn:
            self._apply(conn, plan)
        journal_moves(self.registry, self.moves)  # once committed
        self.report.skipped += len([u for u in plan.versions if u in self.local])
        return self.report

    # -- reading the remote -----------------------------------------------------------------

    def _get(self, path: str) -> Any:
        """The checked record at ``path``. Paths come from the remote's listing or from
        checked records, so one that ``_meta`` refuses (``a..b``, a planted odd name) means a
        damaged or forged remote: an ``IntegrityError``, not the caller's bad argument."""
        where = f"{self.remote.where}/meta/{path}"
        try:
            data = self.remote.records.get(path)
        except InvalidArgumentError:
            raise IntegrityError(f"remote record {where[:300]} has a name repro never writes; "
                                 "the remote is damaged or forged", path=self.remote.where
                                 ) from None
        return None if data is None else decode(data, where)

    def _gather(self, version_paths: list[str], run_ids: list[str]) -> _Plan:
        """The upstream closure on the remote of what was asked for (known uids stop it):
        a version, its parents, the run that logged it and what that run used — not the
        run's other outputs (``ckpt:best`` must not bring every checkpoint of its run).
        A run asked for by name brings all its versions."""
        plan = _Plan()
        todo_v, todo_r = list(version_paths), list(run_ids)
        whole = set(run_ids)
        seen: set[str] = set()
        while todo_v or todo_r:
            if todo_r:
                run_id = todo_r.pop()
                if run_id in plan.runs or run_id in seen:
                    continue
                seen.add(run_id)
                record = self._get(run_path(run_id)) if RUN_ID.fullmatch(run_id) else None
                if not isinstance(record, RunRecord) or record.run_id != run_id:
                    self.report.problems.append(
                        f"run {run_id} is not on {self.remote.where} (a push that was "
                        "interrupted? push again from the source); its versions are skipped")
                    continue
                plan.runs[run_id] = record
                follow = record.versions if run_id in whole or record.inputs is None \
                    else record.inputs
                todo_v += [ref_path(r) for r in follow if r[0] not in self.local]
                continue
            path = todo_v.pop()
            if path in seen:
                continue
            seen.add(path)
            record = self._get(path)
            if not isinstance(record, RemoteVersion) or ref_path(
                    (record.uid, record.project, record.name, record.number)) != path:
                raise IntegrityError(f"remote record {self.remote.where}/meta/{path} is "
                                     "missing or is not the version its path names",
                                     path=self.remote.where)
            plan.versions[record.uid] = record
            todo_v += [ref_path(p) for p in record.parents if p[0] not in self.local]
            if record.run_id is not None:
                todo_r.append(record.run_id)
        self._drop_foreign_runs(plan)
        for uid, record in list(plan.versions.items()):
            if record.run_id in self.foreign or (
                    record.run_id is not None and record.run_id not in plan.runs
                    and not self._same_run_known(record.run_id)):
                del plan.versions[uid]  # reported above: its run is missing, or another
        self._check_acyclic(plan)
        return plan

    def _same_run_known(self, run_id: str) -> bool:
        """Whether this store's run ``run_id`` is known to be the remote's (it went through
        this remote before): without the remote's run record, an id alone could be another
        store's run of the same name."""
        return bool(self.registry._read("SELECT 1 FROM remote_runs WHERE url = ? AND"
                                        " run_id = ?", (self.remote.url, run_id)))

    def _drop_foreign_runs(self, plan: _Plan) -> None:
        """A remote run whose id this store uses for another run (ids may be chosen:
        ``init_run(run_id="baseline")`` in two stores) is skipped with its versions: they
        must not be filed under, or replace the rows of, this store's run."""
        for run_id, run in list(plan.runs.items()):
            if self.registry.has_run(run_id) and run.created_at not in (
                    "", self.registry.get_run(run_id).created_at):
                self.report.problems.append(
                    f"run {run_id} on {self.remote.where} is another run than this store's "
                    f"{run_id} (created {run.created_at}); it and its versions are skipped")
                del plan.runs[run_id]
                self.foreign.add(run_id)

    def _check_acyclic(self, plan: _Plan) -> None:
        """Parents come before children, so a parent cycle cannot be logged: it is forged.
        Only new versions can be on one (a local version's parents are all local)."""
        state: dict[str, int] = {}  # 1: on the current path, 2: done
        for start in plan.versions:
            stack = [(start, iter(plan.versions[start].parents))]
            state.setdefault(start, 1)
            if state[start] == 2:
                continue
            while stack:
                uid, parents = stack[-1]
                parent = next((p[0] for p in parents if p[0] in plan.versions
                               and state.get(p[0]) != 2), None)
                if parent is None:
                    state[uid] = 2
                    stack.pop()
                elif state.get(parent) == 1:
                    raise IntegrityError(
                        f"{plan.versions[parent].key} on {self.remote.where} is its own "
                        "ancestor: a parent cycle repro cannot log (the remote is damaged or "
                        "forged)", path=self.remote.where)
                else:
                    state[parent] = 1
                    stack.append((parent, iter(plan.versions[parent].parents)))

    def _bundles(self, plan: _Plan, tmp: Path) -> None:
        for run_id, record in plan.runs.items():
            known = self.registry._read("SELECT bundle FROM remote_runs WHERE url = ? AND"
                                        " run_id = ?", (self.remote.url, run_id))
            named = {ref[0] for ref in record.versions}
            if known and known[0][0] == record.bundle and not any(
                    uid in named and uid not in self.local for uid in plan.versions):
                # this very bundle was imported (or pushed from here) before, and no version
                # it names comes now (one that does needs its edges and online updates)
                continue
            if self.registry.has_run(run_id):
                if self._logged_here(run_id):
                    continue  # this store's own run: a remote never rewrites it
                if is_alive_here(self.registry.get_run(run_id)):
                    self.report.problems.append(
                        f"run {run_id} is running in this store: its rows are left as they "
                        "are (pull again once it has finished)")
                    continue
                with snapshot(self.registry) as conn:
                    if revision(conn, run_id) > record.revision:
                        continue  # ours has gone further: only its edges are merged
            target = tmp / f"{run_id}.bundle"
            self._download(record.bundle, record.bundle_size, target,
                           f"the rows of run {run_id}")
            plan.bundles[run_id] = read_bundle(target, run_id,
                                               f"{self.remote.where} (run {run_id})")
            target.unlink()

    def _logged_here(self, run_id: str) -> bool:
        return logged_here(self.store.root, run_id)

    def _blobs(self, plan: _Plan, tmp: Path) -> None:
        wanted = {b for v in plan.versions.values()
                  if v.uid not in self.local and v.pruned_at is None for b in v.blobs}
        wanted |= {b for bundle in plan.bundles.values() for b in bundle.blobs}
        missing = sorted(b for b in wanted if not self.store.exists(b[0]))
        with self.bar(sum(size for _, size in missing)) as advance:
            for digest, size in missing:
                target = tmp / "blob"
                needed = sorted(v.key for v in plan.versions.values()
                                if any(b[0] == digest for b in v.blobs))
                self._download(digest, size, target,
                               ", ".join(needed[:3]) or "a TTRL experience payload")
                self.store.upload(target, digest)
                target.unlink()
                self.report.blobs += 1
                self.report.bytes += size
                advance(size)

    def _check_manifests(self, plan: _Plan) -> None:
        """Each new chunked version's manifest, now here, read as untrusted input: it must
        describe the record (whole-file digest and size) and list only blobs the record
        names, with their sizes — else the remote is forged and nothing is imported (a row
        whose parts do not make its file would be served as damage later)."""
        from ..chunks.read import read_chunk_manifest

        for record in plan.versions.values():
            if record.manifest is None or record.uid in self.local or \
                    record.pruned_at is not None:  # (a pruned version's blobs do not come)
                continue
            blobs = dict(record.blobs)
            try:
                read_chunk_manifest(self.store, blobs, record.manifest, record.digest,
                                    record.size, full=True, key=record.key)
            except IntegrityError as exc:
                raise IntegrityError(f"the record of {record.key} on {self.remote.where} is "
                                     f"damaged or forged ({exc}); nothing was imported",
                                     digest=record.manifest, path=self.remote.where) from None

    def _download(self, digest: str, size: int, target: Path, what: str) -> None:
        """Digest-verified, and never more than ``size`` bytes read (a forged huge object
        is refused before its first byte). A blob the remote lost names what needs it."""
        try:
            self.remote.backend.download(digest, target,
                                         expected_size=size)  # type: ignore[call-arg]
        except ArtifactNotFoundError:
            raise ArtifactNotFoundError(
                f"blob {digest} ({what}) is missing on {self.remote.where}; nothing was "
                "imported. Push again from a store that has it with `repro push --check` "
                "(it re-sends what the remote lost)", key=digest) from None

    def _alias_records(self, plan: _Plan) -> list[AliasRecord]:
        """The alias records of the names pulled (of every name, for ``pull --all``: an
        alias may have moved to a version this store already holds)."""
        if self.everything:
            paths = self.remote.records.list("aliases")
        else:
            names = {(v.project, v.name) for v in plan.versions.values()}
            paths = [p for project, name in sorted(names)
                     for p in self.remote.records.list(f"aliases/{project}/{name}")]
        records = []
        for path in paths:
            if path:
                record = self._get(path)
                if not isinstance(record, AliasRecord) or alias_path(
                        record.project, record.name, record.alias) != path:
                    raise IntegrityError(f"remote record {self.remote.where}/meta/{path} is "
                                         "not the alias its path names", path=self.remote.where)
                if record.alias == "latest":
                    continue  # each store keeps its own (the highest number), never a record's
                records.append(record)
        return records

    # -- writing the registry (one transaction) ---------------------------------------------

    def _apply(self, conn: DBConnection, plan: _Plan) -> dict[str, int]:
        for run_id, bundle in plan.bundles.items():
            self._run_row(conn, run_id, bundle)
        ids = dict(self.local)
        pulled: dict[int, int] = {}
        # Creation order, not discovery order: local ids order parents, children and listings
        # (``ORDER BY v.id``), so a pulled store lists them as the source did.
        for uid, record in sorted(plan.versions.items(), key=lambda kv: (
                kv[1].created_at, kv[1].project, kv[1].name, kv[1].number)):
            if uid in ids:
                pulled[ids[uid]] = record.number
                continue
            ids[uid] = self._version(conn, record)
            pulled[ids[uid]] = record.number
            if record.run_id is not None:
                self.touched.add(record.run_id)
            self.report.versions.append(record.key)
        for record in plan.versions.values():
            conn.executemany(
                "INSERT INTO artifact_parents (child_id, parent_id) VALUES (?, ?) ON CONFLICT"
                " DO NOTHING", [(ids[record.uid], ids[p[0]]) for p in record.parents
                                if p[0] in ids and p[0] != record.uid])
        for run_id, bundle in plan.bundles.items():
            self._run_rows(conn, run_id, bundle, ids)
            self.touched.add(run_id)
            conn.execute("INSERT INTO remote_runs (url, run_id, bundle, at) VALUES (?, ?, ?, ?)"
                         " ON CONFLICT (url, run_id) DO UPDATE SET bundle = excluded.bundle",
                         (self.remote.url, run_id, plan.runs[run_id].bundle, utc_now()))
            self.report.runs.append(run_id)
        pull_aliases(conn, self.registry, self.remote, plan.aliases, ids, self.report)
        for project, name in {(v.project, v.name) for v in plan.versions.values()}:
            reset_latest(conn, project, name)
        record_numbers(conn, self.remote.url, pulled)
        return ids

    def _version(self, conn: DBConnection, record: RemoteVersion) -> int:
        existing = conn.execute("SELECT type FROM artifacts WHERE project = ? AND name = ?",
                                (record.project, record.name)).fetchone()
        if existing is not None and existing[0] != record.type:
            raise IntegrityError(f"{record.key} on {self.remote.where} is a {record.type!r} "
                                 f"but this store's {record.project}/{record.name} holds "
                                 f"{existing[0]!r} versions", path=self.remote.where)
        conn.execute("INSERT INTO artifacts (project, name, type, created_at) VALUES (?, ?, ?,"
                     " ?) ON CONFLICT DO NOTHING",
                     (record.project, record.name, record.type, record.created_at))
        number = self._number(conn, record)
        cursor = conn.execute(
            "INSERT INTO versions (project, name, version, digest, size, format, run_id,"
            " created_at, metadata, filename, pruned_at, manifest) VALUES (?, ?, ?, ?, ?, ?,"
            " ?, ?, ?, ?, ?, ?) RETURNING id",
            (record.project, record.name, number, record.digest, record.size, record.format,
             record.run_id, record.created_at, dumps(record.metadata), record.filename,
             record.pruned_at, record.manifest))
        vid = int(cursor.fetchone()[0])
        conn.executemany("INSERT INTO version_blobs (version_id, digest, size) VALUES (?, ?, ?)"
                         " ON CONFLICT DO NOTHING", [(vid, d, s) for d, s in record.blobs])
        return vid

    def _number(self, conn: DBConnection, record: RemoteVersion) -> int:
        """The remote's number, moving aside a local version that never left this store."""
        occupant = conn.execute("SELECT id FROM versions WHERE project = ? AND name = ? AND"
                                " version = ?", (record.project, record.name,
                                                 record.number)).fetchone()
        if occupant is None:
            return record.number
        row = version_in(conn, int(occupant[0]))
        top = local_max(conn, record.project, record.name)
        if pinned(conn, row):
            # on a remote already, or its run may be running (its program holds ``name:vN``
            # keys): it stays; the pulled one takes the next number here
            self.report.problems.append(
                f"{record.key} on {self.remote.where} is v{top + 1} here (v{record.number} "
                f"is taken by {row.key})")
            return top + 1
        self.moves.append(renumber(conn, row, top + 1))
        note_move(self.report.renumbered, row.key, f"{row.project}/{row.name}:v{top + 1}")
        return record.number


    def _run_row(self, conn: DBConnection, run_id: str, bundle: Bundle) -> None:
        values = [bundle.run[c] for c in _RUN_FIELDS]
        conn.execute(f"INSERT INTO runs ({RUN_COLUMNS}) VALUES ({', '.join('?' * len(values))})"
                     f" ON CONFLICT (id) DO UPDATE SET "
                     + ", ".join(f"{c} = excluded.{c}" for c in _RUN_FIELDS[1:]), values)

    def _run_rows(self, conn: DBConnection, run_id: str, bundle: Bundle,
                  ids: dict[str, int]) -> None:
        """Replace the run's own rows with the bundle's (it is newer), merge its edges."""
        for sql in ("DELETE FROM run_states WHERE run_id = ?",
                    "DELETE FROM metric_chunks WHERE series_id IN (SELECT id FROM"
                    " metric_series WHERE run_id = ?)",
                    "DELETE FROM metric_series WHERE run_id = ?",
                    "DELETE FROM experiences WHERE run_id = ?",
                    "DELETE FROM online_updates WHERE run_id = ?"):
            conn.execute(sql, (run_id,))
        conn.executemany("INSERT INTO run_states (run_id, state, at, reason) VALUES"
                         " (?, ?, ?, ?)", [(run_id, *s) for s in bundle.states])
        series: dict[str, int] = {}
        for key, segment, count, first, last, steps, vals, times in bundle.chunks:
            if key not in series:
                series[key] = int(conn.execute(
                    "INSERT INTO metric_series (run_id, key) VALUES (?, ?) RETURNING id",
                    (run_id, key)).fetchone()[0])
            conn.execute("INSERT INTO metric_chunks (series_id, count, first_step, last_step,"
                         " steps, vals, times, segment) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (series[key], count, first, last, steps, vals, times, segment))
        if bundle.experiences:
            insert_rows(conn, "experiences", [(run_id, *e) for e in bundle.experiences])
        # An update made under a model version this store does not get (the remote holds
        # part of the run) is left out: stored with no version it would read as made before
        # any checkpoint. The next pull, once the remote has the version, brings it.
        updates = [u for u in bundle.updates if u[5] is None or u[5] in ids]
        if len(updates) < len(bundle.updates):
            self.report.problems.append(
                f"run {run_id}: {len(bundle.updates) - len(updates)} online update(s) made "
                f"under checkpoints {self.remote.where} does not hold were left out (push the "
                "whole run from its store to complete it)")
        if updates:
            insert_rows(conn, "online_updates", [
                (run_id, *u[:5], ids.get(u[5]) if u[5] is not None else None, *u[6:])
                for u in updates])
        conn.executemany("INSERT INTO run_outputs (run_id, version_id, logged_at) VALUES"
                         " (?, ?, ?) ON CONFLICT DO NOTHING",
                         [(run_id, ids[u], at) for u, at in bundle.outputs if u in ids])
        conn.executemany(
            "INSERT INTO run_inputs (run_id, version_id, used_at) SELECT ?, ?, ? WHERE NOT"
            " EXISTS (SELECT 1 FROM run_outputs WHERE run_id = ? AND version_id = ?) ON"
            " CONFLICT DO NOTHING",
            [(run_id, ids[u], at, run_id, ids[u]) for u, at in bundle.inputs if u in ids])
