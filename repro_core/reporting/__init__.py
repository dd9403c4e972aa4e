"""``repro report``: one self-contained HTML file about one or more runs — header, metric
plots (runs overlaid), TTRL updates with checkpoints marked, hardware, the lineage picture,
``repro diff`` for two runs, artifacts, config and environment.

Importing this package is cheap: numpy, networkx and plotly are imported when a report is
made, never by ``import repro_core``. Modules, each importing only those below it::

    api           report(), render_report(): checks, then read -> draw -> write
    page          the HTML document: CSS, loader script, sections in order
    sections      header cards, notices, tables, config/environment (HTML-escaped)
    diff_html     repro diff's result, highlighted
    figures       Plotly figure specs from the records
    plotly_js     the plotly.js bundle from the optional `plotly` package ([report] extra)
    lineage_view  the inputs/outputs graph, drawn by repro_core.lineage.render_svg
    collect       store -> RunData (read-only; unreadable parts become notes)
    ttrl_data     online updates, checkpoint positions, updates -> checkpoint table
    downsample    min/max per bucket, so spikes survive (numpy)
    records       the dataclasses passed between them
    units         sizes, durations, numbers as text
"""

from .api import render_report, report

__all__ = ["render_report", "report"]
