"""``report()`` and ``render_report()``: the public entry points (``repro report`` calls them).

Order of work, so a mistake costs nothing: arguments checked, then the plotting library
found (a missing ``plotly`` is said before the store is read), then the registry opened
read-only and every run resolved (an unknown id stops here, before anything is read in bulk),
then everything read, drawn, and written at once (a temp file renamed over the target: a
reader never sees half a report).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import _fsio
from ..errors import InvalidArgumentError, ReproError
from ..registry import Registry, RunRow

if TYPE_CHECKING:
    from .records import RunData

__all__ = ["check_output", "render_report", "report"]


def report(runs: str | Sequence[str], output: str | os.PathLike[str] = "report.html", *,
           root: str | os.PathLike[str] | None = None) -> Path:
    """Write one self-contained HTML report of ``runs`` (ids or unique prefixes; several are
    overlaid) to ``output`` and return its path.

    The file needs no server and makes no network request when opened (CSS, scripts, plots
    and the lineage SVG are all inside it). ``root``: the store (default: the one the
    ``ArtifactManager`` uses — ``set_root``, ``REPRO_HOME``). Read-only: nothing in the store
    is created or changed; ``output`` may not be inside it.
    """
    root_path = _root(root)
    target = check_output(output, root_path)
    text = render_report(runs, root=root_path)
    written = _fsio.write_file_atomic(target, text.encode("utf-8"))
    written.chmod(0o644)  # a document to share (the temp file it was renamed from was 0600)
    return written


def render_report(runs: str | Sequence[str], *, root: str | os.PathLike[str] | None = None
                  ) -> str:
    """The report of ``runs`` as HTML text (what :func:`report` writes)."""
    from .. import __version__
    from ..store.local import LocalStorageBackend
    from .collect import collect_run
    from .page import render_page
    from .plotly_js import plotly_bundle
    from .records import ReportData

    ids = _check_runs(runs)
    plotly_bundle()  # a missing plotting library is said before any store work
    root_path = _root(root)
    registry = Registry(root_path / "registry.sqlite", readonly=True)
    try:
        registry.open()
        rows = _unique([registry.get_run(run_id) for run_id in ids])
        store = LocalStorageBackend(root_path, algorithm=registry.hash_algorithm())
        data = [collect_run(registry, store, row) for row in rows]
        svg, svg_problem = _lineage(registry, data)
    finally:
        registry.close()
    diff, diff_problem = _diff(root_path, [row.id for row in rows])
    report_data = ReportData(runs=data, lineage_svg=svg, lineage_problem=svg_problem,
                             diff=diff, diff_problem=diff_problem,
                             generated_at=datetime.now(timezone.utc).isoformat())
    return render_page(report_data, version=__version__)


def check_output(output: object, root: Path) -> Path:
    """The report's path, refused before any work when it cannot be written or lies inside
    the store (``-o registry.sqlite`` would destroy what ``repro recover`` cannot rebuild)."""
    if not isinstance(output, (str, os.PathLike)) or not str(output).strip():
        raise InvalidArgumentError(f"output must be a file path, got {output!r}",
                                   argument="output")
    path = Path(output).expanduser()
    resolved = path.resolve()
    store = root.resolve()
    if resolved == store or store in resolved.parents:
        raise InvalidArgumentError(f"cannot write {path}: it is inside the store {root}; "
                                   "write the report somewhere else", argument="output")
    if path.is_dir():
        raise InvalidArgumentError(f"cannot write {path}: it is a directory",
                                   argument="output")
    if not path.absolute().parent.is_dir():
        raise InvalidArgumentError(f"cannot write {path}: directory {path.absolute().parent} "
                                   "does not exist", argument="output")
    return path


def _check_runs(runs: object) -> list[str]:
    ids = [runs] if isinstance(runs, str) else runs
    if not isinstance(ids, Sequence) or not ids or not all(
            isinstance(r, str) and r.strip() for r in ids):
        raise InvalidArgumentError(f"runs must be a run id or a non-empty list of run ids, "
                                   f"got {runs!r}", argument="runs")
    return [str(r) for r in ids]


def _unique(rows: list[RunRow]) -> list[RunRow]:
    """Each run once, in the order given (a run named twice, by id and by prefix)."""
    unique: dict[str, RunRow] = {}
    for row in rows:
        unique.setdefault(row.id, row)
    return list(unique.values())


def _root(root: str | os.PathLike[str] | None) -> Path:
    if root is not None:
        return Path(root).expanduser().absolute()
    from ..manager import ArtifactManager  # the manager imports much; only when needed

    return Path(ArtifactManager().root)


def _lineage(registry: Registry, data: list[RunData]) -> tuple[str | None, str | None]:
    from .lineage_view import lineage_svg

    try:
        return lineage_svg(registry, data), None
    except (ReproError, OSError, ValueError) as exc:  # a forged edge: the rest still renders
        return None, str(exc)


def _diff(root: Path, ids: list[str]) -> tuple[dict[str, Any] | None, str | None]:
    """``repro diff`` of exactly two runs (its own read-only open of the registry)."""
    if len(ids) != 2:
        return None, None
    from ..diff import diff_runs

    try:
        return diff_runs(ids[0], ids[1], root=root), None
    except (ReproError, OSError, ValueError) as exc:  # e.g. an environment blob gone
        return None, str(exc)
