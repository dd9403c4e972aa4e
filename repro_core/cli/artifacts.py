"""``repro artifacts [NAME]``: artifact versions with their project, aliases, digest, size (and
the bytes each added to the store), and run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ..errors import ArtifactNotFoundError, InvalidArgumentError
from ..registry import Registry, VersionRow
from ..types import validate_name, validate_project
from ._common import (
    console,
    emit_json,
    fmt_size,
    json_option,
    open_registry,
    project_option,
    root_option,
    table,
)

__all__ = ["artifacts", "fmt_stored", "version_dicts"]


@click.command(short_help="List artifact versions.")
@click.argument("name", required=False, metavar="[[PROJECT/]NAME]")
@project_option
@root_option
@json_option
def artifacts(name: str | None, project: str | None, root: Path | None, as_json: bool) -> None:
    """List artifact versions (all, one project's, or one artifact's): project, key, type,
    aliases, digest, size, stored, run. "size" is the version's logical size; "stored" the
    bytes it added to the store — its blobs no earlier version holds (a checkpoint stored
    chunked shares its unchanged tensors with the previous one). A pruned version (content
    released) shows "pruned" in place of its aliases and "-" as stored; its lineage stays."""
    name, project = _split_name(name, project)
    with open_registry(root) as registry:
        rows = version_dicts(registry, registry.list_versions(name, project))
    if name and not rows:
        where = f" in project {project!r}" if project else ""
        raise ArtifactNotFoundError(f"no artifact named {name!r}{where}", key=name)
    if as_json:
        emit_json(rows)
        return
    out = table("project", "artifact", "type", "aliases", "digest", "size", "stored", "run",
                "created")
    for r in rows:
        out.add_row(r["project"], f"{r['name']}:{r['version']}", r["type"],
                    "pruned" if r["pruned_at"] else ", ".join(r["aliases"]), r["digest"][:19],
                    fmt_size(r["size"]), fmt_stored(r["stored_bytes"]),
                    r["run_id"] or "-", r["created_at"][:19])
    console().print(out)


def _split_name(name: str | None, project: str | None) -> tuple[str | None, str | None]:
    """``project/name`` or ``name`` (+ ``--project``), validated before any query."""
    if name is None:
        return None, project
    head, sep, rest = name.partition("/")
    if not sep:
        return validate_name(name), project
    head = validate_project(head)
    if project is not None and project != head:
        raise InvalidArgumentError(f"{name!r} names project {head!r} but --project is "
                                   f"{project!r}; give one of them", argument="project")
    return validate_name(rest), head


def version_dicts(registry: Registry, versions: list[VersionRow]) -> list[dict[str, Any]]:
    """What ``artifacts --json`` lists for each version; ``stored_bytes`` is what it added to
    the store (``Registry.new_bytes``), None for a pruned version (its content is released);
    ``manifest`` the digest of its chunk manifest (None: stored as one blob)."""
    stored = registry.new_bytes([v.id for v in versions if v.pruned_at is None])
    return [{"key": v.key, "project": v.project, "name": v.name, "version": f"v{v.version}",
             "type": v.type, "aliases": registry.aliases_of(v.id), "digest": v.digest,
             "size": v.size, "stored_bytes": stored.get(v.id), "manifest": v.manifest,
             "format": v.format, "run_id": v.run_id, "created_at": v.created_at,
             "metadata": v.metadata, "pruned_at": v.pruned_at} for v in versions]


def fmt_stored(stored: int | None) -> str:
    """A version's stored (new) bytes; "-" for a pruned one."""
    return "-" if stored is None else fmt_size(stored)
