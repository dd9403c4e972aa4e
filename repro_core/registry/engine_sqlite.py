"""The SQLite engine: one file per store (``registry.sqlite``), the embedded default.

Why SQLite and how it is used:

- **WAL mode** lets readers run while a writer commits; on network filesystems (NFS, Lustre,
  GPFS, CIFS, FUSE) WAL's shared-memory index does not work, so we warn and use a rollback
  journal there.
- **One transaction per logical change**, opened with ``BEGIN IMMEDIATE``: the write lock is
  taken *before* reading the latest version number, so two processes can never both read
  ``v7`` and both write ``v8`` (a deferred transaction would read first and lose one).
- **Fork safety**: a connection must not cross ``fork()``; each call checks the PID and opens a
  fresh connection in a child (the parent's is abandoned, never closed, in the child).
- **Never created by accident.** A missing, empty (0-byte) or unreadable ``registry.sqlite``
  used to become a fresh, empty registry: ``repro runs`` then showed nothing and ``repro gc
  --delete`` deleted every blob. Now a registry is created only where the store holds no data
  (no blob, no run export) or when the caller says ``create=True`` (``repro init``); anything
  else is :class:`~repro_core.errors.RegistryDamagedError` naming ``repro recover``.
- **Readers open read-only** (``mode=ro``, or ``immutable=1`` when the store's directory cannot
  be written at all, so WAL's ``-shm`` cannot be created): an archived or shared
  ``chmod -R a-w`` store is readable. An older schema is migrated in memory for such readers.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from .. import constants
from ..errors import (
    InvalidArgumentError,
    RegistryDamagedError,
    StorageError,
    StoreNotFoundError,
)
from .mounts import detect_network_fs
from .schema import SCHEMA_VERSION, migrations, retry_busy
from .store_data import store_has_data

__all__ = ["SqliteConnection", "SqliteEngine"]


class SqliteConnection(sqlite3.Connection):
    """A sqlite3 connection that says which SQL dialect it speaks."""

    dialect = "sqlite"

    def copy_rows(self, table: str, columns: tuple[str, ...], rows: list[tuple[object, ...]],
                  types: tuple[str, ...] | None = None) -> None:
        """PostgreSQL's bulk path; SQLite callers use ``insert_rows``' JSON path instead."""
        names, marks = ", ".join(columns), ", ".join("?" * len(columns))
        self.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)


# SQLite's words for a file that is not (or no longer) a database, and ours.
_DAMAGE = ("not a database", "malformed", "no repro schema", "schema_version row",
           "has content but no", "corrupt")
# What a store directory may hold before its registry exists (anything else: not ours).
_STORE_ENTRIES = {"registry.sqlite", "registry.sqlite-wal", "registry.sqlite-shm",
                  "registry.sqlite-journal", "blobs", "tmp", "cache", "runs", "spill",
                  "CACHEDIR.TAG", ".gc.lock", "registry.url"}


def _refuse_foreign_directory(root: Path) -> None:
    """A new store is made in a new or empty directory only: ``init_run(root=".")`` in a
    project folder would scatter ``blobs/``, ``runs/`` … among the user's files and mark the
    whole folder ``CACHEDIR.TAG`` (which backup tools skip)."""
    try:
        foreign = sorted(e.name for e in root.iterdir() if e.name not in _STORE_ENTRIES
                         and not e.name.startswith(".CACHEDIR.TAG."))
    except NotADirectoryError:
        raise InvalidArgumentError(f"{root} is a file, not a store directory",
                                   argument="root") from None
    except OSError:
        return  # unreadable: opening it will say why
    if foreign:
        shown = ", ".join(foreign[:3]) + (", …" if len(foreign) > 3 else "")
        raise InvalidArgumentError(
            f"{root} already holds other files ({shown}) and no repro store: a store needs a "
            f"directory of its own (e.g. {root / 'repro_store'}); to use this one anyway, "
            "create it explicitly (init_run(..., create=True) or `repro init --force`)",
            argument="root")


class SqliteEngine:
    """Opening rules, transactions and the connection of one ``registry.sqlite``."""

    dialect = "sqlite"

    def __init__(self, path: Path, *, algorithm: str, create: bool | None,
                 readonly: bool) -> None:
        self.path = path
        self.root = path.parent
        self.readonly = readonly
        self._algorithm = algorithm
        self._create = create
        self._conn_obj: sqlite3.Connection | None = None
        self._pid = -1
        self._abandoned: list[sqlite3.Connection] = []

    @property
    def location(self) -> str:
        return str(self.path)

    def connection(self) -> sqlite3.Connection:
        if self._conn_obj is None or self._pid != os.getpid():
            if self._conn_obj is not None:
                # Inherited across fork: never use or close it here (SQLite forbids both).
                self._abandoned.append(self._conn_obj)
            self._conn_obj = self._open_readonly() if self.readonly else self._open()
            self._pid = os.getpid()
        return self._conn_obj

    @contextlib.contextmanager
    def borrow(self) -> Iterator[sqlite3.Connection]:
        yield self.connection()

    @contextlib.contextmanager
    def begun(self, *, exclusive: bool = True) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` always: SQLite has one writer at a time whatever is asked."""
        conn = self.connection()
        conn.execute("BEGIN IMMEDIATE")
        yield conn

    @staticmethod
    def lost(exc: BaseException | None) -> bool:
        return False  # a file does not go away between two statements

    def rollback(self, conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")

    def close(self) -> None:
        if self._conn_obj is not None and self._pid == os.getpid():
            self._conn_obj.close()
        self._conn_obj = None

    def integrity_check(self) -> str:
        return str(self.connection().execute("PRAGMA integrity_check").fetchone()[0])

    @contextlib.contextmanager
    def publish_guard(self, *, exclusive: bool = False) -> Iterator[None]:
        """Nothing beyond the store's own ``.gc.lock``: one SQLite file, one machine."""
        yield

    def _check_present(self) -> bool:
        """True if a registry file with content is there; raise when one must not be made."""
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            size = -1
        except OSError as exc:
            raise StorageError(f"cannot open registry {self.path}: {exc}",
                               path=self.path) from exc
        if size > 0:
            return True
        if self._create is True:
            return False
        has_data = self.root.exists() and store_has_data(self.root)
        if not has_data and self._create is None:
            if self.root.exists():
                _refuse_foreign_directory(self.root)
            return False
        if not has_data:  # create=False: nothing to open, nothing lost
            raise StoreNotFoundError(f"no repro store at {self.root}", path=self.root)
        state = "is empty (0 bytes)" if size == 0 else "is missing"
        raise RegistryDamagedError(
            f"{self.path} {state}, but the store holds blobs or run exports: the registry was "
            f"lost. Rebuild it with `repro recover --root {self.root}` (or start an empty one "
            f"with `repro init --force --root {self.root}`)", path=self.path)

    def _open(self) -> sqlite3.Connection:
        existed = self._check_present()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, factory=SqliteConnection,
                                   timeout=constants.SQLITE_BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"cannot open registry {self.path}: {exc}", path=self.path) from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {constants.SQLITE_BUSY_TIMEOUT_MS}")
            self._configure_journal(conn)
            self._migrate(conn, existed)
            conn.execute("PRAGMA foreign_keys = ON")
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise self._classify(exc) from exc
            raise
        return conn

    def _classify(self, exc: sqlite3.DatabaseError) -> StorageError:
        """A damaged file (recover it) is not the same as a store we may not write (use it
        read-only) or a failing disk: say which, so the advice fits."""
        text = str(exc).lower()
        if any(word in text for word in _DAMAGE):
            return self._damaged(exc)
        if "readonly" in text or "read-only" in text or "unable to open" in text:
            return StorageError(
                f"cannot write the store {self.root} ({exc}): it is read-only for this user. "
                "Reading works without a run (use_artifact, repro runs); to log, use a "
                "writable store", path=self.path)
        return StorageError(f"cannot open registry {self.path}: {exc}", path=self.path)

    def _damaged(self, exc: BaseException) -> RegistryDamagedError:
        return RegistryDamagedError(
            f"{self.path} is not a readable repro registry ({exc}). Rebuild it from the run "
            f"exports and blobs with `repro recover --root {self.root}`", path=self.path)

    def _open_readonly(self) -> sqlite3.Connection:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            if store_has_data(self.root):
                self._create = False
                self._check_present()  # raises RegistryDamagedError with the recovery line
            raise StoreNotFoundError(
                f"no repro store at {self.root} (no registry.sqlite); pass --root / root= or "
                "set REPRO_HOME", path=self.root)
        uri = f"file:{quote(str(self.path.absolute()))}"
        try:
            conn = _connect_ro(uri + "?mode=ro")
        except sqlite3.OperationalError:
            # A WAL database in a directory nobody may write cannot get its -shm file; the
            # store cannot change under us there, so SQLite may treat it as immutable.
            try:
                conn = _connect_ro(uri + "?immutable=1")
            except sqlite3.DatabaseError as exc:
                raise self._damaged(exc) from exc
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from exc
        try:
            return self._readonly_schema(conn)
        except BaseException as exc:
            conn.close()
            if isinstance(exc, sqlite3.DatabaseError):
                raise self._damaged(exc) from exc
            raise

    def _readonly_schema(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        """Refuse a newer schema; bring an older one up to date in a private in-memory copy."""
        current = _schema_version(conn)
        if current == SCHEMA_VERSION:
            return conn
        if current == 0:  # a non-empty SQLite file without our schema: not a registry
            raise sqlite3.DatabaseError("it has no repro schema_version")
        if current > SCHEMA_VERSION:
            raise StorageError(self._too_new(current), path=self.path)
        memory = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False,
                                 factory=SqliteConnection)
        conn.backup(memory)
        conn.close()
        self._migrate(memory, existed=True)
        return memory

    def _too_new(self, current: int) -> str:
        return (f"registry {self.path} has schema v{current}, newer than this repro "
                f"(v{SCHEMA_VERSION}); upgrade repro-lightning")

    def _configure_journal(self, conn: sqlite3.Connection) -> None:
        fstype = detect_network_fs(self.root)
        if fstype:
            warnings.warn(
                f"repro store {self.root} is on a network filesystem ({fstype}); SQLite "
                "WAL does not work there, so the registry uses a rollback journal. Concurrent "
                "writers from several machines are not safe: keep the store on a local disk "
                "and sync blobs to object storage instead.",
                RuntimeWarning,
                stacklevel=5,
            )
            conn.execute("PRAGMA journal_mode = DELETE")
        else:
            retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL"))
        sync = "FULL" if constants.REPRO_FSYNC == "full" else "OFF"
        conn.execute(f"PRAGMA synchronous = {sync}")

    def _migrate(self, conn: sqlite3.Connection, existed: bool) -> None:
        """Create a new registry at the current schema, or upgrade an older one in place."""
        conn.execute("PRAGMA foreign_keys = OFF")  # table rebuilds need it off (SQLite docs)
        conn.execute("BEGIN IMMEDIATE")
        try:
            current = _schema_version(conn)
            if current == 0 and existed:
                raise sqlite3.DatabaseError("it has content but no repro schema_version")
            if current > SCHEMA_VERSION:
                raise StorageError(self._too_new(current), path=self.path)
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            for step in migrations(current):
                step(conn)
            if current == 0:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                conn.execute("INSERT INTO store_meta (key, value) VALUES ('hash_algorithm', ?)",
                             (self._algorithm,))
            elif current < SCHEMA_VERSION:
                conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _connect_ro(uri: str) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, factory=SqliteConnection, isolation_level=None,
                           check_same_thread=False,
                           timeout=constants.SQLITE_BUSY_TIMEOUT_MS / 1000)
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # fails now if unreadable
    return conn


def _schema_version(conn: sqlite3.Connection) -> int:
    has_table = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND"
                             " name = 'schema_version'").fetchone()
    if not has_table:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    if row is None or not isinstance(row[0], int):
        raise sqlite3.DatabaseError("its schema_version row is missing or forged")
    return row[0]
