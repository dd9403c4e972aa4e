"""The PostgreSQL engine: one registry shared by every process and host of a team.

- **Connections** come from a psycopg 3 pool per process and URL (checked on checkout, so a
  server restart costs the next operation one reconnect, not an error); a ``fork()`` child
  makes its own pool. Statements are bound client-side (``ClientCursor``), as SQLite binds
  them: the shared SQL leaves some parameter types for the server to infer from context.
- **Writers are serialized like SQLite's**: every transaction takes a transaction-scoped
  advisory lock right after ``BEGIN``, so "read the highest version number, insert the next"
  and every other read-then-write is as safe across hosts as ``BEGIN IMMEDIATE`` is on one
  machine. The lock is per registry (per schema: several registries may share a database).
- **gc and other hosts.** Writers hold a *shared* session advisory lock from a blob's
  publication to its row's commit (:meth:`PostgresEngine.publish_guard`); ``repro gc
  --delete`` holds it *exclusively* while it reads the references and deletes. A host that is
  between the two steps therefore blocks gc, on any machine; a host that dies releases its
  lock with its session.
- **Schema**: created on first use (``schema_pg.BASE`` + the shared migrations) and upgraded
  automatically under an advisory lock (two processes never both migrate); a newer schema than
  this package is refused. ``repro db upgrade`` does the same on demand.
- **Credentials**: from the URL, ``PGPASSWORD`` / ``~/.pgpass`` or the libpq environment;
  messages show the URL with ``***`` for the password, and nothing here writes it anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import constants
from ..errors import StorageError, StoreNotFoundError
from .dialect import password_of, redact_url
from .pg_connect import (
    LAST_USED,
    LOCK_CLASS,
    PgConn,
    check,
    connect_kwargs,
    driver,
    lock_key,
    readable,
)
from .schema import SCHEMA_VERSION, migrations, run_script
from .schema_pg import BASE, BASE_VERSION
from .store_data import store_has_data
from .target import bound

__all__ = ["PostgresEngine", "close_connections", "upgrade"]

_POOLS: dict[tuple[int, str], Any] = {}
_POOLS_LOCK = threading.Lock()


def _pool(url: str) -> Any:
    """This process's pool for ``url`` (made on first use; a fork child makes its own)."""
    key = (os.getpid(), url)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            driver()
            from psycopg_pool import ConnectionPool

            # The pool logs each failed reconnect; repro reports the outage itself (one
            # error, or the metrics writer's one warning): no stderr lines unless the
            # application configured logging.
            logging.getLogger("psycopg.pool").addHandler(logging.NullHandler())
            pool = ConnectionPool(
                url, min_size=1, max_size=6, open=True, timeout=constants.REPRO_REGISTRY_TIMEOUT,
                name=f"repro-registry-{os.getpid()}", check=check,
                kwargs=connect_kwargs(url))
            _POOLS[key] = pool
    return pool


def close_connections() -> None:
    """Close this process's pools and shared-lock connections (tests that open many
    registries call it between them, so the server's connection limit is not reached). The
    next use of a registry opens new ones. Not needed at exit: the pools' threads are
    daemons, and closing them there could run before the final metrics flush."""
    with _POOLS_LOCK:
        pools = [_POOLS.pop(k) for k in [k for k in _POOLS if k[0] == os.getpid()]]
        holds = [_SHARED.pop(k) for k in [k for k in _SHARED if k[0] == os.getpid()]]
    for pool in pools:
        with contextlib.suppress(Exception):
            pool.close(timeout=1.0)
    for hold in holds:
        if hold.raw is not None:
            with contextlib.suppress(Exception):
                hold.raw.close()


