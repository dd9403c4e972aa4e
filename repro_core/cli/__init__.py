"""The ``repro`` command line: look at runs, artifacts and lineage; verify, gc, du, init,
recover.

    repro [--root DIR] COMMAND ...
    repro runs | show RUN | artifacts [NAME] | lineage KEY | diff RUN_A RUN_B | updates RUN
    repro verify [KEY | --run RUN] | gc [--delete] | du | init | recover
    repro remote add|list|remove | push | pull | status
    repro migrate --to URL|sqlite | db upgrade

One module per command family::

    _common.py     error boundary, --root, read-only registry, output helpers
    runs.py        runs, show
    artifacts.py   artifacts
    lineage.py     lineage
    diff.py        diff
    updates.py     updates (TTRL online updates)
    store.py       verify, gc, du
    report.py      report (one self-contained HTML file: plots, TTRL, lineage, diff)
    setup.py       init, recover (the only commands that write a registry)
    remote.py      remote, push, pull, status (write the registry's remote rows and pulls)
    db.py          migrate (registry SQLite <-> PostgreSQL), db upgrade

``--root`` is accepted before the command (as ``git -C`` users type it) and after it (the
command's wins); default ``$REPRO_HOME``, else ``./repro_store``. Only ``init`` and
``recover`` (and ``pull``, into a new store) ever create anything; every other command opens
the registry read-only. Run ids may be given as a unique prefix (4+ characters), as git short
hashes. Exit codes and the one-line error contract are in ``_common``.
"""

from __future__ import annotations

from pathlib import Path

import click

from .. import constants
from ._common import ReproGroup, RootPath, remember_group_options
from .artifacts import artifacts
from .db import db, migrate
from .diff import diff
from .lineage import lineage
from .remote import pull, push, remote, status
from .report import report
from .runs import runs, show
from .setup import init, recover
from .store import du, gc, verify
from .updates import updates

__all__ = ["main"]

@click.group(cls=ReproGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="repro-lightning")
@click.option("--root", type=RootPath(), default=None,
              help="Store root for the command (default: $REPRO_HOME or ./repro_store); a "
                   "command's own --root wins.")
@click.option("--debug", is_flag=True, help="Show the traceback of an unexpected error.")
@click.pass_context
def main(ctx: click.Context, root: Path | None, debug: bool) -> None:
    """repro: reproducible runs, content-addressed artifacts and their lineage."""
    remember_group_options(ctx, root, debug)
    # Every setting checked up front, so a typo in one is reported by name before any work,
    # whichever command reads it later (as git refuses a malformed config at once).
    for name in constants.SETTINGS:
        getattr(constants, name)  # a bad value raises InvalidArgumentError naming it


for _command in (runs, show, artifacts, lineage, diff, updates, verify, gc, du, report, init,
                 recover, remote, push, pull, status, migrate, db):
    main.add_command(_command)
