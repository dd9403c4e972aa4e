"""The page: one HTML file holding its CSS, its scripts (plotly.js and a 30-line loader), the
figure specs (JSON) and the lineage SVG — nothing is fetched when it is opened.

Layout::

    header      title, runs, generation time, section links (in-page anchors only)
    notices     still RUNNING, nothing logged, missing blobs, unreadable parts
    run cards   name, id, project, state + history, duration, host, git, command
    metrics     last values, then one plot per metric (runs overlaid by step)
    ttrl        reward / confidence / KL over updates, checkpoints marked; updates table
    hardware    CPU, memory, GPU over seconds since start
    lineage     the inputs and outputs of every run (repro_core.lineage's SVG)
    diff        (two runs) repro diff, highlighted
    artifacts   key, type, size, stored bytes, digest, aliases, status
    config      config and environment, collapsed

Plots are drawn as they scroll into view (an IntersectionObserver): a report with hundreds
of metrics opens at once, and all are drawn before printing. ``window.reproDrawAll()`` draws
every plot now (tests and screenshots use it).
"""

from __future__ import annotations

import json
from datetime import datetime

from .diff_html import diff_html
from .figures import Figure, hardware_figures, metric_figures, ttrl_figures
from .plotly_js import plotly_bundle, plotly_version
from .records import ReportData
from .sections import (
    artifacts_table,
    config_and_environment,
    esc,
    notices,
    run_card,
    summary_table,
    ttrl_table,
)

__all__ = ["render_page"]

_CSS = """
:root{--fg:#1d1d1f;--muted:#6e6e73;--line:#e3e3e8;--bg:#f6f7f9;--card:#fff}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
color:var(--fg);background:var(--bg)}
header.top{background:#1f2933;color:#fff;padding:14px 24px}
header.top h1{margin:0;font-size:20px}
header.top p{margin:4px 0 0;color:#cbd2d9}
header.top nav a{color:#9fd3ff;margin-right:14px;text-decoration:none}
main{max-width:1400px;margin:0 auto;padding:12px 24px 40px}
section.block{margin-top:28px}
h2{font-size:18px;margin:0 0 10px;border-bottom:1px solid var(--line);padding-bottom:4px}
h3{font-size:15px;margin:14px 0 6px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 16px;
margin-top:14px}
.card h2{border:0}
.cols{display:flex;flex-wrap:wrap;gap:24px}.cols>*{flex:1 1 420px;min-width:0}
table{border-collapse:collapse;background:var(--card);font-size:13px;max-width:100%}
th,td{border:1px solid var(--line);padding:4px 8px;text-align:left;vertical-align:top}
thead th{background:#f0f2f5}
table.facts th{background:#f7f8fa;width:7em;white-space:nowrap}
table.facts td{word-break:break-all}
code{font:12px/1.4 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
pre{background:#fbfbfd;border:1px solid var(--line);padding:8px;overflow:auto;max-height:480px}
.muted{color:var(--muted)}
.badge{display:inline-block;border-radius:9px;padding:0 8px;font-size:11px;background:#e4e7eb}
.st-ok{background:#d3f9d8;color:#1b5e20}.st-bad{background:#ffe3e3;color:#a61e1e}
.st-warn{background:#fff3bf;color:#7a4b00}.st-running{background:#d0ebff;color:#0b4f8a}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px;margin-right:8px}
.notice{border-radius:6px;padding:8px 12px;margin-top:10px}
.notice.warn{background:#fff3bf;border:1px solid #f0c36d}
.notice.bad{background:#ffe3e3;border:1px solid #f2a5a5}
.notice ul{margin:4px 0 0}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
figure.plot{margin:0;background:var(--card);border:1px solid var(--line);border-radius:8px;
padding:4px;min-width:0}
.plot-area{height:330px}
figure.plot figcaption{font-size:12px;color:#a61e1e;padding:0 8px 4px}
.lineage{overflow:auto;background:#fff;border:1px solid var(--line);border-radius:8px;
max-height:720px;padding:6px}
.lineage svg{max-width:none;height:auto}
table.diff code.differs{background:#fff3bf}
.chg{color:#b35c00;font-weight:bold}.add{color:#1b7f2a;font-weight:bold}
.del{color:#b21f1f;font-weight:bold}
.tag{display:inline-block;border-radius:4px;padding:0 6px;color:#fff;font-weight:bold}
.tag.a{background:#1f77b4}.tag.b{background:#ff7f0e}
details{margin:6px 0}summary{cursor:pointer}
footer{color:var(--muted);font-size:12px;text-align:center;padding:16px}
#plot-error{display:none}
"""

_LOADER = """
(function () {
  "use strict";
  var figures = JSON.parse(document.getElementById("repro-figures").textContent);
  var config = {displaylogo: false, responsive: true,
                toImageButtonOptions: {format: "svg"}};
  var areas = Array.prototype.slice.call(document.querySelectorAll(".plot-area"));
  function draw(el) {
    if (el.getAttribute("data-drawn")) { return; }
    el.setAttribute("data-drawn", "1");
    var fig = figures[Number(el.getAttribute("data-fig"))];
    Plotly.newPlot(el, fig.data, fig.layout, config);
  }
  window.reproDrawAll = function () { areas.forEach(draw); };
  if (typeof Plotly === "undefined") {
    document.getElementById("plot-error").style.display = "block";
    return;
  }
  if ("IntersectionObserver" in window) {
    var watcher = new IntersectionObserver(function (entries) {
      entries.forEach(function (entry) {
        if (entry.isIntersecting) { watcher.unobserve(entry.target); draw(entry.target); }
      });
    }, {rootMargin: "600px 0px"});
    areas.forEach(function (el) { watcher.observe(el); });
  } else {
    window.reproDrawAll();
  }
  window.addEventListener("beforeprint", window.reproDrawAll);
})();
"""


