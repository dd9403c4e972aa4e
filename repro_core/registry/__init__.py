"""The registry: runs, artifact versions, aliases, lineage edges, metrics and TTRL rows.

One SQLite file per store (``registry.sqlite``, the default), or a PostgreSQL database a team
shares (``REPRO_REGISTRY=postgresql://…``). The layers, each importing only the ones above
it::

    dialect.py     how the two engines' SQL, errors and URLs differ (the only such place)
    schema.py      DDL and migrations (v1 … v7), one per schema version
    schema_pg.py   PostgreSQL's base schema (v6, typed); later migrations are shared
    target.py      which engine a store uses (REPRO_REGISTRY, registry=, registry.url)
    engine_sqlite.py / engine_postgres.py   opening rules, transactions, locks of each
    pg_connect.py  how PostgreSQL connections are made and checked, lock keys
    migrate.py     ``repro migrate``: copy a registry between the engines, verified
    records.py     typed rows and the column lists that make them
    connection.py  one face over the engines: transactions, reads
    runs.py        runs, state history, run-id prefixes, CRASHED detection
    versions.py    versions, aliases, key resolution within projects, lineage edges

``Registry`` adds the bulk readers of ``repro_core._registry_queries`` (graph walks, TTRL).
"""

from __future__ import annotations

from .._registry_queries import BulkQueries
from .connection import store_has_data
from .mounts import detect_network_fs
from .records import NewVersion, RunRow, VersionRow, dumps
from .runs import is_crashed, process_namespace, process_start_time
from .schema import SCHEMA_VERSION, run_script
from .versions import VersionQueries

__all__ = [
    "SCHEMA_VERSION", "NewVersion", "Registry", "RunRow", "VersionRow", "detect_network_fs",
    "dumps", "is_crashed", "process_namespace", "process_start_time", "run_script",
    "store_has_data",
]


class Registry(VersionQueries, BulkQueries):
    """The registry of one store (SQLite or PostgreSQL). Thread-safe; reopens itself after
    ``fork()``."""
