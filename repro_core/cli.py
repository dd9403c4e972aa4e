"""The ``repro`` command line: look at runs, artifacts and lineage; verify and gc the store.

    repro runs | show RUN | artifacts [NAME] | lineage KEY | verify [KEY] | gc [--delete]

Every command takes ``--root`` (default ``$REPRO_HOME`` or ``./repro_store``) and never
creates a store that is not there. Listing commands take ``--json`` for scripts. Bad input
(unknown run or key, missing store) prints one line and exits with code 2, no traceback;
``verify`` exits 1 when it finds a corrupt or missing blob.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from . import constants
from .errors import ReproError
from .registry import Registry, RunRow, VersionRow
from .types import parse_key

__all__ = ["main"]

_F = TypeVar("_F", bound=Callable[..., Any])


def _console() -> Console:
    """A console on the current stdout; wide when piped so keys and ids are never cut."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def _table(*headers: str) -> Table:
    table = Table()
    for header in headers:
        table.add_column(header, overflow="fold")
    return table


class _Usage(click.ClickException):
    """One-line error, exit code 2 (bad input), as ``git`` and ``dvc`` do."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"repro: error: {self.message}", err=True)


def _root_option(fn: _F) -> _F:
    return click.option(
        "--root", type=click.Path(path_type=Path), default=None, envvar="REPRO_HOME",
        help="Store root (default: $REPRO_HOME or ./repro_store).",
    )(fn)


def _json_option(fn: _F) -> _F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)


def resolve_root(root: Path | None) -> Path:
    """The store root, which must already exist (the CLI never creates one)."""
    path = (root or Path(constants.REPRO_HOME or constants.DEFAULT_HOME)).expanduser().absolute()
    if not (path / "registry.sqlite").is_file():
        raise _Usage(f"no repro store at {path} (no registry.sqlite); pass --root or set "
                     "REPRO_HOME")
    return path


@contextmanager
def open_registry(root: Path | None) -> Iterator[Registry]:
    registry = Registry(resolve_root(root) / "registry.sqlite")
    try:
        yield registry
    except ReproError as exc:
        raise _Usage(str(exc)) from exc
    finally:
        registry.close()


def _emit_json(value: Any) -> None:
    """Strict JSON for scripts: NaN/inf become the strings "nan"/"inf"/"-inf"."""
    click.echo(json.dumps(_finite(value), indent=2, sort_keys=True, default=str))


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _duration(run: RunRow) -> str:
    if not run.ended_at:
        return "-"
    seconds = (datetime.fromisoformat(run.ended_at)
               - datetime.fromisoformat(run.created_at)).total_seconds()
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="repro-lightning")
def main() -> None:
    """repro: reproducible runs, content-addressed artifacts and their lineage."""


@main.command()
@_root_option
@_json_option
def runs(root: Path | None, as_json: bool) -> None:
    """List runs: id, name, project, state, start, duration, artifacts logged."""
    with open_registry(root) as registry:
        rows = registry.list_runs()
        counts: dict[str, int] = {}
        for version in registry.list_versions():
            if version.run_id:
                counts[version.run_id] = counts.get(version.run_id, 0) + 1
    if as_json:
        _emit_json([{**r.__dict__, "artifacts": counts.get(r.id, 0)} for r in rows])
        return
    table = _table("id", "name", "project", "state", "start", "duration", "artifacts")
    for r in rows:
        table.add_row(r.id, r.name, r.project, r.state, r.created_at[:19].replace("T", " "),
                      _duration(r), str(counts.get(r.id, 0)))
    _console().print(table)


@main.command()
@click.argument("run_id")
@_root_option
@_json_option
def show(run_id: str, root: Path | None, as_json: bool) -> None:
    """Show one run: config, state history, inputs and outputs."""
    with open_registry(root) as registry:
        run = registry.get_run(run_id)
        detail = {
            **run.__dict__,
            "states": [{"state": s, "at": at, "reason": why}
                       for s, at, why in registry.run_state_history(run_id)],
            "inputs": [v.key for v in registry.inputs_of(run_id)],
            "outputs": [v.key for v in registry.outputs_of(run_id)],
        }
    if as_json:
        _emit_json(detail)
        return
    _console().print(f"[bold]{run.name}[/bold]  id={run.id}  project={run.project}  "
                  f"state={run.state}  host={run.host}  duration={_duration(run)}")
    _console().print(f"config: {json.dumps(run.config, sort_keys=True)}")
    for entry in detail["states"]:
        reason = f"  ({entry['reason']})" if entry["reason"] else ""
        _console().print(f"  {entry['at'][:19]}  {entry['state']}{reason}")
    _console().print(f"inputs:  {', '.join(detail['inputs']) or '-'}")
    _console().print(f"outputs: {', '.join(detail['outputs']) or '-'}")


def _version_dict(registry: Registry, v: VersionRow) -> dict[str, Any]:
    return {"key": v.key, "name": v.name, "version": f"v{v.version}", "type": v.type,
            "aliases": registry.aliases_of(v.id), "digest": v.digest, "size": v.size,
            "format": v.format, "run_id": v.run_id, "created_at": v.created_at,
            "metadata": v.metadata}


@main.command()
@click.argument("name", required=False)
@_root_option
@_json_option
def artifacts(name: str | None, root: Path | None, as_json: bool) -> None:
    """List artifact versions (all, or one artifact's): aliases, digest, size, run."""
    with open_registry(root) as registry:
        rows = [_version_dict(registry, v) for v in registry.list_versions(name)]
    if name and not rows:
        raise _Usage(f"no artifact named {name!r}")
    if as_json:
        _emit_json(rows)
        return
    table = _table("key", "type", "aliases", "digest", "size", "run", "created")
    for r in rows:
        table.add_row(r["key"], r["type"], ", ".join(r["aliases"]), r["digest"][:19],
                      _size(r["size"]), r["run_id"] or "-", r["created_at"][:19])
    _console().print(table)


@main.command()
@click.argument("key")
@click.option("--format", "fmt", type=click.Choice(["tree", "mermaid", "dot", "svg", "json"]),
              default="tree", show_default=True)
@click.option("--depth", type=click.IntRange(min=0), default=None, help="Max edges away.")
@click.option("--up", "direction", flag_value="up", help="Only where KEY came from.")
@click.option("--down", "direction", flag_value="down", help="Only what was built from KEY.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Write to this file instead of stdout.")
@_root_option
def lineage(key: str, fmt: str, depth: int | None, direction: str | None,
            output: Path | None, root: Path | None) -> None:
    """Show where KEY (an artifact key or run:<id>) came from and what was built from it."""
    from .lineage import LineageTracker
    from .lineage_render import render_svg

    with open_registry(root) as registry:
        node = key if key.startswith("run:") else registry.resolve(parse_key(key)).key
        focused = LineageTracker.from_registry(registry, around=node, depth=depth,
                                               direction=direction)
    up = focused.get_ancestors(node) if direction != "down" else set()
    down = focused.get_descendants(node) if direction != "up" else set()
    if fmt == "tree":
        _console().print(_lineage_tree(focused, node, direction))
        return
    text = {
        "mermaid": focused.export_to_mermaid,
        "dot": focused.export_to_dot,
        "svg": lambda: render_svg(focused),
        "json": lambda: json.dumps({"node": node, "ancestors": sorted(up),
                                    "descendants": sorted(down)}, indent=2),
    }[fmt]()
    if output is None:
        click.echo(text)
    else:
        output.write_text(text, encoding="utf-8")
        click.echo(f"wrote {output}", err=True)


def _lineage_tree(tracker: Any, root_id: str, direction: str | None) -> Any:
    """A rich Tree: upstream under "came from", downstream under "built into"."""
    from rich.tree import Tree

    tree = Tree(f"[bold]{root_id}[/bold]")
    if direction != "down":
        _grow(tree.add("[cyan]came from[/cyan]"), tracker.graph.predecessors, root_id)
    if direction != "up":
        _grow(tree.add("[green]built into[/green]"), tracker.graph.successors, root_id)
    return tree


def _grow(branch: Any, neighbours: Callable[[str], Iterator[str]], start: str) -> None:
    """Depth-first, iterative (no recursion limit); a node seen before is printed once."""
    seen = {start}
    stack = [(branch, n) for n in sorted(neighbours(start), reverse=True)]
    while stack:
        parent, node = stack.pop()
        if node in seen:
            parent.add(f"{node} [dim](see above)[/dim]")
            continue
        seen.add(node)
        child = parent.add(node)
        stack.extend((child, n) for n in sorted(neighbours(node), reverse=True))


@main.command()
@click.argument("key", required=False)
@click.option("--all", "check_all", is_flag=True, help="Check every blob (the default).")
@click.option("--size-only", is_flag=True, help="Check sizes, do not re-hash.")
@_root_option
@_json_option
def verify(key: str | None, check_all: bool, size_only: bool, root: Path | None,
           as_json: bool) -> None:
    """Re-hash blobs; exit 1 and name every corrupt or missing one."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from .maintenance import total_referenced_bytes, verify_store

    if key and check_all:
        raise _Usage("give a KEY or --all, not both")
    path = resolve_root(root)
    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn())
    quiet = as_json or key is not None or not sys.stderr.isatty()
    with Progress(*columns, console=Console(stderr=True), disable=quiet,
                  transient=True) as bar:
        task = bar.add_task("verify", total=None if key else total_referenced_bytes(path))
        try:
            report = verify_store(path, full=not size_only, key=key,
                                  progress=lambda n: bar.advance(task, n))
        except ReproError as exc:
            raise _Usage(str(exc)) from exc
    if as_json:
        _emit_json({"ok": report.ok, "blobs_checked": report.blobs_checked,
                    "bytes_checked": report.bytes_checked, "unreferenced": report.unreferenced,
                    "registry_integrity": report.registry_integrity,
                    "problems": [p.__dict__ for p in report.problems]})
    else:
        for p in report.problems:
            _console().print(f"[red]{p.kind.upper()}[/red] {p.digest} "
                          f"(used by {', '.join(p.versions) or 'no version'}): {p.message}")
        status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        _console().print(f"{report.blobs_checked} blobs, {_size(report.bytes_checked)} verified: "
                      f"{status}")
    if not report.ok:
        sys.exit(1)


@main.command()
@click.argument("run_a")
@click.argument("run_b")
@_root_option
@_json_option
def diff(run_a: str, run_b: str, root: Path | None, as_json: bool) -> None:
    """Why two runs differ: config, packages, git, CUDA/GPU, determinism, seeds, metrics."""
    from .diff import diff_runs

    try:
        result = diff_runs(run_a, run_b, root=resolve_root(root))
    except ReproError as exc:
        raise _Usage(str(exc)) from exc
    if as_json:
        _emit_json(result)
        return
    console = _console()
    a, b = result["runs"]["a"], result["runs"]["b"]
    console.print(f"[bold]a[/bold] = {a['name']} ({a['id']}, {a['state']})   "
                  f"[bold]b[/bold] = {b['name']} ({b['id']}, {b['state']})")
    for section in ("config", "packages", "git", "cuda", "gpu", "determinism", "seeds"):
        _print_section(console, section, result[section])
    if result["metrics"]:
        table = _table("metric", "a", "b")
        for key, (left, right) in result["metrics"].items():
            table.add_row(key, _fmt(left), _fmt(right))
        console.print("[bold]final metrics[/bold]")
        console.print(table)


def _print_section(console: Console, section: str, change: dict[str, Any]) -> None:
    lines = [f"  ~ {k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in change["changed"].items()]
    lines += [f"  + {k}: {_fmt(v)}" for k, v in change["added"].items()]
    lines += [f"  - {k}: {_fmt(v)}" for k, v in change["removed"].items()]
    status = f"{len(lines)} difference(s)" if lines else "same"
    console.print(f"[bold]{section}[/bold]: {status}")
    for line in lines:
        console.print(line, markup=False)


def _fmt(value: Any) -> str:
    return "-" if value is None else json.dumps(_finite(value), default=str)


@main.command()
@click.option("--dry-run/--delete", default=True,
              help="Only report (default), or really delete.")
@click.option("--grace", type=float, default=3600.0, show_default=True,
              help="Keep unreferenced blobs younger than this many seconds (live writers).")
@_root_option
@_json_option
def gc(dry_run: bool, grace: float, root: Path | None, as_json: bool) -> None:
    """Remove blobs no version references and stale temp files (dry run by default)."""
    from .maintenance import collect_garbage

    report = collect_garbage(resolve_root(root), dry_run=dry_run, grace_seconds=grace)
    if as_json:
        _emit_json({"dry_run": dry_run, "blobs": report.blobs, "bytes": report.bytes_freed,
                    "temp_files": report.temp_files, "kept_young": report.kept_young,
                    "materialized_dirs": report.materialized_dirs})
        return
    verb = "would free" if dry_run else "freed"
    _console().print(f"{verb} {_size(report.bytes_freed)} in {len(report.blobs)} blob(s); "
                  f"{report.temp_files} stale temp file(s); {report.kept_young} young "
                  f"unreferenced blob(s) kept")
    if dry_run and (report.blobs or report.temp_files):
        _console().print("run `repro gc --delete` to remove them")


if __name__ == "__main__":  # pragma: no cover
    main()
