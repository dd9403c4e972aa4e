"""``repro report RUN [RUN…] [-o report.html]``: one self-contained HTML file about the runs
(see :mod:`repro_core.reporting`). Reads the store read-only, like every command but ``init``,
``recover`` and ``pull``."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import Usage, root_option, store_root

__all__ = ["report"]


@click.command(short_help="An HTML report of runs: plots, lineage, diff.")
@click.argument("run_ids", metavar="RUN [RUN…]", nargs=-1, required=True)
@click.option("--output", "-o", type=click.Path(path_type=Path, dir_okay=False),
              default=Path("report.html"), show_default=True,
              help="The HTML file to write (replaced if it exists).")
@root_option
def report(run_ids: tuple[str, ...], output: Path, root: Path | None) -> None:
    """Write one self-contained HTML report of RUN (an id or unique prefix; several runs are
    overlaid, two are also diffed): run header and state history, every metric plotted,
    TTRL reward/confidence/KL with checkpoints marked, hardware, the lineage picture,
    artifacts, config and environment. Opening it needs no server and makes no network
    request. Needs the `report` extra (Plotly): pip install 'repro-lightning[report]'."""
    from ..reporting.api import report as write_report

    try:
        written = write_report(list(run_ids), output, root=store_root(root))
    except ModuleNotFoundError as exc:  # the optional plotting library: say how to get it
        raise Usage(str(exc)) from exc
    click.echo(f"wrote {written} ({written.stat().st_size / 2**20:.1f} MiB)", err=True)
