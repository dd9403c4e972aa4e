"""``repro updates RUN [--checkpoint KEY]``: a TTRL run's online updates, or the ones that
produced one checkpoint (:func:`repro_core.ttrl.updates_producing` decides which those are)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

from ..errors import InvalidArgumentError
from ..registry import Registry, RunRow
from ..types import parse_key
from ._common import console, emit_json, fmt_time, json_option, open_registry, root_option, table

__all__ = ["updates"]


@click.command(short_help="A TTRL run's online updates.")
@click.argument("run_id", metavar="RUN")
@click.option("--checkpoint", "checkpoint_key", metavar="KEY", default=None,
              help="Only the updates that produced this checkpoint: those the run made while "
                   "its previous checkpoint was the model in force.")
@root_option
@json_option
def updates(run_id: str, checkpoint_key: str | None, root: Path | None, as_json: bool) -> None:
    """Online updates of a TTRL run (RUN: id or unique prefix), oldest first: update,
    experience, reward, confidence, KL, the model version in force, time (UTC)."""
    with open_registry(root) as registry:
        run = registry.get_run(run_id)
        rows = _rows(registry, run, checkpoint_key)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        which = f" that produced {checkpoint_key}" if checkpoint_key else ""
        console().print(f"run {run.id} has no online updates{which}", markup=False)
        return
    out = table("update", "experience", "reward", "confidence", "kl", "model version", "time")
    for r in rows:
        out.add_row(r["update_id"], r["experience_id"], _num(r["reward"]),
                    _num(r["confidence"]), _num(r["kl_divergence"]), r["model_version"] or "-",
                    r["time"])
    console().print(out)


def _rows(registry: Registry, run: RunRow, checkpoint_key: str | None) -> list[dict[str, Any]]:
    from ..ttrl import run_updates, updates_producing

    rows = run_updates(registry, run.id)
    if checkpoint_key is not None:
        version = registry.resolve(parse_key(checkpoint_key), project=run.project,
                                   anywhere=True)
        if version.run_id != run.id:
            by = f"run {version.run_id}" if version.run_id else "no run"
            hint = (f"; see `repro updates {version.run_id} --checkpoint {version.key}`"
                    if version.run_id else "")
            raise InvalidArgumentError(f"{version.key} was logged by {by}, not {run.id}{hint}",
                                       argument="checkpoint")
        wanted = {u["update_id"] for u in updates_producing(registry, version.id)}
        rows = [u for u in rows if u["update_id"] in wanted]
    ids = sorted({u["model_version_id"] for u in rows if u["model_version_id"] is not None})
    keys = {v.id: v.key for v in registry.versions_by_id(ids)}
    return [{**u, "model_version": keys.get(u["model_version_id"]),
             "time": fmt_time(u["timestamp"])} for u in rows]


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) and math.isfinite(value) else str(value)