class _Plots:
    """Collects figure specs; each placed figure is a div the loader fills."""

    def __init__(self) -> None:
        self.specs: list[dict[str, object]] = []

    def grid(self, figures: list[Figure]) -> str:
        cells = []
        for figure in figures:
            index = len(self.specs)
            self.specs.append(figure.spec)
            caption = f"<figcaption>{esc(figure.caption)}</figcaption>" if figure.caption else ""
            cells.append(f'<figure class="plot"><div class="plot-area" data-fig="{index}" '
                         f'role="img" aria-label="{esc(figure.title)}"></div>{caption}</figure>')
        return f'<div class="plots">{"".join(cells)}</div>'

    def json(self) -> str:
        # "</" would end the <script> element: as "<\\/" it is the same JSON string
        text = json.dumps(self.specs, separators=(",", ":"), allow_nan=False)
        return text.replace("</", "<\\/")


def render_page(report: ReportData, *, version: str) -> str:
    """The whole HTML document."""
    runs = report.runs
    plots = _Plots()
    blocks = _blocks(report, plots)
    title = (f"{runs[0].run.name} ({runs[0].run.id[:8]})" if len(runs) == 1
             else f"{len(runs)} runs")
    nav = "".join(f'<a href="#{key}">{esc(name)}</a>' for key, name, _ in blocks)
    generated = _utc(report.generated_at)
    cards = "".join(run_card(data, i) for i, data in enumerate(runs))
    return "".join([
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>repro report: {esc(title)}</title>",
        f'<meta name="generator" content="repro {esc(version)}">',
        f"<style>{_CSS}</style></head><body>",
        f'<header class="top"><h1>repro report: {esc(title)}</h1>',
        f"<p>{len(runs)} run(s) · generated {generated}</p><nav>{nav}</nav></header><main>",
        '<div id="plot-error" class="notice bad">the plotting script did not load: plots '
        "cannot be shown (the tables below are complete)</div>",
        "".join(notices(data) for data in runs), cards,
        *(f'<section class="block" id="{key}"><h2>{esc(_HEADINGS[key][1])}</h2>{body}'
          "</section>" for key, _, body in blocks),
        "</main>",
        f"<footer>made by repro {esc(version)} · plots: plotly.js "
        f"{esc(plotly_version())}</footer>",
        f'<script type="application/json" id="repro-figures">{plots.json()}</script>',
        f"<script>{plotly_bundle()}</script>",
        f"<script>{_LOADER}</script></body></html>\n",
    ])


# section key -> (link text, heading)
_HEADINGS = {
    "metrics": ("metrics", "Metrics"), "ttrl": ("TTRL", "Test-time RL: online updates"),
    "hardware": ("hardware", "Hardware"), "lineage": ("lineage", "Lineage: inputs and outputs"),
    "diff": ("diff", "What differs (repro diff)"), "artifacts": ("artifacts", "Artifacts"),
    "config": ("config", "Config and environment"),
}


def _blocks(report: ReportData, plots: _Plots) -> list[tuple[str, str, str]]:
    """``(key, link text, body)`` of each section the report has, in page order."""
    runs = report.runs
    bodies = {"metrics": _metrics(report, plots)}
    if any(data.ttrl is not None for data in runs):
        bodies["ttrl"] = (plots.grid(ttrl_figures(runs))
                          + "".join(ttrl_table(data) for data in runs))
    hardware = hardware_figures(runs)
    bodies["hardware"] = (plots.grid(hardware) if hardware else
                          '<p class="muted">no hardware samples recorded</p>')
    bodies["lineage"] = _lineage(report)
    if len(runs) == 2:
        bodies["diff"] = _diff(report)
    bodies["artifacts"] = "".join(f"<h3>{esc(data.label)}</h3>{artifacts_table(data)}"
                                  for data in runs)
    bodies["config"] = "".join(config_and_environment(data) for data in runs)
    return [(key, _HEADINGS[key][0], body) for key, body in bodies.items()]


def _utc(iso: str) -> str:
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S UTC")
    except ValueError:
        return iso


def _metrics(report: ReportData, plots: _Plots) -> str:
    figures = metric_figures(report.runs)
    if not figures:
        return '<p class="muted">no metrics logged</p>'
    summary = summary_table(report.runs)
    folded = (f"<details><summary>last values ({len(figures)} metrics)</summary>{summary}"
              "</details>")
    return folded + plots.grid(figures)


def _lineage(report: ReportData) -> str:
    if report.lineage_svg is None:
        return f'<p class="muted">lineage not available: {esc(report.lineage_problem)}</p>'
    return f'<div class="lineage">{report.lineage_svg}</div>'


def _diff(report: ReportData) -> str:
    if report.diff is None:
        return f'<p class="muted">diff not available: {esc(report.diff_problem)}</p>'
    return diff_html(report.diff)
