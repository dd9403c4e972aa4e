"""The registry's connection: one face over two engines (SQLite file, PostgreSQL server).

``Connection`` is what the query layers (``runs.py``, ``versions.py``, the bulk readers) build
on: ``_read`` for one statement, ``_reading()`` for several reads on one connection,
``transaction()`` / ``_write()`` for a change. The engine decides what those mean:

- :class:`~.engine_sqlite.SqliteEngine` (default): ``registry.sqlite`` in the store, WAL,
  ``BEGIN IMMEDIATE`` (one writer at a time, the lock taken before the first read).
- :class:`~.engine_postgres.PostgresEngine`: a pooled psycopg connection per operation;
  ``BEGIN`` then a transaction-scoped advisory lock, which gives writers exactly SQLite's
  serial order across every process and host sharing the database.

Which one a store uses is decided by :mod:`.target` (``REPRO_REGISTRY``, ``registry=``,
``<store>/registry.url``). Either way the registry is thread-safe (one lock per object) and
reopens itself after ``fork()``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from ..errors import StorageError
from .dialect import DB_ERRORS, is_postgres_url
from .engine_sqlite import SqliteEngine
from .store_data import store_has_data
from .target import resolve

__all__ = ["Connection", "Engine", "store_has_data", "translated"]


class Engine(Protocol):
    """What a registry engine provides (see the two implementations)."""

    dialect: str
    readonly: bool

    @property
    def location(self) -> str: ...
    def borrow(self) -> AbstractContextManager[Any]: ...
    def begun(self, *, exclusive: bool = True) -> AbstractContextManager[Any]: ...
    def lost(self, exc: BaseException | None) -> bool: ...
    def rollback(self, conn: Any) -> None: ...
    def close(self) -> None: ...
    def integrity_check(self) -> str: ...
    def publish_guard(self, *, exclusive: bool = False) -> AbstractContextManager[None]: ...


def _engine(path: str | Path, root: Path | None, *, algorithm: str, create: bool | None,
            readonly: bool, follow_env: bool) -> tuple[Engine, Path, Path]:
    """Pick the engine for ``path`` (a ``registry.sqlite`` path, or a PostgreSQL URL)."""
    if is_postgres_url(path):
        url: str | None = str(path)
        pending = False
        root = root if root is not None else Path.cwd()
        file = root / "registry.sqlite"
    else:
        file = Path(path)
        root = file.parent
        url, pending = None, False
        if file.name == "registry.sqlite":  # a store's registry: its config may say PostgreSQL
            explicit = (os.environ.get("REPRO_REGISTRY", "").strip() or None) \
                if follow_env else None
            url, pending = resolve(root, explicit)
    if url is None:
        return SqliteEngine(file, algorithm=algorithm, create=create, readonly=readonly), \
            file, root
    from .engine_postgres import PostgresEngine  # psycopg is imported only when used

    engine = PostgresEngine(url, root, algorithm=algorithm, create=create, readonly=readonly,
                            bind=pending and not readonly and create is not False,
                            store_bound=not is_postgres_url(path))
    return engine, file, root


class Connection:
    """The connection of one registry: opening rules, transactions, reads."""

    def __init__(self, path: str | Path, *, algorithm: str = "blake3",
                 create: bool | None = None, readonly: bool = False,
                 root: str | Path | None = None, follow_env: bool = True) -> None:
        """``path``: the store's ``registry.sqlite`` (its config may move it to PostgreSQL)
        or a ``postgresql://`` URL (``root``: the store whose blobs it describes).
        ``create``: True creates a missing registry, False never does, None (default)
        creates one only in a store that holds no data yet. ``readonly`` opens for reading
        only (no migration, no write lock, works on read-only media). ``follow_env=False``
        ignores ``REPRO_REGISTRY`` (the store's own binding only: ``repro migrate``)."""
        self.readonly = readonly
        self._lock = threading.RLock()
        self._engine, self.path, self.root = _engine(
            path, Path(root) if root is not None else None, algorithm=algorithm,
            create=create, readonly=readonly, follow_env=follow_env)
        self._algorithm = algorithm

    @property
    def engine(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self._engine.dialect

    @property
    def identity_file(self) -> Path:
        """The file whose replacement means "another store now": the SQLite file, or the
        store's ``registry.url`` (its directory when the URL was given directly)."""
        if self.engine == "sqlite":
            return self.path
        config = self.root / "registry.url"
        return config if config.exists() else self.root

    @property
    def location(self) -> str:
        """Where the registry is, for messages (a URL's password is never shown)."""
        return self._engine.location

    def open(self) -> None:
        """Open now (errors surface here rather than at the first query)."""
        with self._lock, self._engine.borrow():
            pass

    def close(self) -> None:
        with self._lock:
            self._engine.close()

    # -- transactions and reads -------------------------------------------------------------

    @contextmanager
    def transaction(self, *, exclusive: bool = True) -> Iterator[Any]:
        """One atomic change: ``BEGIN`` … ``COMMIT`` with the registry's write lock held
        from the first statement; rolls back on any exception. ``exclusive=False`` is for
        appends that need no order against other writers (metrics, TTRL rows): PostgreSQL
        then lets them run beside other transactions; SQLite has one writer anyway."""
        if self.readonly:
            raise StorageError(f"registry {self.location} was opened read-only",
                               path=self.path)
        with self._lock, self._engine.begun(exclusive=exclusive) as conn:
            try:
                yield conn
                self._commit(conn)
            except BaseException:
                self._engine.rollback(conn)
                raise

    def _commit(self, conn: Any) -> None:
        """Separate so fault-injection tests can make a commit fail."""
        conn.execute("COMMIT")

    @contextmanager
    def _reading(self) -> Iterator[Any]:
        """A connection for several reads (driver errors become ``StorageError``)."""
        with self._lock, translated(self.path, self.location), self._engine.borrow() as conn:
            yield conn

    @contextmanager
    def snapshot(self) -> Iterator[Any]:
        """A consistent read of several statements that takes no write lock (SQLite: a
        deferred transaction, which WAL gives a snapshot; PostgreSQL: REPEATABLE READ)."""
        with self._reading() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"
                         if conn.dialect == "postgresql" else "BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            with self._reading() as conn:
                return list(conn.execute(sql, params).fetchall())
        except StorageError as exc:
            if not self._engine.lost(exc.__cause__):
                raise
        with self._reading() as conn:  # once more, on a fresh connection (a server restart)
            return list(conn.execute(sql, params).fetchall())

    @contextmanager
    def _write(self) -> Iterator[Any]:
        try:
            with self.transaction() as conn:
                yield conn
        except DB_ERRORS as exc:
            raise StorageError(f"registry write failed: {exc}", path=self.path) from exc

    def publish_guard(self, *, exclusive: bool = False) -> AbstractContextManager[None]:
        """Held by writers from a blob's publication to its row's commit, by gc exclusively
        while it deletes: the store's ``.gc.lock`` covers one machine, this covers every
        host sharing a PostgreSQL registry (an advisory lock there; nothing for SQLite)."""
        return self._engine.publish_guard(exclusive=exclusive)

    # -- store metadata ---------------------------------------------------------------------

    def hash_algorithm(self) -> str:
        rows = self._read("SELECT value FROM store_meta WHERE key = 'hash_algorithm'")
        return rows[0][0] if rows else self._algorithm

    def store_id(self) -> str | None:
        """A random id given to the store when its registry was created (identity checks)."""
        rows = self._read("SELECT value FROM store_meta WHERE key = 'store_id'")
        return rows[0][0] if rows else None

    def integrity_check(self) -> str:
        with self._lock, translated(self.path, self.location):
            return self._engine.integrity_check()


@contextmanager
def translated(path: Path, location: str | None = None) -> Iterator[None]:
    """Driver errors (locked past the busy timeout, I/O errors, a lost server) become
    ``StorageError``."""
    try:
        yield
    except DB_ERRORS as exc:
        where = f" ({location})" if location and location != str(path) else ""
        raise StorageError(f"registry query failed{where}: {exc}", path=path) from exc
