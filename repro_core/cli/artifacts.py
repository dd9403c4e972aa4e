"""``repro artifacts [NAME]``: artifact versions with their project, aliases, digest and run."""

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

__all__ = ["artifacts"]


@click.command(short_help="List artifact versions.")
@click.argument("name", required=False, metavar="[[PROJECT/]NAME]")
@project_option
@root_option
@json_option
def artifacts(name: str | None, project: str | None, root: Path | None, as_json: bool) -> None:
    """List artifact versions (all, one project's, or one artifact's): project, key, type,
    aliases, digest, size, run. A pruned version (content released) shows "pruned" in place
    of its aliases; its lineage stays."""
    name, project = _split_name(name, project)
    with open_registry(root) as registry:
        rows = [_version_dict(registry, v) for v in registry.list_versions(name, project)]
    if name and not rows:
        where = f" in project {project!r}" if project else ""
        raise ArtifactNotFoundError(f"no artifact named {name!r}{where}", key=name)
    if as_json:
        emit_json(rows)
        return
    out = table("project", "artifact", "type", "aliases", "digest", "size", "run", "created")
    for r in rows:
        out.add_row(r["project"], f"{r['name']}:{r['version']}", r["type"],
                    "pruned" if r["pruned_at"] else ", ".join(r["aliases"]), r["digest"][:19],
                    fmt_size(r["size"]),
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


def _version_dict(registry: Registry, v: VersionRow) -> dict[str, Any]:
    return {"key": v.key, "project": v.project, "name": v.name, "version": f"v{v.version}",
            "type": v.type, "aliases": registry.aliases_of(v.id), "digest": v.digest,
            "size": v.size, "format": v.format, "run_id": v.run_id,
            "created_at": v.created_at, "metadata": v.metadata, "pruned_at": v.pruned_at}
