"""The local side of push and pull: what to send, what was sent, and version renumbering.

What a selection needs (so that the other side answers ``repro lineage`` as this one does) is
its *upstream closure*: a version, its parents, the run that logged it and what that run used,
recursively. What this store already pushed to, or pulled from, a remote is kept per remote
URL in ``remote_versions`` / ``remote_runs``, so a second push transfers nothing.

**Renumbering.** A version's number is final once a remote holds it. Two stores that logged
``v4`` of one name offline cannot both keep it: the remote is the arbiter (create-if-absent
claims), and the store that loses the race renumbers its version to the next number free on
both sides — as a W&B offline run's artifacts are numbered when they sync. The version keeps
its uid, digest, aliases and lineage; ``name@<digest prefix>`` finds it either way, and the
run's journal records the move (``repro recover`` applies it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from .._journal import append_event
from ..errors import IntegrityError, StorageError
from ..registry import Registry, VersionRow, is_crashed
from ..registry.dialect import DBConnection
from ..types import utc_now
from ._records import version_uid

__all__ = ["closure", "journal_moves", "local_max", "note_move", "pinned", "pushed_numbers",
           "renumber", "snapshot", "uid_map", "version_blobs", "version_in"]


def uid_map(registry: Registry) -> dict[int, str]:
    """Local version id -> uid, for every version of the store."""
    return {int(vid): version_uid(p, n, d, c, r) for vid, p, n, d, c, r in registry._read(
        "SELECT id, project, name, digest, created_at, run_id FROM versions")}


def version_blobs(registry: Registry, row: VersionRow) -> list[tuple[str, int]]:
    """Every ``(digest, size)`` blob a version's content needs.

    A file version logged before blobs were recorded per version has none recorded: its
    content is the one blob named by its digest. A chunked version (``row.manifest``) is its
    parts and its manifest, all recorded; its digest is the whole file's and is no blob, so
    that fallback would name a blob that never exists — a chunked row whose manifest is not
    among its recorded blobs is a damaged registry, said so before anything is sent."""
    blobs = registry.blobs_of(row.id)
    if row.manifest is None:
        return blobs or [(row.digest, row.size)]
    if row.manifest not in {digest for digest, _ in blobs}:
        raise IntegrityError(f"registry row {row.key} names the chunk manifest {row.manifest}"
                             ", which is not among the blobs it records; the registry is "
                             "damaged (`repro verify` lists what is affected)",
                             digest=row.manifest)
    return blobs


def pushed_numbers(registry: Registry, url: str) -> dict[int, int]:
    """Local version id -> its number on the remote at ``url`` (what is known to be there)."""
    return {int(v): int(n) for v, n in registry._read(
        "SELECT version_id, number FROM remote_versions WHERE url = ?", (url,))}


def record_numbers(conn: DBConnection, url: str, numbers: dict[int, int]) -> None:
    conn.executemany(
        "INSERT INTO remote_versions (url, version_id, number, at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (url, version_id) DO UPDATE SET number = excluded.number",
        [(url, vid, number, utc_now()) for vid, number in numbers.items()])


def closure(registry: Registry, versions: Iterable[int], runs: Iterable[str]
            ) -> tuple[list[int], list[str]]:
    """The upstream closure of some versions and runs: ``(version ids in an order where
    parents come first, run ids)``."""
    seen_v: set[int] = set()
    seen_r: set[str] = set()
    todo_v, todo_r = list(versions), list(runs)
    for run_id in todo_r:  # a selected run brings what it logged too
        todo_v += [v.id for v in registry.outputs_of(run_id)]
    while todo_v or todo_r:
        if todo_r:
            run_id = todo_r.pop()
            if run_id not in seen_r:
                seen_r.add(run_id)
                todo_v += [v.id for v in registry.inputs_of(run_id)]
            continue
        vid = todo_v.pop()
        if vid in seen_v:
            continue
        seen_v.add(vid)
        row = registry.get_version(vid)
        todo_v += [p.id for p in registry.parents_of(vid)]
        if row.run_id is not None:
            todo_r.append(row.run_id)
    return _parents_first(registry, seen_v), sorted(seen_r)


def _parents_first(registry: Registry, ids: set[int]) -> list[int]:
    order: list[int] = []
    placed: set[int] = set()
    for start in sorted(ids):
        stack = [(start, False)]
        while stack:
            vid, expanded = stack.pop()
            if vid in placed:
                continue
            if expanded:
                placed.add(vid)
                order.append(vid)
                continue
            stack.append((vid, True))
            stack += [(p.id, False) for p in registry.parents_of(vid)
                      if p.id in ids and p.id not in placed]
    return order


@contextmanager
def snapshot(registry: Registry) -> Iterator[DBConnection]:
    """A consistent read of the registry that takes no write lock: writing a run's bundle
    (seconds, for a long run) must never hold up the training thread's next write."""
    with registry.snapshot() as conn:
        yield conn


