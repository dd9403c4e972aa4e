"""Pictures of a lineage graph: Graphviz DOT, Mermaid, and SVG.

Every format escapes whatever users put in names: the original emitted invalid Mermaid and did
not escape quotes in DOT, so one artifact named ``say "hi"`` broke the whole diagram.

- **DOT**: ``digraph lineage {`` laid out left to right (``rankdir=LR``, as the seed's export
  was, so code that post-processes it keeps working); ids and labels always double-quoted;
  ``\\`` and ``"`` escaped, newlines as ``\\n``.
- **Mermaid**: node ids are ``n0, n1, …`` (Mermaid ids must be plain words), labels are quoted
  and every character Mermaid gives meaning to is written as an entity code (``#quot;``,
  ``#58;`` …).
- **SVG**: graphviz ``dot -Tsvg`` when installed, else a dependency-free layered layout —
  longest-path layers from ``topological_generations`` with back edges of cycles reversed
  (chosen by a DFS in sorted order, so the picture is deterministic) and a barycenter pass to
  reduce crossings. Text is XML-escaped and characters XML 1.0 forbids are replaced. (With
  graphviz the picture follows the DOT export, left to right; the built-in layout stacks
  layers top to bottom.)

Every function takes a :class:`~repro_core.lineage.nodes.GraphView` (a ``LineageTracker`` is
one), so this module imports only ``nodes`` and the tracker can import it at the top.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape as _xml_escape

import networkx as nx

from .. import _fsio
from ..errors import InvalidArgumentError, ReproError
from .nodes import RUN_KIND, GraphView, LineageNode

__all__ = ["render_svg", "to_dot", "to_mermaid"]

_TYPE_COLORS = {
    "dataset": "#8ecae6", "model": "#ffb703", "checkpoint": "#f4a261", "config": "#cdb4db",
    "metrics": "#b7e4c7", "evaluation": "#95d5b2", "environment": "#e9edc9", "code": "#d8e2dc",
    "experience": "#ffc8dd",
}
_EXTRA_COLORS = ("#a8dadc", "#f1c0e8", "#fde4cf", "#cfbaf0", "#b9fbc0", "#fbf8cc", "#90dbf4")
_RUN_COLOR = "#eeeeee"
_MISSING_COLOR = "#ffffff"

# -- labels -----------------------------------------------------------------------------------


def label_lines(node_id: str, node: LineageNode | None) -> list[str]:
    """What a box says: ``name:version`` and type; a run's name and id; a dangling id."""
    if node is None:
        return [node_id, "(missing)"]
    if node.kind == RUN_KIND:
        return [f"run {node.artifact_name}", (node.run_id or node_id)[:12]]
    return [f"{node.artifact_name}:{node.version}", node.artifact_type]


def fill_color(node: LineageNode | None) -> str:
    """Stable colour per type (crc32, not ``hash()``, which changes between processes)."""
    if node is None:
        return _MISSING_COLOR
    if node.kind == RUN_KIND:
        return _RUN_COLOR
    known = _TYPE_COLORS.get(node.artifact_type.lower())
    if known is not None:
        return known
    return _EXTRA_COLORS[zlib.crc32(node.artifact_type.encode("utf-8")) % len(_EXTRA_COLORS)]


# -- DOT --------------------------------------------------------------------------------------


def dot_quote(text: str) -> str:
    r"""``"…"`` with ``\`` and ``"`` escaped and line breaks as ``\n`` (NUL dropped)."""
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\x00", "")
    return '"' + text.replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n") + '"'


def to_dot(tracker: GraphView) -> str:
    """DOT text: one statement per line, nodes in insertion order, then edges."""
    lines = [
        "digraph lineage {",
        "  rankdir=LR;",  # the seed's layout: causes on the left, what they became on the right
        '  node [fontname="Helvetica", fontsize=10];',
        '  edge [color="#555555"];',
    ]
    for node_id in tracker.graph.nodes:
        node = tracker.nodes.get(node_id)
        lines.append(f"  {dot_quote(node_id)} [{_dot_attributes(node_id, node)}];")
    lines.extend(f"  {dot_quote(u)} -> {dot_quote(v)};" for u, v in tracker.graph.edges)
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_attributes(node_id: str, node: LineageNode | None) -> str:
    # Join already-escaped lines with DOT's own line break, so user text cannot inject one.
    label = '"' + "\\n".join(dot_quote(line)[1:-1] for line in label_lines(node_id, node)) + '"'
    if node is None:
        shape, style = "box", '"dashed"'
    elif node.kind == RUN_KIND:
        shape, style = "ellipse", '"filled"'
    else:
        shape, style = "box", '"rounded,filled"'
    return (f'label={label}, shape={shape}, style={style}, '
            f'fillcolor="{fill_color(node)}"')


# -- Mermaid ----------------------------------------------------------------------------------

