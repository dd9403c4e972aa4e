"""``repro runs`` and ``repro show RUN``: what ran, in which project, and what it logged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..registry import Registry, RunRow
from ._common import (
    clean,
    console,
    emit_json,
    fmt_size,
    json_option,
    markup_safe,
    open_registry,
    project_option,
    root_option,
    run_duration,
    table,
)

__all__ = ["runs", "show"]


@click.command(short_help="List runs: project, state, artifacts logged.")
@project_option
@root_option
@json_option
def runs(project: str | None, root: Path | None, as_json: bool) -> None:
    """List runs: id, name, project, state, start, duration, artifacts logged.

    "artifacts" counts every version a run logged, including those whose content was already
    stored (deduplicated to an existing version), as `repro show` lists them.
    """
    with open_registry(root) as registry:
        rows = [r for r in registry.list_runs() if project in (None, r.project)]
        counts = registry.output_counts()
    if as_json:
        emit_json([{**r.__dict__, "artifacts": counts.get(r.id, 0)} for r in rows])
        return
    out = table("id", "name", "project", "state", "start", "duration", "artifacts")
    for r in rows:
        out.add_row(r.id, r.name, r.project, r.state, r.created_at[:19].replace("T", " "),
                    run_duration(r), str(counts.get(r.id, 0)))
    console().print(out)


@click.command(short_help="Show one run: config, states, inputs, outputs.")
@click.argument("run_id", metavar="RUN")
@root_option
@json_option
def show(run_id: str, root: Path | None, as_json: bool) -> None:
    """Show one run (RUN: its id or a unique prefix): project, config, state history, inputs
    and outputs — each output with its size and the bytes it added to the store ("new": its
    blobs no earlier version holds; a chunked checkpoint shares unchanged tensors)."""
    with open_registry(root) as registry:
        run = registry.get_run(run_id)
        detail = _detail(registry, run)
    if as_json:
        emit_json(detail)
        return
    out = console()
    out.print(f"[bold]{markup_safe(run.name)}[/bold]  id={markup_safe(run.id)}  project="
              f"{markup_safe(run.project)}  state={markup_safe(run.state)}  host="
              f"{markup_safe(run.host)}  duration={run_duration(run)}")
    out.print(clean(f"config: {json.dumps(run.config, sort_keys=True)}"), markup=False)
    for entry in detail["states"]:
        reason = f"  ({entry['reason']})" if entry["reason"] else ""
        out.print(clean(f"  {entry['at'][:19]}  {entry['state']}{reason}"), markup=False)
    out.print(clean(f"inputs:  {', '.join(detail['inputs']) or '-'}"), markup=False)
    outputs = [f"{o['key']} ({_sizes(o)})" for o in detail["output_versions"]]
    out.print(clean(f"outputs: {', '.join(outputs) or '-'}"), markup=False)


def _sizes(version: dict[str, Any]) -> str:
    if version["stored_bytes"] is None:
        return f"{fmt_size(version['size'])}, pruned"
    return f"{fmt_size(version['size'])}, {fmt_size(version['stored_bytes'])} new"


def _detail(registry: Registry, run: RunRow) -> dict[str, Any]:
    """Everything ``show`` prints, by the run's full id (a prefix names no rows here).
    ``output_versions``: each output's key, size and ``stored_bytes`` (what it added to the
    store; None when pruned), as ``repro artifacts --json`` gives them."""
    outputs = registry.outputs_of(run.id)
    stored = registry.new_bytes([v.id for v in outputs if v.pruned_at is None])
    return {
        **run.__dict__,
        "states": [{"state": s, "at": at, "reason": why}
                   for s, at, why in registry.run_state_history(run.id)],
        "inputs": [v.key for v in registry.inputs_of(run.id)],
        "outputs": [v.key for v in outputs],
        "output_versions": [{"key": v.key, "size": v.size, "stored_bytes": stored.get(v.id),
                             "manifest": v.manifest} for v in outputs],
    }
