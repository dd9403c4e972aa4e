"""Connecting to a PostgreSQL registry: the driver import, the connection wrapper that speaks
the registry's shared SQL, how every connection is made (timeouts, keepalives, no cleartext
password), the pool's cheap liveness check, and the advisory-lock keys. The engine
(``engine_postgres.py``) builds on these.
"""

from __future__ import annotations

import select
import time
import weakref
import zlib
from typing import Any

from .. import constants
from ..errors import StorageError
from .dialect import params, translate

__all__ = ["LAST_USED", "LOCK_CLASS", "PgConn", "check", "connect_kwargs", "driver", "lock_key",
           "readable"]

LOCK_CLASS = 0x52455052  # "REPR": the first key of every advisory lock we take
_CONNECT_TIMEOUT = 10  # seconds for one connection attempt
_INSTALL_HINT = ("a PostgreSQL registry needs psycopg 3: pip install "
                 "'repro-lightning[postgresql]' (psycopg[binary] and psycopg-pool)")


def driver() -> Any:
    """The psycopg module (imported on first use: SQLite users never need it)."""
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        raise StorageError(f"{_INSTALL_HINT} ({exc})") from None
    return psycopg


class PgConn:
    """A psycopg connection that speaks the registry's shared SQL (``?`` placeholders)."""

    dialect = "postgresql"

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, values: Any = None) -> Any:
        return self.raw.execute(translate(sql), params(values))

    def executemany(self, sql: str, rows: Any) -> Any:
        cursor = self.raw.cursor()
        rows = list(rows)
        if rows:
            cursor.executemany(translate(sql), rows)
        return cursor

    def copy_rows(self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]],
                  types: tuple[str, ...] | None = None) -> None:
        """Bulk insert with ``COPY … FROM STDIN`` (the metrics and TTRL writers' path).
        With ``types`` (PostgreSQL type names, one per column) the rows go in COPY's binary
        format: packed metric arrays travel as bytes, not as hex text twice their size."""
        if not rows:
            return
        binary = " (FORMAT BINARY)" if types else ""
        with self.raw.cursor() as cursor, cursor.copy(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN{binary}") as copy:
            if types:
                copy.set_types(list(types))
            for row in rows:
                copy.write_row(row)

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return bool(self.raw.info.transaction_status != TransactionStatus.IDLE)


# When each pooled connection was last handed back: one idle for less than this is not
# checked again on checkout (a check is a round trip; a lost one fails at BEGIN, retried).
LAST_USED: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
_IDLE_CHECK_S = 2.0


def check(conn: Any) -> None:
    """Checked with a round trip when idle for a while, or when the server has sent
    something to an idle connection (a restart's termination notice): a readable socket
    costs nothing to notice."""
    from psycopg_pool import ConnectionPool

    if time.monotonic() - LAST_USED.get(conn, 0.0) > _IDLE_CHECK_S or readable(conn):
        ConnectionPool.check_connection(conn)


def readable(conn: Any) -> bool:
    try:
        return bool(select.select([conn.fileno()], [], [], 0)[0])
    except (OSError, ValueError):  # closed: let the check say so
        return True


def connect_kwargs(url: str) -> dict[str, Any]:
    """How every connection is made: autocommit (transactions are explicit), client-side
    binding, and the limits that keep one stopped host from stalling the team —
    ``lock_timeout`` (a lock wait fails after ``REPRO_REGISTRY_TIMEOUT``), an idle
    transaction ended by the server after 5 minutes (its locks released), TCP keepalives (a
    vanished peer noticed in about a minute), and never a cleartext password (``require_auth``:
    the URL may come from a store's config file)."""
    pg = driver()
    from psycopg.conninfo import conninfo_to_dict

    given = conninfo_to_dict(url)
    timeout_ms = int(constants.REPRO_REGISTRY_TIMEOUT * 1000)
    options = f"{given.get('options') or ''} -c lock_timeout={timeout_ms}" \
              " -c idle_in_transaction_session_timeout=300000"
    kwargs: dict[str, Any] = {
        "autocommit": True, "cursor_factory": pg.ClientCursor,
        "connect_timeout": _CONNECT_TIMEOUT, "options": options.strip(), "keepalives": 1,
        "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
    if "require_auth" not in given and pg.pq.version() >= 160000:
        kwargs["require_auth"] = "!password"
    return kwargs


def lock_key(schema: str, purpose: str) -> int:
    """A signed 32-bit key naming one lock of one registry (its schema in its database)."""
    value = zlib.crc32(f"{schema}\x00{purpose}".encode())
    return value - (1 << 32) if value >= 1 << 31 else value
