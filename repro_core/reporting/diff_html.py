"""The ``repro diff`` of two runs as HTML: each section (config, packages, git, CUDA, GPU,
determinism, seeds) with its changed / added / removed keys highlighted, and the final
metrics side by side, differing ones marked.

The comparison itself is :func:`repro_core.diff.diff_runs`, unchanged: the page shows what
``repro diff`` says, so the two can never disagree.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .sections import esc, table

__all__ = ["SECTIONS", "diff_html"]

SECTIONS = ("config", "packages", "git", "cuda", "gpu", "determinism", "seeds")


def diff_html(result: dict[str, Any]) -> str:
    a, b = result["runs"]["a"], result["runs"]["b"]
    head = (f'<p><span class="tag a">a</span> {esc(a["name"])} <code>{esc(a["id"])}</code> '
            f'&nbsp; <span class="tag b">b</span> {esc(b["name"])} <code>{esc(b["id"])}'
            "</code></p>")
    parts = [head]
    for section in SECTIONS:
        parts.append(_section(section, result.get(section)))
    parts.append(_metrics(result.get("metrics") or {}))
    return "".join(parts)


def _section(name: str, change: dict[str, Any] | None) -> str:
    if not isinstance(change, dict):
        return ""
    captured = change.get("captured", {})
    missing = [side for side in ("a", "b") if not captured.get(side)]
    if missing:
        where = "either run" if len(missing) == 2 else f"run {missing[0]}"
        return (f'<h3>{esc(name)} <span class="muted">not captured in {where}</span></h3>')
    rows = [[f'<span class="chg">~</span> <code>{esc(k)}</code>', _value(v[0]), _value(v[1])]
            for k, v in change.get("changed", {}).items()]
    rows += [[f'<span class="add">+</span> <code>{esc(k)}</code>', "", _value(v)]
             for k, v in change.get("added", {}).items()]
    rows += [[f'<span class="del">-</span> <code>{esc(k)}</code>', _value(v), ""]
             for k, v in change.get("removed", {}).items()]
    if not rows:
        return f'<h3>{esc(name)} <span class="badge st-ok">same</span></h3>'
    status = f'<span class="badge st-warn">{len(rows)} difference(s)</span>'
    body = table(("key", "a", "b"), rows, cls="diff")
    if len(rows) > 20:  # a package list can differ in hundreds of lines: fold it
        return f"<details><summary>{esc(name)} {status}</summary>{body}</details>"
    return f"<h3>{esc(name)} {status}</h3>{body}"


def _metrics(metrics: dict[str, Any]) -> str:
    if not metrics:
        return ""
    rows = []
    for key, (left, right) in metrics.items():
        cls = "" if _same(left, right) else ' class="differs"'
        rows.append([f"<code{cls}>{esc(key)}</code>", _value(left), _value(right)])
    return "<h3>final metrics</h3>" + table(("metric", "a", "b"), rows, cls="diff")


def _same(left: Any, right: Any) -> bool:
    if isinstance(left, float) and isinstance(right, float) and math.isnan(left) \
            and math.isnan(right):
        return True
    return bool(left == right)


def _value(value: Any) -> str:
    if value is None:
        return '<span class="muted">-</span>'
    if isinstance(value, float) and not math.isfinite(value):
        return esc(str(value))
    return f"<code>{esc(json.dumps(value, default=str))}</code>"
