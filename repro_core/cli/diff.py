"""``repro diff RUN_A RUN_B``: why two runs differ (see :mod:`repro_core.diff`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.console import Console

from ._common import (
    clean,
    console,
    emit_json,
    fmt_value,
    json_option,
    markup_safe,
    root_option,
    store_root,
    table,
)

__all__ = ["diff"]

_SECTIONS = ("config", "packages", "git", "cuda", "gpu", "determinism", "seeds")


@click.command(short_help="Why two runs differ.")
@click.argument("run_a")
@click.argument("run_b")
@root_option
@json_option
def diff(run_a: str, run_b: str, root: Path | None, as_json: bool) -> None:
    """Why two runs differ (RUN_A, RUN_B: ids or unique prefixes): config, packages, git,
    CUDA/GPU, determinism, seeds, final metrics. A section a run did not record is shown as
    "not captured", never as "same"."""
    from ..diff import diff_runs

    result = diff_runs(run_a, run_b, root=store_root(root))
    if as_json:
        emit_json(result)
        return
    out = console()
    a, b = result["runs"]["a"], result["runs"]["b"]
    out.print("   ".join(f"[bold]{side}[/bold] = {markup_safe(run['name'])} "
                           f"({markup_safe(run['id'])}, {markup_safe(run['project'])}, "
                           f"{markup_safe(run['state'])})"
                           for side, run in (("a", a), ("b", b))))
    for section in _SECTIONS:
        _print_section(out, section, result[section])
    if result["metrics"]:
        metrics = table("metric", "a", "b")
        for key, (left, right) in result["metrics"].items():
            metrics.add_row(key, fmt_value(left), fmt_value(right))
        out.print("[bold]final metrics[/bold]")
        out.print(metrics)


def _print_section(out: Console, section: str, change: dict[str, Any]) -> None:
    missing = [side for side in ("a", "b") if not change["captured"][side]]
    if missing:
        status = "not captured" if len(missing) == 2 else f"not captured in {missing[0]}"
        out.print(f"[bold]{section}[/bold]: {status}")
        return
    lines = [f"  ~ {k}: {fmt_value(a)} -> {fmt_value(b)}"
             for k, (a, b) in change["changed"].items()]
    lines += [f"  + {k}: {fmt_value(v)}" for k, v in change["added"].items()]
    lines += [f"  - {k}: {fmt_value(v)}" for k, v in change["removed"].items()]
    status = f"{len(lines)} difference(s)" if lines else "same"
    out.print(f"[bold]{section}[/bold]: {status}")
    for line in lines:
        out.print(clean(line), markup=False)
