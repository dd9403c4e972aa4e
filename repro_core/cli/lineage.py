"""``repro lineage KEY``: where a version (or ``run:<id>``) came from and what was built from it.

Formats: a tree (default), Mermaid, DOT, SVG, JSON; ``-o FILE`` writes any of them to a file
(the tree as plain text). ``--up`` / ``--down`` pick one direction; both together are refused
rather than silently meaning one of them (leave both off for both directions).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from ..errors import ArtifactNotFoundError, InvalidArgumentError, InvalidNameError
from ..registry import Registry
from ..types import parse_key
from ._common import console, markup_safe, open_registry, root_option, store_root

__all__ = ["lineage"]


@click.command(short_help="Where a version or run came from; what it built.")
@click.argument("key")
@click.option("--format", "fmt", type=click.Choice(["tree", "mermaid", "dot", "svg", "json"]),
              default=None, help="Output format [default: from -o's extension (.svg, .dot, "
                                 ".mmd/.mermaid, .json), else tree].")
@click.option("--depth", type=click.IntRange(min=0), default=None, help="Max edges away.")
@click.option("--up", is_flag=True, help="Only where KEY came from.")
@click.option("--down", is_flag=True, help="Only what was built from KEY.")
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write to this file instead of stdout (any format).")
@root_option
def lineage(key: str, fmt: str | None, depth: int | None, up: bool, down: bool,
            output: Path | None, root: Path | None) -> None:
    """Show where KEY (an artifact key, or run:<id or unique prefix>) came from and what was
    built from it."""
    from ..lineage import LineageTracker

    if up and down:
        raise InvalidArgumentError("--up and --down are exclusive; leave both off to see both "
                                   "directions", argument="direction")
    direction = "up" if up else "down" if down else None
    if output is not None:
        _check_writable(output, store_root(root))
    fmt = fmt or _SUFFIX_FORMATS.get(output.suffix.lower() if output else "", "tree")
    with open_registry(root) as registry:
        node = _node_id(registry, key)
        focused = LineageTracker.from_registry(registry, around=node, depth=depth,
                                               direction=direction)
    text = _render(focused, node, fmt, direction, to_file=output is not None)
    if output is None:
        click.echo(text, nl=not text.endswith("\n"))
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InvalidArgumentError(f"cannot write {output}: {exc.strerror or exc}",
                                   argument="output") from exc
    click.echo(f"wrote {output}", err=True)


_SUFFIX_FORMATS = {".svg": "svg", ".dot": "dot", ".gv": "dot", ".mmd": "mermaid",
                   ".mermaid": "mermaid", ".json": "json"}


def _check_writable(output: Path, root: Path) -> None:
    """Refuse an unusable ``-o`` before reading the registry (validate before I/O), and any
    path inside the store: ``-o registry.sqlite`` would destroy what recover cannot rebuild."""
    inside = output.resolve()
    if inside == root.resolve() or root.resolve() in inside.parents:
        raise InvalidArgumentError(f"cannot write {output}: it is inside the store {root}; "
                                   "write the picture somewhere else", argument="output")
    parent = output.absolute().parent
    if not parent.is_dir():
        raise InvalidArgumentError(f"cannot write {output}: directory {parent} does not exist",
                                   argument="output")
    if output.is_dir():
        raise InvalidArgumentError(f"cannot write {output}: it is a directory",
                                   argument="output")


def _node_id(registry: Registry, key: str) -> str:
    """The graph id of KEY: ``run:<full id>`` for a run (prefixes resolved), else the
    version's qualified key. An artifact may be called ``run`` (``run:v1`` is then its
    version 1); when no run matches, that reading is tried, and the run's error is kept."""
    if key.startswith("run:"):
        try:
            return f"run:{registry.resolve_run_id(key.removeprefix('run:'))}"
        except (ArtifactNotFoundError, InvalidArgumentError) as no_run:
            try:
                return registry.resolve(parse_key(key), anywhere=True).key
            except (ArtifactNotFoundError, InvalidNameError):
                raise no_run from None
    return registry.resolve(parse_key(key), anywhere=True).key


def _render(focused: Any, node: str, fmt: str, direction: str | None, *, to_file: bool) -> str:
    from ..lineage import render_svg

    if fmt == "tree":
        return _tree_text(_lineage_tree(focused, node, direction), plain=to_file)
    if fmt == "json":
        up = focused.get_ancestors(node) if direction != "down" else set()
        down = focused.get_descendants(node) if direction != "up" else set()
        return json.dumps({"node": node, "ancestors": sorted(up),
                           "descendants": sorted(down)}, indent=2)
    exporters: dict[str, Callable[[], str]] = {
        "mermaid": focused.export_to_mermaid,
        "dot": focused.export_to_dot,
        "svg": lambda: render_svg(focused),
    }
    return exporters[fmt]()


def _tree_text(tree: Any, *, plain: bool) -> str:
    """The tree as text: styled for a terminal, plain for a file or a pipe."""
    out = console()
    if plain:
        from rich.console import Console

        out = Console(width=160, no_color=True, color_system=None, highlight=False)
    with out.capture() as captured:
        out.print(tree)
    return captured.get()


def _lineage_tree(tracker: Any, root_id: str, direction: str | None) -> Any:
    """A rich Tree: upstream under "came from", downstream under "built into"; a heading
    with nothing under it is left out."""
    from rich.tree import Tree

    tree = Tree(f"[bold]{markup_safe(root_id)}[/bold]")
    graph = tracker.graph
    if direction != "down" and any(True for _ in graph.predecessors(root_id)):
        _grow(tree.add("[cyan]came from[/cyan]"), graph.predecessors, root_id)
    if direction != "up" and any(True for _ in graph.successors(root_id)):
        _grow(tree.add("[green]built into[/green]"), graph.successors, root_id)
    if not tree.children:
        tree.add("[dim](no lineage recorded)[/dim]")
    return tree


def _grow(branch: Any, neighbours: Callable[[str], Iterator[str]], start: str) -> None:
    """Depth-first, iterative (no recursion limit); a node seen before is printed once."""
    seen = {start}
    stack = [(branch, n) for n in sorted(neighbours(start), reverse=True)]
    while stack:
        parent, node = stack.pop()
        if node in seen:
            parent.add(f"{markup_safe(node)} [dim](see above)[/dim]")
            continue
        seen.add(node)
        child = parent.add(markup_safe(node))
        stack.extend((child, n) for n in sorted(neighbours(node), reverse=True))