def version_in(conn: DBConnection, vid: int) -> VersionRow:
    """A version as it is inside the caller's transaction (another pusher may have moved it
    since this process last read it)."""
    from ..registry.records import VERSION_COLUMNS, VERSION_FROM, version_row

    return version_row(conn.execute(f"SELECT {VERSION_COLUMNS} FROM {VERSION_FROM} WHERE"
                                    " v.id = ?", (vid,)).fetchone())


def local_max(conn: DBConnection, project: str, name: str) -> int:
    return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM versions WHERE project = ?"
                            " AND name = ?", (project, name)).fetchone()[0])


def renumber(conn: DBConnection, row: VersionRow, number: int) -> dict[str, Any]:
    """Move a local version to ``number`` (free locally) inside the caller's transaction;
    returns the journal line to append once it has committed (``journal_moves``): a line for a
    move that was rolled back would make ``repro recover`` rebuild a number that never was."""
    taken = conn.execute("SELECT id FROM versions WHERE project = ? AND name = ? AND"
                         " version = ?", (row.project, row.name, number)).fetchone()
    if taken is not None and int(taken[0]) != row.id:
        raise StorageError(f"cannot renumber {row.key} to v{number}: the number is taken "
                           "locally", path=None)
    conn.execute("UPDATE versions SET version = ? WHERE id = ?", (number, row.id))
    reset_latest(conn, row.project, row.name)
    return {"run_id": row.run_id, "event": "renumber", "at": utc_now(), "project": row.project,
            "name": row.name, "from": row.version, "to": number, "digest": row.digest}


def journal_moves(registry: Registry, moves: list[dict[str, Any]]) -> None:
    """Append committed renumberings to their runs' journals (the registry is the source of
    truth; the journal is its backup, so a failed append is not an error)."""
    for move in moves:
        run_id = move.pop("run_id")
        if run_id is not None:
            with contextlib.suppress(StorageError):
                append_event(registry.root, run_id, move)


def pinned(conn: DBConnection, row: VersionRow) -> bool:
    """A version whose number must not change here: it is on a remote already (its number
    there is recorded beside it), or its run may still be running — on this host or another
    (a shared store): the program holds ``name:vN`` keys (the previous checkpoint, ``best``)
    that must keep naming what they named. Only a run provably dead is not running."""
    if conn.execute("SELECT 1 FROM remote_versions WHERE version_id = ? LIMIT 1",
                    (row.id,)).fetchone() is not None:
        return True
    if row.run_id is None:
        return False
    run = conn.execute("SELECT state FROM runs WHERE id = ?", (row.run_id,)).fetchone()
    if run is None or run[0] != "running":
        return False
    from ..registry.records import RUN_COLUMNS, run_row

    full = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?",
                        (row.run_id,)).fetchone()
    return not is_crashed(run_row(full))


def note_move(moves: list[tuple[str, str]], old: str, new: str) -> None:
    """Add a renumbering to a report as the user sees it: where a version was before the push
    or pull and where it ended. A version moved aside and later moved again is one move, not
    two (``v3→v4, v4→v5`` is reported as ``v3→v5``), and one moved back is none."""
    for i, (first, then) in enumerate(moves):
        if then == old:  # each entry's target is where that version is now: unique
            if first == new:
                del moves[i]
            else:
                moves[i] = (first, new)
            return
    moves.append((old, new))


def reset_latest(conn: DBConnection, project: str, name: str) -> None:
    """``latest`` is the newest version left (what ``add_version`` and pruning maintain)."""
    newest = conn.execute("SELECT id FROM versions WHERE project = ? AND name = ? AND"
                          " pruned_at IS NULL ORDER BY version DESC LIMIT 1",
                          (project, name)).fetchone()
    if newest is not None:
        conn.execute("INSERT INTO aliases (project, name, alias, version_id) VALUES"
                     " (?, ?, 'latest', ?) ON CONFLICT (project, name, alias) DO UPDATE SET"
                     " version_id = excluded.version_id", (project, name, int(newest[0])))
