"""Artifact versions in the registry: numbering, aliases, key resolution, lineage edges.

Names live in a project (as in W&B): ``project/name`` is one artifact with versions
``v1, v2, …``. A key without a project resolves in the caller's project (the active run's),
then in ``default``; with ``anywhere=True`` (read-only views without a run: the CLI) a name
found in exactly one other project resolves there too. A run never silently picks up another
project's ``checkpoint:latest``: with an active run there is no such fallback.

Lineage edges: *produced-by* is ``versions.run_id`` plus ``run_outputs`` (every run that logged
a version, deduplicated ones included), *used-by* is ``run_inputs``, *parent-of* is
``artifact_parents``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import ArtifactNotFoundError, IntegrityError, InvalidArgumentError, ReproError
from ..types import DEFAULT_PROJECT, ParsedKey, utc_now, validate_alias
from .dialect import DOWNSTREAM, DBConnection
from .records import (
    ARTIFACT_JOIN,
    VERSION_COLUMNS,
    VERSION_FROM,
    NewVersion,
    VersionRow,
    dumps,
    version_row,
)
from .runs import RunQueries

__all__ = ["VersionQueries"]


class VersionQueries(RunQueries):
    """Versions, aliases and the edges between versions and runs."""

    def add_version(self, new: NewVersion) -> tuple[VersionRow, bool, bool]:
        """Insert a version (or return the latest when its content is identical).

        Returns ``(row, created, linked)``: ``linked`` says whether the logging run is now
        recorded as having logged it (not when that would close a lineage cycle) — the run
        journal records exactly what the registry did, so ``repro recover`` rebuilds the same
        edges. The version number is computed inside the write transaction, so concurrent
        writers on one store get consecutive, unique numbers.
        """
        with self._write() as conn:
            self._ensure_artifact(conn, new)
            latest = _fetch_alias(conn, new.project, new.name, "latest")
            if latest is not None and latest.digest == new.digest:
                return latest, False, self._same_content(conn, latest, new)
            number = conn.execute(
                "SELECT COALESCE(MAX(version) + 1, 1) FROM versions WHERE project = ? AND"
                " name = ?", (new.project, new.name)).fetchone()[0]
            cursor = conn.execute(
                "INSERT INTO versions (project, name, version, digest, size, format, run_id,"
                " created_at, metadata, filename, manifest) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (new.project, new.name, number, new.digest, new.size, new.format, new.run_id,
                 utc_now(), dumps(new.metadata), new.filename, new.manifest),
            )
            version_id = int(cursor.fetchone()[0])
            conn.executemany(
                "INSERT INTO version_blobs (version_id, digest, size) VALUES (?, ?, ?)"
                " ON CONFLICT (version_id, digest) DO NOTHING",
                [(version_id, d, s) for d, s in new.blobs],
            )
            _add_parents(conn, version_id, new.parent_ids)
            _set_aliases(conn, new.project, new.name, version_id, ["latest", *new.aliases])
            linked = _record_output(conn, new.run_id, version_id)
            row = _fetch(conn, "v.id = ?", (version_id,))
        assert row is not None
        return row, True, linked

    def _same_content(self, conn: DBConnection, latest: VersionRow,
                      new: NewVersion) -> bool:
        """Same content as ``latest``: no new version, whatever parents the call names (a
        frozen model checkpointed twice names the first checkpoint as its parent). What the
        call adds is kept — aliases, the logging run, parents — except edges that would make
        the version its own ancestor; those are dropped, not refused."""
        downstream_versions, downstream_runs = _downstream(conn, latest.id)
        parents = [p for p in new.parent_ids if p not in downstream_versions]
        _set_aliases(conn, new.project, new.name, latest.id, new.aliases)
        _add_parents(conn, latest.id, parents)
        if new.run_id in downstream_runs:  # run → it → … → run would be a cycle
            return False
        return _record_output(conn, new.run_id, latest.id)

    def check_type(self, project: str, name: str, type_: str) -> None:
        """Refuse a version of another type than the artifact's, before its content is
        written (``add_version`` checks again inside its transaction, against races)."""
        existing = self._read("SELECT type FROM artifacts WHERE project = ? AND name = ?",
                              (project, name))
        _same_type(project, name, existing[0][0] if existing else None, type_)

    def _ensure_artifact(self, conn: DBConnection, new: NewVersion) -> None:
        existing = conn.execute("SELECT type FROM artifacts WHERE project = ? AND name = ?",
                                (new.project, new.name)).fetchone()
        if existing is None:
            conn.execute("INSERT INTO artifacts (project, name, type, created_at) VALUES"
                         " (?, ?, ?, ?)", (new.project, new.name, new.type, utc_now()))
        else:
            _same_type(new.project, new.name, existing[0], new.type)

    # -- resolution -------------------------------------------------------------------------

    def resolve(self, key: ParsedKey, *, project: str | None = None,
                anywhere: bool = False) -> VersionRow:
        """Find the version a parsed key names, or raise ``ArtifactNotFoundError``."""
        tried = [key.project] if key.project else list(dict.fromkeys(
            [p for p in (project, DEFAULT_PROJECT) if p]))
        with self._reading() as conn:
            for candidate in tried:
                row = _resolve_in(conn, key, candidate)
                if row is not None:
                    return row
            if anywhere and key.project is None:
                others = [p for p in self.projects_of(key.name) if p not in tried]
                if len(others) > 1:
                    raise ArtifactNotFoundError(
                        f"{key.text()!r} is ambiguous: {key.name!r} exists in projects "
                        f"{', '.join(others)}; write it as <project>/{key.text()}",
                        key=key.text())
                row = _resolve_in(conn, key, others[0]) if others else None
                if row is not None:
                    return row
                tried += others
        raise ArtifactNotFoundError(self._not_found_message(key, tried), key=key.text())

    def projects_of(self, name: str) -> list[str]:
        """Projects holding an artifact called ``name``."""
        return [r[0] for r in self._read(
            "SELECT project FROM artifacts WHERE name = ? ORDER BY project", (name,))]

    def _not_found_message(self, key: ParsedKey, projects: Sequence[str]) -> str:
        for project in projects:
            versions = self._read("SELECT MIN(version), MAX(version) FROM versions WHERE"
                                  " project = ? AND name = ?", (project, key.name))
            if versions and versions[0][0] is not None:
                aliases = [r[0] for r in self._read(
                    "SELECT alias FROM aliases WHERE project = ? AND name = ? ORDER BY alias",
                    (project, key.name))]
                return (f"{key.text()!r} not found; {project}/{key.name} has versions "
                        f"v{versions[0][0]}..v{versions[0][1]} and aliases {', '.join(aliases)}")
        where = "project " + " or ".join(repr(p) for p in projects) if projects else "any project"
        return f"no artifact named {key.name!r} in {where} of {self.root}"

    def get_version(self, version_id: int) -> VersionRow:
        with self._reading() as conn:
            row = _fetch(conn, "v.id = ?", (version_id,))
        if row is None:
            raise ArtifactNotFoundError(f"no version with id {version_id}", key=str(version_id))
        return row

    def list_versions(self, name: str | None = None, project: str | None = None
                      ) -> list[VersionRow]:
        clauses = [c for c, v in (("v.name = ?", name), ("v.project = ?", project)) if v]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        params = [v for v in (name, project) if v]
        rows = self._read(f"SELECT {VERSION_COLUMNS} FROM {VERSION_FROM} {where}"
                          " ORDER BY v.project, v.name, v.version", params)
        return [version_row(r) for r in rows]

    def aliases_of(self, version_id: int) -> list[str]:
        aliases = [r[0] for r in self._read(
            "SELECT alias FROM aliases WHERE version_id = ? ORDER BY alias", (version_id,))]
        for alias in aliases:  # stored text is untrusted: a forged alias is damage, not a name
            try:
                validate_alias(alias)
            except ReproError:
                raise IntegrityError(f"the registry holds a forged alias {alias!r} of version "
                                     f"{version_id}") from None
        return aliases

    # -- edges ------------------------------------------------------------------------------

    def parents_of(self, version_id: int) -> list[VersionRow]:
        return self._related("parent_id", "child_id", version_id)

    def children_of(self, version_id: int) -> list[VersionRow]:
        return self._related("child_id", "parent_id", version_id)

    def _related(self, wanted: str, given: str, version_id: int) -> list[VersionRow]:
        return [version_row(r) for r in self._read(
            f"SELECT {VERSION_COLUMNS} FROM artifact_parents p JOIN versions v ON"
            f" v.id = p.{wanted} {ARTIFACT_JOIN} WHERE p.{given} = ? ORDER BY v.id",
            (version_id,))]

    def consumers_of(self, version_id: int) -> list[str]:
        return [r[0] for r in self._read(
            "SELECT run_id FROM run_inputs WHERE version_id = ? ORDER BY used_at",
            (version_id,))]

    def inputs_of(self, run_id: str) -> list[VersionRow]:
        return [version_row(r) for r in self._read(
            f"SELECT {VERSION_COLUMNS} FROM run_inputs i JOIN versions v ON v.id = i.version_id"
            f" {ARTIFACT_JOIN} WHERE i.run_id = ? ORDER BY i.used_at, v.id", (run_id,))]

    def outputs_of(self, run_id: str) -> list[VersionRow]:
        """Versions the run logged, including ones that deduplicated to an existing version."""
        return [version_row(r) for r in self._read(
            f"SELECT {VERSION_COLUMNS} FROM run_outputs o JOIN versions v ON v.id = o.version_id"
            f" {ARTIFACT_JOIN} WHERE o.run_id = ? ORDER BY o.logged_at, v.id", (run_id,))]

    def output_counts(self) -> dict[str, int]:
        """Versions each run logged (deduplicated ones included), for listings."""
        return {r[0]: int(r[1]) for r in self._read(
            "SELECT run_id, COUNT(*) FROM run_outputs GROUP BY run_id")}

    def record_use(self, run_id: str, version_id: int) -> bool:
        """Record that ``run_id`` used the version; True when the edge is new. A run reading
        back what it logged is not an input (that would be a cycle): no edge then."""
        with self._write() as conn:
            return conn.execute(
                "INSERT INTO run_inputs (run_id, version_id, used_at) SELECT ?, ?, ?"
                " WHERE NOT EXISTS (SELECT 1 FROM run_outputs WHERE run_id = ? AND"
                " version_id = ?) ON CONFLICT (run_id, version_id) DO NOTHING",
                (run_id, version_id, utc_now(), run_id, version_id),
            ).rowcount == 1

    # -- blobs ------------------------------------------------------------------------------

    def blobs_of(self, version_id: int) -> list[tuple[str, int]]:
        """The ``(digest, size)`` of every blob one version needs."""
        return [(_text(r[0]), _size(r[1])) for r in self._read(
            "SELECT digest, size FROM version_blobs WHERE version_id = ?", (version_id,))]

    def blob_references(self) -> list[tuple[str, int | None]]:
        """Every ``(digest, size)`` the registry needs: version blobs (manifests and their
        files included) and TTRL experience payloads (size None if written before v3).
        gc keeps exactly these."""
        return [(_text(r[0]), None if r[1] is None else _size(r[1])) for r in self._read(
            "SELECT b.digest, b.size FROM version_blobs b JOIN versions v ON v.id = b.version_id"
            " WHERE v.pruned_at IS NULL UNION SELECT payload_digest, payload_size"
            " FROM experiences WHERE payload_digest IS NOT NULL ORDER BY 1")]

    def prune_version(self, version_id: int) -> list[str]:
        """Mark a version pruned: its aliases go (``latest`` moves to the newest version left),
        its row and lineage edges stay, and gc may reclaim the blobs no other live version
        needs. Returns the aliases it had. Idempotent."""
        with self._write() as conn:
            row = _fetch(conn, "v.id = ?", (version_id,))
            if row is None:
                raise ArtifactNotFoundError(f"no version with id {version_id}",
                                            key=str(version_id))
            aliases = [r[0] for r in conn.execute(
                "SELECT alias FROM aliases WHERE version_id = ? ORDER BY alias", (version_id,))]
            conn.execute("DELETE FROM aliases WHERE version_id = ?", (version_id,))
            conn.execute("UPDATE versions SET pruned_at = ? WHERE id = ? AND pruned_at IS NULL",
                         (utc_now(), version_id))
            if "latest" in aliases:
                newest = conn.execute(
                    "SELECT id FROM versions WHERE project = ? AND name = ? AND pruned_at IS"
                    " NULL ORDER BY version DESC LIMIT 1", (row.project, row.name)).fetchone()
                if newest is not None:
                    _set_aliases(conn, row.project, row.name, int(newest[0]), ["latest"])
        return aliases


def _same_type(project: str, name: str, existing: str | None, type_: str) -> None:
    if existing is not None and existing != type_:
        raise InvalidArgumentError(
            f"artifact {project}/{name} has type {existing!r}; it cannot take a {type_!r} "
            f"version. Use another name, or log it with type={existing!r}", argument="type")


def _size(value: object) -> int:
    """A blob size read from the store: a forged one is damage, not a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise IntegrityError(f"the registry records a blob size of {value!r}; the store is "
                             "damaged: `repro verify` names what else is affected")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise IntegrityError(f"the registry records a blob digest of {value!r}; the store is "
                             "damaged: `repro verify` names what else is affected")
    return value


