"""The plotly.js bundle, taken from the optional ``plotly`` package and inlined into the page.

Inlined, not linked from a CDN: a report must open with no network (a ticket attachment, a
paper's supplement, an air-gapped cluster) and keep working when a CDN URL changes. The
``plotly`` Python package ships the full minified bundle (~4.8 MB); its smaller partial
bundles exist only on npm, so the full one is what ``pip install`` can provide everywhere.

``plotly`` is imported here, when a report is made, never by ``import repro_core``.
"""

from __future__ import annotations

import functools
import re

__all__ = ["plotly_bundle", "plotly_version"]

_EXTRA = "report"
_SCRIPT_END = re.compile(r"</(script)", re.IGNORECASE)


def _get_plotlyjs() -> str:
    try:
        from plotly.offline import get_plotlyjs
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            "repro report draws its plots with Plotly, which is not installed: "
            f"pip install 'repro-lightning[{_EXTRA}]' (or: pip install plotly)",
            name="plotly") from exc
    return str(get_plotlyjs())


@functools.lru_cache(maxsize=1)
def plotly_bundle() -> str:
    """plotly.js, safe inside an inline ``<script>``: a ``</script`` in the bundle's text
    would end the element early, so it is written ``<\\/script`` (the same string to JS).
    Read once per process (4.8 MB)."""
    return _SCRIPT_END.sub(r"<\\/\1", _get_plotlyjs())


def plotly_version() -> str:
    """The bundled plotly.js version (from its banner), for the report's footer."""
    match = re.search(r"plotly\.js v([\w.\-]+)", plotly_bundle()[:500])
    return match[1] if match else "unknown"
