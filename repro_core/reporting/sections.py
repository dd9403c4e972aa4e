"""HTML of the report's text parts: each run's header card, its notices, the artifacts and
updates -> checkpoint tables, the summary of last values, config and environment.

Every string from the store goes through :func:`esc` (``html.escape``, quotes included):
stores are shared and downloaded, and a run named ``<script>…`` must show as that text, not
run. Nothing here loads anything: no ``src``, no ``href`` but in-page anchors.
"""

from __future__ import annotations

import html
import json
import math
import shlex
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any

from .figures import color
from .records import ArtifactRow, RunData, TTRLData
from .units import fmt_duration, fmt_number, fmt_size, seconds_between

__all__ = ["artifacts_table", "config_and_environment", "esc", "notices", "run_card",
           "summary_table", "table", "ttrl_table"]

_FOLD_ROWS = 20  # a longer table starts folded (<details>), so the plots stay in reach
_STATE_CLASS = {"running": "st-running", "completed": "st-ok", "failed": "st-bad",
                "crashed": "st-bad", "interrupted": "st-warn"}


def esc(value: object) -> str:
    """Text for HTML content or a quoted attribute; control characters shown as escapes (a
    stored ``\\x1b`` or NUL is made visible, never passed to the page)."""
    text = str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() or c in " \n\t" else
                       c.encode("unicode_escape").decode("ascii") for c in text)
    return html.escape(text, quote=True)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, cls: str = "") -> str:
    """A table of already-escaped cells (callers escape: some cells carry markup)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    klass = f' class="{cls}"' if cls else ""
    return f"<table{klass}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def state_badge(state: str) -> str:
    return f'<span class="badge {_STATE_CLASS.get(state, "")}">{esc(state.upper())}</span>'


# -- the run's header card ----------------------------------------------------------------------


def run_card(data: RunData, index: int, now: datetime | None = None) -> str:
    """Name, id, project, state and its history, duration, host, git, command line."""
    run = data.run
    env = data.environment or {}
    facts = [
        ("id", f"<code>{esc(run.id)}</code>"),
        ("project", esc(run.project)),
        ("state", state_badge(run.state)),
        ("started", esc(_utc(run.created_at))),
        ("ended", esc(_utc(run.ended_at)) if run.ended_at else "-"),
        ("duration", esc(_duration(data, now))),
        ("host", esc(run.host or env.get("hostname") or "-")),
        ("git", _git(env.get("git"))),
        ("command", _command(env.get("command"))),
    ]
    if run.tags:
        facts.append(("tags", esc(", ".join(map(str, run.tags)))))
    if run.segment:
        facts.append(("resumed", f"{run.segment} time(s)"))
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in facts)
    history = table(("time (UTC)", "state", "reason"),
                    ([esc(_utc(at)), state_badge(state), esc(reason or "")]
                     for state, at, reason in data.states), cls="compact")
    swatch = f'<span class="swatch" style="background:{color(index)}"></span>'
    return (f'<section class="card" id="run-{index}"><h2>{swatch}{esc(run.name)} '
            f'<small><code>{esc(run.id[:8])}</code></small></h2>'
            f'<div class="cols"><table class="facts">{rows}</table>'
            f'<div><h3>state history</h3>{history}</div></div></section>')


def _utc(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        return datetime.fromisoformat(iso).astimezone(timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        return iso


def _duration(data: RunData, now: datetime | None) -> str:
    run = data.run
    if run.ended_at:
        return fmt_duration(seconds_between(run.created_at, run.ended_at))
    if run.state == "running":
        current = (now or datetime.now(timezone.utc)).isoformat()
        return f"{fmt_duration(seconds_between(run.created_at, current))} so far (running)"
    return "-"


def _git(git: Any) -> str:
    if not isinstance(git, dict) or not git.get("commit"):
        return '<span class="muted">not captured</span>'
    dirty = git.get("dirty")
    marker = (' <span class="badge st-warn">dirty</span>' if dirty else
              ' <span class="badge st-ok">clean</span>' if dirty is False else "")
    branch = f" on {esc(git['branch'])}" if git.get("branch") else ""
    return f"<code>{esc(str(git['commit'])[:12])}</code>{branch}{marker}"


def _command(command: Any) -> str:
    if isinstance(command, list) and all(isinstance(a, str) for a in command):
        return f"<code>{esc(shlex.join(command))}</code>"
    return '<span class="muted">not captured</span>'


# -- notices ------------------------------------------------------------------------------------


def notices(data: RunData) -> str:
    """What a reader must know before trusting the page: a run still going, a run with
    nothing in it, blobs the store lost, anything that could not be read."""
    label = esc(data.label)
    items = []
    if data.run.state == "running":
        items.append(("warn", f"{label} is still RUNNING: this report is a snapshot; what "
                              "it logs from now on (and metrics not yet flushed) is not in "
                              "it."))
    if not data.metrics and not data.hardware and not data.artifacts and data.ttrl is None:
        items.append(("warn", f"{label} has logged nothing yet: no metrics, artifacts or "
                              "online updates."))
    missing = [(a, d) for a in data.artifacts for d in a.missing]
    if missing:
        listing = "".join(f"<li><code>{esc(a.key)}</code>: blob <code>{esc(d)}</code></li>"
                          for a, d in missing)
        items.append(("bad", f"{label}: {len(missing)} blob(s) missing from the store (the "
                             "versions are listed, their content cannot be read; `repro "
                             f"verify --run {esc(data.run.id)}` checks the rest):"
                             f"<ul>{listing}</ul>"))
    items += [("bad", f"{label}: could not read {esc(p)}") for p in data.problems]
    return "".join(f'<div class="notice {kind}">{text}</div>' for kind, text in items)


# -- tables -------------------------------------------------------------------------------------


def artifacts_table(data: RunData) -> str:
    if not data.artifacts:
        return '<p class="muted">no artifacts logged or used</p>'
    return table(("role", "key", "type", "size", "stored", "digest", "aliases", "status"),
                 (_artifact_row(a) for a in data.artifacts))


def _artifact_row(a: ArtifactRow) -> list[str]:
    status = ('<span class="badge">pruned</span>' if a.pruned else
              f'<span class="badge st-bad">{len(a.missing)} blob(s) missing</span>'
              if a.missing else '<span class="badge st-ok">ok</span>')
    return [esc(a.role), f"<code>{esc(a.key)}</code>", esc(a.type), esc(fmt_size(a.size)),
            esc(fmt_size(a.stored_bytes)) if a.role == "output" else "",
            f'<code title="{esc(a.digest)}">{esc(a.digest[:23])}</code>',
            esc(", ".join(a.aliases)), status]


def ttrl_table(data: RunData) -> str:
    """The updates -> checkpoint table of one run (``repro updates --checkpoint`` for each)."""
    ttrl: TTRLData | None = data.ttrl
    if ttrl is None:
        return ""
    rows = [[f"<code>{esc(r.checkpoint)}</code>" if r.checkpoint
             else '<span class="muted">(after the last checkpoint: nothing produced yet)</span>',
             str(r.count), esc(r.first_update or "-"), esc(r.last_update or "-"),
             esc(fmt_number(r.mean_reward)), esc(fmt_number(r.mean_confidence)),
             esc(fmt_number(r.mean_kl))] for r in ttrl.produced]
    notes = "".join(f'<p class="muted">{esc(n)}</p>' for n in ttrl.notes)
    body = table(("checkpoint", "updates", "first update", "last update", "mean reward",
                  "mean confidence", "mean KL"), rows)
    if len(rows) > _FOLD_ROWS:
        body = (f"<details><summary>updates → checkpoint ({len(rows)} rows)</summary>{body}"
                "</details>")
    return (f"<h3>{esc(data.label)}: {len(ttrl.reward.y)} online update(s), "
            f"{len(ttrl.checkpoints)} checkpoint(s)</h3>{body}{notes}")


def summary_table(runs: list[RunData]) -> str:
    """The last value of every metric in every run (what W&B calls the run summary)."""
    names = sorted({k for data in runs for k in data.metrics})
    if not names:
        return ""
    rows = [[f"<code>{esc(name)}</code>"] + [esc(_last(data, name)) for data in runs]
            for name in names]
    return table(["metric"] + [f"{data.label} (last)" for data in runs], rows, cls="compact")


def _last(data: RunData, name: str) -> str:
    series = data.metrics.get(name)
    if series is None or len(series.y) == 0:
        return "-"
    value = float(series.y[-1])
    return fmt_number(value) if math.isfinite(value) else str(value)


def config_and_environment(data: RunData) -> str:
    """Config and environment, collapsed (they can be long: every installed package)."""
    config = {k: v for k, v in data.run.config.items() if k != "_repro"}
    parts = [_details(f"config of {data.label}", config)]
    if data.environment is not None:
        parts.append(_details(f"environment of {data.label}", data.environment))
    else:
        parts.append(f'<p class="muted">{esc(data.label)}: environment not captured</p>')
    return "".join(parts)


def _details(summary: str, value: Any) -> str:
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    return f"<details><summary>{esc(summary)}</summary><pre>{esc(text)}</pre></details>"
