"""Aliases across stores: send the moves made here, take the moves made there.

An alias (``best``, ``prod``) is a pointer that moves. Copying every alias on every push
would undo a move another store pushed (a stale ``best`` reverting a newer one). So each
store remembers, per remote, where each alias pointed when the two last agreed
(``remote_aliases``), and:

- **push** writes an alias only when it moved *here* since then; if the remote's moved too
  (someone else's move in between), that is a conflict: reported, nothing overwritten;
- **pull** applies an alias only when it moved *there*; if it also moved here, a conflict:
  this store's is kept, the remote's noted as seen — so the next push (a deliberate choice,
  after the report) sends this store's;
- never agreed yet (the first push or pull of that alias): the one who writes wins, as the
  last ``log_artifact(aliases=…)`` wins in one store.

``latest`` is never sent: every store keeps its own (its newest version).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..registry import Registry
from ..registry.dialect import DBConnection
from ..types import utc_now
from ._records import AliasRecord, alias_path, decode, encode
from ._remote import Remote, SyncReport

__all__ = ["pull_aliases", "push_aliases"]

_Key = tuple[str, str, str]


def _synced(registry: Registry, url: str) -> dict[_Key, str]:
    return {(p, n, a): u for p, n, a, u in registry._read(
        "SELECT project, name, alias, uid FROM remote_aliases WHERE url = ?", (url,))}


def _agree(conn: DBConnection, url: str, key: _Key, uid: str) -> None:
    conn.execute("INSERT INTO remote_aliases (url, project, name, alias, uid) VALUES (?, ?, ?,"
                 " ?, ?) ON CONFLICT (url, project, name, alias) DO UPDATE SET uid ="
                 " excluded.uid", (url, *key, uid))


def push_aliases(registry: Registry, remote: Remote, uids: dict[int, str],
                 numbers: dict[int, int], names: Iterable[tuple[str, str]],
                 report: SyncReport, *, check: bool = False) -> None:
    """Send the alias moves made here for ``names`` (only to versions the remote holds);
    ``check``: also the ones sent before (the remote may have lost them)."""
    synced = _synced(registry, remote.url)
    for project, name in sorted(set(names)):
        for alias, vid in registry._read(
                "SELECT alias, version_id FROM aliases WHERE project = ? AND name = ? AND"
                " alias != 'latest' ORDER BY alias", (project, name)):
            key, mine = (project, name, str(alias)), uids.get(int(vid))
            if mine is None or int(vid) not in numbers or (synced.get(key) == mine
                                                            and not check):
                continue  # not on the remote, or not moved here since we last agreed
            path = alias_path(project, name, str(alias))
            data = remote.records.get(path)
            record = decode(data, f"{remote.where}/meta/{path}") if data is not None else None
            theirs = record.uid if isinstance(record, AliasRecord) else None
            last = synced.get(key)
            if theirs is not None and theirs not in (mine, last) and last is not None:
                report.problems.append(
                    f"alias {project}/{name}:{alias} moved both here and on "
                    f"{remote.where} since they last agreed; the remote's is kept (pull to "
                    "see it; a push after that pull sends this store's)")
                continue
            if theirs != mine:
                remote.records.put(path, encode(AliasRecord(
                    project, name, str(alias), mine, numbers[int(vid)], utc_now())))
                report.aliases += 1
            with registry.transaction() as conn:
                _agree(conn, remote.url, key, mine)


def pull_aliases(conn: DBConnection, registry: Registry, remote: Remote,
                 records: Iterable[AliasRecord], ids: dict[str, int],
                 report: SyncReport) -> None:
    """Apply the alias moves made on the remote (inside the pull's transaction)."""
    synced = _synced(registry, remote.url)
    local_uid = {vid: uid for uid, vid in ids.items()}
    for record in records:
        key = (record.project, record.name, record.alias)
        last = synced.get(key)
        vid = ids.get(record.uid)
        if record.uid == last or vid is None:
            continue  # not moved there since we last agreed, or its version is not here
        row = conn.execute("SELECT project, name FROM versions WHERE id = ?", (vid,)).fetchone()
        if row is None or (row[0], row[1]) != (record.project, record.name):
            report.problems.append(
                f"alias {record.project}/{record.name}:{record.alias} on {remote.where} "
                "names a version of another artifact; not applied (the remote is damaged or "
                "forged)")
            continue
        current = conn.execute("SELECT version_id FROM aliases WHERE project = ? AND name = ?"
                               " AND alias = ?", key).fetchone()
        mine = local_uid.get(int(current[0])) if current is not None else None
        if mine is not None and last is not None and mine not in (last, record.uid):
            report.problems.append(
                f"alias {record.project}/{record.name}:{record.alias} moved both here and on "
                f"{remote.where} since they last agreed; this store's is kept (push to make "
                "it the remote's too)")
            _agree(conn, remote.url, key, record.uid)  # seen: the next push overrides it
            continue
        if mine != record.uid:
            conn.execute("INSERT INTO aliases (project, name, alias, version_id) VALUES (?, ?,"
                         " ?, ?) ON CONFLICT (project, name, alias) DO UPDATE SET version_id ="
                         " excluded.version_id", (*key, vid))
            report.aliases += 1
        _agree(conn, remote.url, key, record.uid)