def _resolve_in(conn: DBConnection, key: ParsedKey, project: str) -> VersionRow | None:
    if key.version is not None:
        return _fetch(conn, "v.project = ? AND v.name = ? AND v.version = ?",
                      (project, key.name, key.version))
    if key.digest_prefix is not None:
        return _resolve_prefix(conn, key, project)
    assert key.alias is not None
    return _fetch_alias(conn, project, key.name, key.alias)


def _resolve_prefix(conn: DBConnection, key: ParsedKey, project: str) -> VersionRow | None:
    assert key.digest_prefix is not None
    rows = conn.execute(
        f"SELECT {VERSION_COLUMNS} FROM {VERSION_FROM} WHERE v.project = ? AND v.name = ? AND"
        " substr(v.digest, 1, ?) = ? ORDER BY v.version DESC",
        (project, key.name, len(key.digest_prefix), key.digest_prefix),
    ).fetchall()
    digests = {r[4] for r in rows}
    if len(digests) > 1:
        raise ArtifactNotFoundError(
            f"digest prefix {key.digest_prefix!r} is ambiguous for {project}/{key.name} "
            f"({len(digests)} matches); give more hex digits", key=key.text())
    return version_row(rows[0]) if rows else None


def _downstream(conn: DBConnection, version_id: int) -> tuple[set[int], set[str]]:
    """Every version and run reachable downstream of a version (itself included), through
    parent edges, runs that used it and what those runs logged."""
    rows = conn.execute(DOWNSTREAM[conn.dialect], (version_id,)).fetchall()
    return ({int(i) for k, i in rows if k == "v"}, {str(i) for k, i in rows if k == "r"})


