"""``repro migrate`` and ``repro db``: move a store's registry between SQLite and PostgreSQL,
and upgrade a PostgreSQL registry's schema on demand (writers also do it automatically)."""

from __future__ import annotations

from pathlib import Path

import click

from ..registry import Registry
from ..registry.dialect import redact_url
from ._common import console, emit_json, json_option, markup_safe, root_option, store_root

__all__ = ["db", "migrate"]


@click.command(short_help="Copy the registry to PostgreSQL (or back to SQLite).")
@click.option("--to", "to", required=True, metavar="URL|sqlite",
              help="postgresql://[user@]host[:port]/database (the password from the URL, "
                   "PGPASSWORD or ~/.pgpass; never written down), or 'sqlite' to come back.")
@root_option
@json_option
def migrate(to: str, root: Path | None, as_json: bool) -> None:
    """Copy the store's registry into an empty PostgreSQL database (or back into a SQLite
    file), verify every row, then switch the store to it. The old SQLite file is kept as
    registry.sqlite.migrated-<time>; a PostgreSQL database is left as it was."""
    from ..registry.migrate import migrate as run

    report = run(store_root(root), to)
    if as_json:
        emit_json({"source": report.source, "destination": report.destination,
                   "rows": report.rows, "moved_aside": report.moved_aside,
                   "seconds": round(report.seconds, 3)})
        return
    total = sum(report.rows.values())
    console().print(f"copied {total} rows ({len(report.rows)} tables) from "
                    f"{markup_safe(report.source)} to {markup_safe(report.destination)}, "
                    f"verified row for row, in {report.seconds:.1f} s")
    if report.moved_aside:
        console().print(f"the SQLite registry was kept as {markup_safe(report.moved_aside)}")
    console().print(f"the store now uses {markup_safe(redact_url(report.destination))}")


@click.group(short_help="The registry database: schema upgrades.")
def db() -> None:
    """The store's registry database (SQLite file or PostgreSQL server)."""


@db.command(short_help="Bring the registry's schema up to this repro's.")
@root_option
def upgrade(root: Path | None) -> None:
    """Upgrade the registry's schema now (an opening writer does it too, under a lock)."""
    registry = Registry(store_root(root) / "registry.sqlite", create=False)
    try:
        registry.open()
        version = registry._read("SELECT version FROM schema_version")[0][0]
        console().print(f"registry {markup_safe(registry.location)} ({registry.engine}) is at "
                        f"schema v{version}")
    finally:
        registry.close()