class PostgresEngine:
    """Opening rules, transactions and locks of one PostgreSQL registry."""

    dialect = "postgresql"

    def __init__(self, url: str, root: Path, *, algorithm: str, create: bool | None,
                 readonly: bool, bind: bool = False, store_bound: bool = False) -> None:
        """``bind``: write the store's ``registry.url`` once the server has answered.
        ``store_bound``: opened as a store's registry (not by URL): reading a store that is
        not there is then an error."""
        self.url = url
        self._bind = bind
        self._store_bound = store_bound
        self.root = root
        self.readonly = readonly
        self._algorithm = algorithm
        self._create = create
        self._ready_pid = -1
        self._keys: dict[str, int] = {}

    @property
    def location(self) -> str:
        return redact_url(self.url)

    # -- connections ------------------------------------------------------------------------

    def _error(self, exc: BaseException, doing: str = "cannot connect to") -> StorageError:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        secret = password_of(self.url)
        if secret:  # libpq never echoes it; be sure anyway
            reason = reason.replace(secret, "***")
        if "no password supplied" in reason:
            reason += (" (a store keeps its registry URL without the password: set PGPASSWORD,"
                       " ~/.pgpass or REPRO_REGISTRY with the password)")
        return StorageError(f"{doing} the registry {self.location}: {reason}")

    def _ensure_ready(self) -> None:
        """First use in this process: connect once directly (a clear error for a wrong
        password, a missing database, a server that is not there) and check the schema."""
        if self._ready_pid == os.getpid():
            return
        if self.readonly and self._store_bound and not self.root.is_dir():
            # As for SQLite: reading a store that is not there (a mistyped --root) is an
            # error, not a view of the shared registry.
            raise StoreNotFoundError(f"no repro store at {self.root}; pass --root / root= or "
                                     "set REPRO_HOME", path=self.root)
        psycopg = driver()
        raw = self._connect()
        try:
            conn = PgConn(raw)
            schema = conn.execute("SELECT current_schema()").fetchone()[0]
            if schema is None:
                raise StorageError(f"the registry {self.location} has no schema to create "
                                   "tables in (check search_path)")
            self._keys = {p: lock_key(schema, p)
                          for p in ("write", "append", "schema", "publish")}
            self._check_schema(conn)
            if self._bind:
                bound(self.root, self.url)
                self._bind = False
        except psycopg.Error as exc:
            raise self._error(exc, "cannot use") from None
        finally:
            raw.close()
        self._ready_pid = os.getpid()

    @contextlib.contextmanager
    def borrow(self) -> Iterator[PgConn]:
        self._ensure_ready()
        psycopg = driver()
        from psycopg_pool import PoolTimeout

        try:
            cm = _pool(self.url).connection()
            raw = cm.__enter__()
        except PoolTimeout as exc:
            raise StorageError(f"the registry {self.location} did not answer within "
                               f"{constants.REPRO_REGISTRY_TIMEOUT:g} s (REPRO_REGISTRY_TIMEOUT):"
                               f" {exc}") from None
        except psycopg.Error as exc:
            raise self._error(exc) from None
        try:
            yield PgConn(raw)
        except BaseException as exc:
            LAST_USED[raw] = time.monotonic()
            cm.__exit__(type(exc), exc, exc.__traceback__)
            raise
        else:
            LAST_USED[raw] = time.monotonic()
            cm.__exit__(None, None, None)

    @contextlib.contextmanager
    def begun(self, *, exclusive: bool = True) -> Iterator[PgConn]:
        """A connection inside ``BEGIN`` (+ the write lock when ``exclusive``). A pooled
        connection the server dropped (a restart) fails at ``BEGIN``, before anything was
        done: the pool discards it and the transaction starts again on a fresh one."""
        psycopg = driver()
        for attempt in (0, 1):
            with self.borrow() as conn:
                try:
                    conn.execute("BEGIN")
                    if exclusive:
                        conn.execute("SELECT pg_advisory_xact_lock(?, ?)",
                                     (LOCK_CLASS, self._keys["write"]))
                    else:  # appenders run beside each other; only `repro migrate` stops them
                        conn.execute("SELECT pg_advisory_xact_lock_shared(?, ?)",
                                     (LOCK_CLASS, self._keys["append"]))
                except psycopg.errors.LockNotAvailable:
                    raise self._busy() from None
                except psycopg.OperationalError:
                    if attempt == 0 and conn.raw.broken:
                        continue
                    raise
                yield conn
                return

    def _busy(self) -> StorageError:
        return StorageError(
            f"the registry {self.location} is busy: another writer held its lock for over "
            f"{constants.REPRO_REGISTRY_TIMEOUT:g} s (REPRO_REGISTRY_TIMEOUT)")

    @staticmethod
    def lost(exc: BaseException | None) -> bool:
        """Whether ``exc`` is a lost connection (worth one retry of a read)."""
        psycopg = driver()
        return isinstance(exc, psycopg.OperationalError)

    def rollback(self, conn: PgConn) -> None:
        with contextlib.suppress(Exception):  # a lost connection has nothing to roll back
            if conn.in_transaction and not conn.raw.broken:
                conn.raw.execute("ROLLBACK")

    def close(self) -> None:
        """Connections belong to the process's pool (closed at exit), not to one registry."""

    def integrity_check(self) -> str:
        """The server keeps its own pages consistent; what we can check is our schema."""
        with self.borrow() as conn:
            version = conn.execute("SELECT version FROM schema_version").fetchone()
        return "ok" if version and version[0] == SCHEMA_VERSION else f"schema {version}"

    @contextlib.contextmanager
    def publish_guard(self, *, exclusive: bool = False) -> Iterator[None]:
        """Writers: the shared lock, taken once per process on a connection kept for it
        (threads share it, counted: a guard per thread would take a pooled connection each
        and could exhaust the pool it then needs for the row). gc: the exclusive lock on a
        connection of its own, for the block."""
        self._ensure_ready()
        key = (LOCK_CLASS, self._keys["publish"])
        if not exclusive:
            with _shared_guard(self, key):
                yield
            return
        raw = self._connect()
        try:
            self._lock_exclusive(PgConn(raw), key)
            yield
        finally:
            raw.close()  # ends the session: its locks go with it

    def _connect(self) -> Any:
        psycopg = driver()
        try:
            return psycopg.connect(self.url, **connect_kwargs(self.url))
        except psycopg.Error as exc:
            raise self._error(exc) from None

    def _lock_exclusive(self, conn: PgConn, key: tuple[int, int]) -> None:
        """gc's side: wait for writers on every host, but not for ever (as the lock file)."""
        deadline = time.monotonic() + constants.SQLITE_BUSY_TIMEOUT_MS / 1000
        while not conn.execute("SELECT pg_try_advisory_lock(?, ?)", key).fetchone()[0]:
            if time.monotonic() > deadline:
                raise StorageError(
                    f"the store is busy: a writer sharing the registry {self.location} has "
                    f"held its publish lock for over {constants.SQLITE_BUSY_TIMEOUT_MS // 1000}"
                    " s; retry gc later")
            time.sleep(0.05)

    # -- schema -----------------------------------------------------------------------------

    def _check_schema(self, conn: PgConn) -> None:
        current = _schema_version(conn)
        if current == SCHEMA_VERSION:
            return
        if current > SCHEMA_VERSION:
            raise StorageError(
                f"the registry {self.location} has schema v{current}, newer than this repro "
                f"(v{SCHEMA_VERSION}); upgrade repro-lightning on this machine")
        if current == 0:
            self._refuse_creation(conn)
        elif self.readonly:
            raise StorageError(
                f"the registry {self.location} has schema v{current}, older than this repro "
                f"(v{SCHEMA_VERSION}); upgrade it with `repro db upgrade` (any write does too)")
        upgrade(conn, self._keys["schema"], self._algorithm)

    def _refuse_creation(self, conn: PgConn) -> None:
        """A registry is created only where nothing would be hidden by an empty one."""
        if self.readonly or self._create is False:
            raise StoreNotFoundError(f"no repro registry in {self.location} yet")
        if self._create is None and store_has_data(self.root):
            raise StorageError(
                f"the store {self.root} holds data but the registry {self.location} is empty; "
                f"copy its registry with `repro migrate --root {self.root} --to URL`",
                path=self.root)