def _add_parents(conn: DBConnection, child_id: int, parent_ids: Sequence[int]) -> None:
    conn.executemany(
        "INSERT INTO artifact_parents (child_id, parent_id) VALUES (?, ?)"
        " ON CONFLICT (child_id, parent_id) DO NOTHING",
        [(child_id, p) for p in parent_ids if p != child_id],
    )


def _set_aliases(conn: DBConnection, project: str, name: str, version_id: int,
                 aliases: Sequence[str]) -> None:
    conn.executemany(
        "INSERT INTO aliases (project, name, alias, version_id) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (project, name, alias) DO UPDATE SET version_id = excluded.version_id",
        [(project, name, a, version_id) for a in aliases],
    )


def _record_output(conn: DBConnection, run_id: str | None, version_id: int) -> bool:
    """Link the run to what it logged, unless it used that very version (no cycles); True
    when the run is (now or already) recorded as having logged it."""
    if run_id is None:
        return False
    conn.execute(
        "INSERT INTO run_outputs (run_id, version_id, logged_at) SELECT ?, ?, ?"
        " WHERE NOT EXISTS (SELECT 1 FROM run_inputs WHERE run_id = ? AND version_id = ?)"
        " ON CONFLICT (run_id, version_id) DO NOTHING",
        (run_id, version_id, utc_now(), run_id, version_id),
    )
    return conn.execute("SELECT 1 FROM run_outputs WHERE run_id = ? AND version_id = ?",
                        (run_id, version_id)).fetchone() is not None


def _fetch_alias(conn: DBConnection, project: str, name: str,
                 alias: str) -> VersionRow | None:
    row = conn.execute(
        f"SELECT {VERSION_COLUMNS} FROM aliases al JOIN versions v ON v.id = al.version_id"
        f" {ARTIFACT_JOIN} WHERE al.project = ? AND al.name = ? AND al.alias = ?",
        (project, name, alias),
    ).fetchone()
    return version_row(row) if row else None


def _fetch(conn: DBConnection, where: str, params: Sequence[Any]) -> VersionRow | None:
    row = conn.execute(f"SELECT {VERSION_COLUMNS} FROM {VERSION_FROM} WHERE {where}",
                       params).fetchone()
    return version_row(row) if row else None
