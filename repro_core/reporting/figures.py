"""The report's plots as Plotly figure specs (plain dicts: ``{"data", "layout"}``), drawn in
the browser by the plotly.js bundled into the page.

Building the dicts directly, rather than through ``plotly.graph_objects``, is what plotly.js
itself takes and is ~4x faster to make; arrays go in Plotly's binary form
(``{"dtype": "f8", "bdata": base64}``), which keeps NaN (a gap) exactly and costs 11 bytes a
value instead of ~20 as JSON text. Every series is min/max-downsampled to a few thousand
points first (:mod:`.downsample`): spikes survive, and a 1 M-point run stays a few hundred kB.

One figure per metric name; each run is one trace in it (runs overlaid, aligned by step), in
the run's colour throughout the report. Non-finite values break the line and get ✕ markers.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

import numpy as np

from .downsample import MAX_POINTS, gap_markers, minmax_downsample
from .records import CheckpointMark, RunData, Series

__all__ = ["PALETTE", "Figure", "color", "hardware_figures", "metric_figures", "trace_points",
           "ttrl_figures"]

# Plotly's / D3's category10: the colours people already read as "run 1, run 2, …".
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
_GAP_COLOR = "#d62728"
_MARKERS_UP_TO = 60  # a series this short is drawn with markers (one point has no line)
# Points in all traces of a page, shared out evenly: 10 series get 3,000 points each, 1,000
# series 300 each (never fewer), so a run with thousands of names stays a few MB too.
_PAGE_POINTS = 600_000
_MIN_TRACE_POINTS = 300
_LABELLED_CHECKPOINTS = 25  # more checkpoint names than this overlap: hover shows them
_GPU = re.compile(r"^gpu(\d+)/(.+)$")


@dataclass
class Figure:
    """One plot: a title, the Plotly spec and a caption (non-finite counts; may be empty)."""

    title: str
    spec: dict[str, object]
    caption: str = ""


def color(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def metric_figures(runs: list[RunData]) -> list[Figure]:
    """One figure per training metric name (every series), runs overlaid by step."""
    names = sorted({k for data in runs for k in data.metrics})
    budget = trace_points(sum(len(data.metrics) for data in runs))
    return [_figure(name, "step", [(i, data.label, data.metrics.get(name))
                                   for i, data in enumerate(runs)], budget)
            for name in names]


def trace_points(traces: int) -> int:
    """Points one trace may keep when a page has ``traces`` of them (see ``_PAGE_POINTS``)."""
    return max(_MIN_TRACE_POINTS, min(MAX_POINTS, _PAGE_POINTS // max(traces, 1)))


def hardware_figures(runs: list[RunData]) -> list[Figure]:
    """Monitor samples over seconds since each run started: one figure per measurement,
    each GPU of each run a trace (``gpu0/power_watts`` → figure ``gpu power_watts``)."""
    groups: dict[str, list[tuple[int, str, Series | None]]] = {}
    for i, data in enumerate(runs):
        for key, series in sorted(data.hardware.items()):
            match = _GPU.match(key)
            title, name = (f"gpu {match[2]}", f"{data.label} gpu{match[1]}") if match \
                else (key, data.label)
            groups.setdefault(title, []).append((i, name, series))
    figures = []
    for title in sorted(groups):
        traces = groups[title]
        if title.endswith("_bytes"):  # bytes as MiB: "3.2e9" reads worse than "3052"
            title = f"{title.removesuffix('_bytes')} (MiB)"
            traces = [(i, n, Series(s.x, s.y / 2**20)) for i, n, s in traces if s is not None]
        figures.append(_figure(title, "seconds since the run started", traces,
                               trace_points(sum(len(data.hardware) for data in runs))))
    return figures


def ttrl_figures(runs: list[RunData]) -> list[Figure]:
    """Reward, confidence and KL over the update number, checkpoints marked: a dotted line
    where each was logged, and a ▼ on top naming it (hover for the key)."""
    figures = []
    for name, attribute in (("reward", "reward"), ("confidence", "confidence"),
                            ("KL divergence", "kl")):
        traces = [(i, data.label, getattr(data.ttrl, attribute))
                  for i, data in enumerate(runs) if data.ttrl is not None]
        figure = _figure(f"online {name}", "online update", traces)
        marks = [(i, data.label, data.ttrl.checkpoints) for i, data in enumerate(runs)
                 if data.ttrl is not None and data.ttrl.checkpoints]
        _add_checkpoints(figure.spec, marks)
        figures.append(figure)
    return figures


# -- building blocks --------------------------------------------------------------------------


def _figure(title: str, x_title: str, traces: list[tuple[int, str, Series | None]],
            max_points: int = MAX_POINTS) -> Figure:
    data: list[dict[str, object]] = []
    notes = []
    for index, name, series in traces:
        if series is None or len(series.y) == 0:
            continue
        data.append(_line(index, name, series, max_points))
        if series.nonfinite:
            gx, gy = gap_markers(series.x, series.y)
            data.append({"type": "scatter", "mode": "markers", "name": _text(f"{name}: NaN/inf"),
                         "x": _array(gx), "y": _array(gy), "legendgroup": _text(name),
                         "marker": {"symbol": "x", "size": 8, "color": _GAP_COLOR},
                         "hovertemplate": "%{x}: NaN/inf<extra>%{fullData.name}</extra>"})
            notes.append(f"{name}: {series.nonfinite} NaN/inf value(s), drawn as gaps (✕)")
    layout = {
        "title": {"text": _text(title), "x": 0.01, "font": {"size": 14}},
        "xaxis": {"title": {"text": x_title}, "zeroline": False},
        "yaxis": {"zeroline": False, "exponentformat": "SI"},
        "height": 330, "margin": {"l": 60, "r": 20, "t": 36, "b": 84},
        "hovermode": "x", "showlegend": True,  # below the x axis title, never over it:
        "legend": {"orientation": "h", "y": -0.3, "yanchor": "top", "font": {"size": 11}},
        "paper_bgcolor": "#ffffff", "plot_bgcolor": "#ffffff",
    }
    layout["xaxis"]["gridcolor"] = layout["yaxis"]["gridcolor"] = "#e8e8e8"  # type: ignore[index]
    return Figure(title=title, spec={"data": data, "layout": layout}, caption="; ".join(notes))


def _line(index: int, name: str, series: Series, max_points: int) -> dict[str, object]:
    x, y = minmax_downsample(series.x, series.y, max_points)
    mode = "lines+markers" if len(series.y) <= _MARKERS_UP_TO else "lines"
    return {"type": "scatter", "mode": mode, "name": _text(name), "legendgroup": _text(name),
            "x": _array(x), "y": _array(y), "connectgaps": False,
            "line": {"color": color(index), "width": 1.5},
            "marker": {"color": color(index), "size": 4}}


def _add_checkpoints(spec: dict[str, object],
                     marks: list[tuple[int, str, list[CheckpointMark]]]) -> None:
    """Dotted lines (layout shapes) at each checkpoint, and a ▼ trace on a second y axis
    pinned to [0, 1] so the markers sit at the top whatever the data's range."""
    layout = spec["layout"]
    assert isinstance(layout, dict)
    data = spec["data"]
    assert isinstance(data, list)
    shapes = []
    for index, name, checkpoints in marks:
        labelled = len(checkpoints) <= _LABELLED_CHECKPOINTS
        shapes += [{"type": "line", "xref": "x", "yref": "paper", "x0": m.position,
                    "x1": m.position, "y0": 0, "y1": 1, "opacity": 1.0 if labelled else 0.35,
                    "line": {"color": color(index), "width": 1, "dash": "dot"}}
                   for m in checkpoints]
        data.append({
            "type": "scatter", "mode": "markers+text" if labelled else "markers",
            "name": _text(f"{name}: checkpoints"), "yaxis": "y2", "cliponaxis": False,
            "x": [m.position for m in checkpoints], "y": [1.0] * len(checkpoints),
            "text": [_text(m.key.rpartition("/")[2]) for m in checkpoints],
            "customdata": [_text(m.key) for m in checkpoints], "textposition": "top center",
            "textfont": {"size": 9, "color": color(index)},
            "marker": {"symbol": "triangle-down", "size": 9, "color": color(index)},
            "hovertemplate": "%{customdata} after update %{x:.0f}<extra></extra>"})
    layout["shapes"] = shapes
    layout["yaxis2"] = {"overlaying": "y", "range": [0, 1.12], "visible": False,
                        "fixedrange": True}
    layout["margin"] = {"l": 60, "r": 20, "t": 52, "b": 84}


def _text(text: str) -> str:
    """Names from the store as Plotly shows them: Plotly reads ``<b>``, ``<a href>`` … in
    every label as markup, so a run called ``<a href=…>`` would become a link; as entities
    (which Plotly decodes) the name is shown exactly as stored."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _array(values: np.ndarray) -> dict[str, str]:
    """Plotly's binary array form: little-endian float64 (or int32 when every value fits,
    as steps usually do), base64. Int64 has no plotly.js type."""
    array = np.asarray(values)
    if array.dtype.kind in "iu" and (len(array) == 0 or (
            int(array.min()) >= -(2**31) and int(array.max()) < 2**31)):
        return {"dtype": "i4", "bdata": base64.b64encode(array.astype("<i4").tobytes()).decode()}
    return {"dtype": "f8", "bdata": base64.b64encode(array.astype("<f8").tobytes()).decode()}