_MERMAID_ENTITIES = {
    '"': "#quot;", "#": "#35;", "&": "#amp;", "<": "#lt;", ">": "#gt;", "[": "#91;",
    "]": "#93;", "(": "#40;", ")": "#41;", "{": "#123;", "}": "#125;", "|": "#124;",
    ":": "#58;", ";": "#59;", "`": "#96;",
}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def mermaid_text(text: str) -> str:
    """Escape one label line: Mermaid entity codes for every character with a meaning."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    escaped = "".join(_MERMAID_ENTITIES.get(char, char) for char in text)
    return escaped.replace("\n", "<br/>")


def to_mermaid(tracker: GraphView) -> str:
    """``flowchart TD`` text: boxes for artifacts, stadiums for runs, dashed missing refs."""
    ids = {node_id: f"n{i}" for i, node_id in enumerate(tracker.graph.nodes)}
    lines = ["flowchart TD"]
    for node_id, short in ids.items():
        node = tracker.nodes.get(node_id)
        label = "<br/>".join(mermaid_text(line) for line in label_lines(node_id, node))
        shape = '(["{}"])' if node is not None and node.kind == RUN_KIND else '["{}"]'
        lines.append(f"    {short}{shape.format(label)}")
    lines.extend(f"    {ids[u]} --> {ids[v]}" for u, v in tracker.graph.edges)
    lines.extend(_mermaid_classes(tracker, ids))
    return "\n".join(lines) + "\n"


def _mermaid_classes(tracker: GraphView, ids: dict[str, str]) -> Iterator[str]:
    """One ``classDef`` per colour (class names ``c0, c1, …``, so any type string is safe)."""
    groups: dict[tuple[str, bool], list[str]] = {}
    for node_id, short in ids.items():
        node = tracker.nodes.get(node_id)
        groups.setdefault((fill_color(node), node is None), []).append(short)
    for i, ((color, missing), members) in enumerate(sorted(groups.items())):
        dashed = ",stroke-dasharray:4" if missing else ""
        yield f"    classDef c{i} fill:{color},stroke:#333333,color:#000000{dashed}"
        yield f"    class {','.join(members)} c{i}"


# -- SVG --------------------------------------------------------------------------------------


def render_svg(tracker: GraphView, output_path: Path | None = None, *,
               engine: str = "auto") -> str:
    """SVG text of the graph (written to ``output_path`` too when given).

    ``engine``: ``"dot"`` (graphviz, must be on PATH), ``"python"`` (built-in layout,
    deterministic, no dependency) or ``"auto"`` (dot when installed).
    """
    if engine not in ("auto", "dot", "python"):
        raise InvalidArgumentError(
            f"engine must be 'auto', 'dot' or 'python', got {engine!r}", argument="engine"
        )
    dot = shutil.which("dot")
    if engine == "dot" and dot is None:
        raise InvalidArgumentError(
            "engine='dot' needs graphviz's `dot` on PATH; install graphviz (e.g. apt install "
            "graphviz) or use engine='python'",
            argument="engine",
        )
    use_dot = dot is not None and engine != "python"
    svg = _svg_with_dot(dot, tracker) if use_dot and dot else _svg_python(tracker)
    if output_path is not None:
        _fsio.write_file_atomic(Path(output_path), svg.encode("utf-8"))
    return svg


def _svg_with_dot(dot: str, tracker: GraphView) -> str:
    try:
        done = subprocess.run([dot, "-Tsvg"], input=to_dot(tracker).encode("utf-8"),
                              capture_output=True, check=False, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ReproError(f"graphviz dot could not run: {exc}; try engine='python'") from exc
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace")[:500]
        raise ReproError(f"graphviz dot failed ({done.returncode}): {message}; "
                         "try engine='python'")
    return done.stdout.decode("utf-8")


_CHAR_W, _LINE_H, _PAD, _GAP_X, _GAP_Y, _MARGIN = 7.0, 16.0, 10.0, 24.0, 48.0, 20.0
_INVALID_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(text: str) -> str:
    """Escape for XML text and attributes; characters XML 1.0 forbids become U+FFFD."""
    return _xml_escape(_INVALID_XML.sub("\ufffd", text), {'"': "&quot;"})


@dataclass
class _Box:
    x: float
    y: float
    w: float
    h: float
    lines: list[str]

    @property
    def cx(self) -> float:
        return self.x + self.w / 2


def back_edges(graph: nx.DiGraph) -> set[tuple[str, str]]:
    """Edges closing a cycle, found by an iterative DFS from sources first, ids sorted."""
    if nx.is_directed_acyclic_graph(graph):
        return set()
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: finished
    back: set[tuple[str, str]] = set()
    roots = sorted(graph.nodes, key=lambda n: (graph.in_degree(n) > 0, n))
    for root in roots:
        if root in state:
            continue
        state[root] = 1
        stack = [(root, iter(sorted(graph.successors(root))))]
        while stack:
            node, children = stack[-1]
            for child in children:
                if child not in state:
                    state[child] = 1
                    stack.append((child, iter(sorted(graph.successors(child)))))
                    break
                if state[child] == 1 and child != node:
                    back.add((node, child))
            else:
                state[node] = 2
                stack.pop()
    return back


def layers(graph: nx.DiGraph, reversed_edges: set[tuple[str, str]]) -> list[list[str]]:
    """Longest-path layers of the graph made acyclic, each ordered by barycenter of parents."""
    dag = nx.DiGraph()
    dag.add_nodes_from(graph.nodes)
    dag.add_edges_from((v, u) if (u, v) in reversed_edges else (u, v)
                       for u, v in graph.edges if u != v)
    result = [sorted(generation) for generation in nx.topological_generations(dag)]
    position: dict[str, int] = {}
    for index, layer in enumerate(result):
        if index:
            layer.sort(key=lambda n: (_barycenter(dag, n, position), n))
        position.update((n, i) for i, n in enumerate(layer))
    return result


def _barycenter(dag: nx.DiGraph, node: str, position: dict[str, int]) -> float:
    parents = [position[p] for p in dag.predecessors(node)]
    return sum(parents) / len(parents) if parents else 0.0


def _place(tracker: GraphView, ordered: list[list[str]]) -> tuple[dict[str, _Box], float]:
    boxes: dict[str, _Box] = {}
    rows: list[list[_Box]] = []
    y = _MARGIN
    for layer in ordered:
        row = []
        for node_id in layer:
            lines = [part for line in label_lines(node_id, tracker.nodes.get(node_id))
                     for part in (line.splitlines() or [""])]
            w = max(80.0, max(len(t) for t in lines) * _CHAR_W + 2 * _PAD)
            boxes[node_id] = box = _Box(0.0, y, w, len(lines) * _LINE_H + _PAD, lines)
            row.append(box)
        rows.append(row)
        y += max(b.h for b in row) + _GAP_Y
    widths = [sum(b.w for b in row) + _GAP_X * (len(row) - 1) for row in rows]
    width = max(widths, default=0.0) + 2 * _MARGIN
    for row, row_width in zip(rows, widths, strict=True):
        x = (width - row_width) / 2
        for box in row:
            box.x, x = x, x + box.w + _GAP_X
    return boxes, width


def _svg_python(tracker: GraphView) -> str:
    reversed_edges = back_edges(tracker.graph)
    boxes, width = _place(tracker, layers(tracker.graph, reversed_edges))
    height = max((b.y + b.h for b in boxes.values()), default=0.0) + _MARGIN
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif" '
        'font-size="12">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
        'markerHeight="8" orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" '
        'fill="#555555"/></marker></defs>',
        f'<rect width="{width:.0f}" height="{height:.0f}" fill="#ffffff"/>',
    ]
    for u, v in tracker.graph.edges:
        parts.append(_svg_edge(u, v, boxes[u], boxes[v], (u, v) in reversed_edges))
    for node_id, box in boxes.items():
        parts.append(_svg_node(node_id, tracker.nodes.get(node_id), box))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _svg_edge(u: str, v: str, a: _Box, b: _Box, reversed_edge: bool) -> str:
    if u == v:  # self-loop: a small arc on the right side of the box
        x, y = a.x + a.w, a.y + a.h / 2
        d = f"M{x:.1f},{y - 6:.1f} C{x + 30:.1f},{y - 20:.1f} {x + 30:.1f},{y + 20:.1f} " \
            f"{x:.1f},{y + 6:.1f}"
    else:
        down = b.y > a.y
        y1 = a.y + a.h if down else a.y
        y2 = b.y if down else b.y + b.h
        mid = (y1 + y2) / 2
        d = f"M{a.cx:.1f},{y1:.1f} C{a.cx:.1f},{mid:.1f} {b.cx:.1f},{mid:.1f} {b.cx:.1f},{y2:.1f}"
    dash = ' stroke-dasharray="5,4"' if reversed_edge or u == v else ""
    return (f'<g class="edge"><title>{xml_text(u)} -&gt; {xml_text(v)}</title>'
            f'<path d="{d}" fill="none" stroke="#555555"{dash} marker-end="url(#arrow)"/></g>')


def _svg_node(node_id: str, node: LineageNode | None, box: _Box) -> str:
    fill = fill_color(node)
    if node is not None and node.kind == RUN_KIND:
        shape = (f'<ellipse cx="{box.cx:.1f}" cy="{box.y + box.h / 2:.1f}" rx="{box.w / 2:.1f}" '
                 f'ry="{box.h / 2:.1f}" fill="{fill}" stroke="#333333"/>')
    else:
        dash = ' stroke-dasharray="5,4"' if node is None else ""
        shape = (f'<rect x="{box.x:.1f}" y="{box.y:.1f}" width="{box.w:.1f}" '
                 f'height="{box.h:.1f}" rx="8" ry="8" fill="{fill}" stroke="#333333"{dash}/>')
    texts = "".join(
        f'<text x="{box.cx:.1f}" y="{box.y + _PAD / 2 + (i + 0.75) * _LINE_H:.1f}" '
        f'text-anchor="middle">{xml_text(line)}</text>'
        for i, line in enumerate(box.lines)
    )
    return f'<g class="node"><title>{xml_text(node_id)}</title>{shape}{texts}</g>'