class _Shared:
    """This process's hold on one registry's shared publish lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.raw: Any = None


_SHARED: dict[tuple[int, str, int], _Shared] = {}


@contextlib.contextmanager
def _shared_guard(engine: PostgresEngine, key: tuple[int, int]) -> Iterator[None]:
    """Take the shared lock when the first holder in this process enters, release it when
    the last one leaves; the connection stays open for the next (a lost connection loses
    the lock: the next first holder reconnects and takes it anew)."""
    with _POOLS_LOCK:
        hold = _SHARED.setdefault((os.getpid(), engine.url, key[1]), _Shared())
    with hold.lock:
        if hold.count == 0:
            _take_shared(engine, hold, key)
        hold.count += 1
    try:
        yield
    finally:
        with hold.lock:
            hold.count -= 1
            if hold.count == 0 and hold.raw is not None:
                try:
                    PgConn(hold.raw).execute("SELECT pg_advisory_unlock_shared(?, ?)", key)
                except Exception:  # a lost session has released its locks already
                    with contextlib.suppress(Exception):
                        hold.raw.close()
                    hold.raw = None


def _take_shared(engine: PostgresEngine, hold: _Shared, key: tuple[int, int]) -> None:
    """Take the shared lock on the kept connection; one the server dropped since (a restart)
    is replaced once, as a pooled one would be."""
    psycopg = driver()
    for attempt in (0, 1):
        if hold.raw is not None and not hold.raw.closed and readable(hold.raw):
            with contextlib.suppress(Exception):  # the server spoke first: a termination
                hold.raw.close()
        if hold.raw is None or hold.raw.closed or hold.raw.broken:
            hold.raw = engine._connect()  # kept between holds: one round trip each
        try:
            PgConn(hold.raw).execute("SELECT pg_advisory_lock_shared(?, ?)", key)
            return
        except BaseException as exc:
            lost = isinstance(exc, psycopg.OperationalError) and hold.raw.broken
            with contextlib.suppress(Exception):
                hold.raw.close()
            hold.raw = None
            if lost and attempt == 0:
                continue
            if isinstance(exc, psycopg.errors.LockNotAvailable):
                raise engine._busy() from None
            if isinstance(exc, psycopg.Error):
                raise engine._error(exc, "cannot take the publish lock of") from None
            raise


def _schema_version(conn: PgConn) -> int:
    if not conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    if row is None or not isinstance(row[0], int):
        raise StorageError("the registry's schema_version row is missing or forged")
    return int(row[0])


def upgrade(conn: PgConn, lock_key: int, algorithm: str) -> tuple[int, int]:
    """Create or migrate the schema in one transaction, under the schema advisory lock (a
    second process waits, then finds it done). Returns (before, after).

    The lock is a session lock taken *before* ``BEGIN``: a transaction that began first and
    then waited would look the tables up in a catalog snapshot from before the other process
    created them ("relation already exists")."""
    import secrets

    conn.execute("SELECT pg_advisory_lock(?, ?)", (LOCK_CLASS, lock_key))
    try:
        conn.execute("BEGIN")
        try:
            current = _schema_version(conn)
            if current > SCHEMA_VERSION:
                raise StorageError(f"the registry has schema v{current}, newer than this "
                                   f"repro (v{SCHEMA_VERSION})")
            if current == 0:
                if conn.execute("SELECT to_regclass('runs') IS NOT NULL").fetchone()[0]:
                    raise StorageError(
                        "the database already holds a table named runs but no repro registry:"
                        " use a database (or schema, options=-csearch_path=...) of its own")
                run_script(conn, BASE)
                _compress_lz4(conn)
                conn.execute("CREATE TABLE schema_version (version BIGINT NOT NULL)")
                conn.execute("INSERT INTO schema_version (version) VALUES (?)",
                             (BASE_VERSION,))
                conn.execute("INSERT INTO store_meta (key, value) VALUES ('hash_algorithm', ?),"
                             " ('store_id', ?)", (algorithm, secrets.token_hex(8)))
            for step in migrations(max(current, BASE_VERSION)):
                step(conn)
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                conn.execute("ROLLBACK")
            raise
    finally:
        with contextlib.suppress(Exception):
            conn.execute("SELECT pg_advisory_unlock(?, ?)", (LOCK_CLASS, lock_key))
    return current, SCHEMA_VERSION


def _compress_lz4(conn: PgConn) -> None:
    """Metric chunks compressed with LZ4 where the server has it (PostgreSQL 14+ built with
    lz4): the default pglz made flushing 200k points ~3x slower, holding the writer."""
    conn.execute("SAVEPOINT lz4")
    try:
        for column in ("steps", "vals", "times"):
            conn.execute(f"ALTER TABLE metric_chunks ALTER COLUMN {column} SET COMPRESSION lz4")
    except Exception:  # an older server, or one built without lz4: pglz it is
        conn.execute("ROLLBACK TO SAVEPOINT lz4")
    else:
        conn.execute("RELEASE SAVEPOINT lz4")
