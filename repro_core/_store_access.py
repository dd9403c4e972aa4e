"""How the manager reaches its store: opened for writing only when it writes, read-only
otherwise, and re-checked when a run starts.

- **Read-only calls never create a store**: ``use_artifact`` with no active run, in an empty
  folder, used to create ``./repro_store``. Reads without a run open the registry read-only
  (and work on a ``chmod -R a-w`` archive); a missing store is ``StoreNotFoundError``.
- **The store may be replaced under a live process** (``rm -rf repro_store`` in a notebook
  between runs): ``init_run`` checks that the registry file at the path is still the one it
  holds (device, inode and store id) and reopens it otherwise, instead of writing on into an
  unlinked file.
- **Opening for writing** marks runs whose process died as CRASHED and imports metrics that a
  failed finalize spilled to disk.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

from . import constants
from .errors import InvalidArgumentError, ReproError, RunStateError, StoreNotFoundError
from .registry import Registry
from .store.local import LocalStorageBackend
from .types import Run

__all__ = ["StoreAccess", "default_root"]


def default_root() -> Path:
    return Path(constants.REPRO_HOME or constants.DEFAULT_HOME).expanduser().absolute()


class StoreAccess:
    """The store half of ``ArtifactManager`` (a mixin: the manager owns the lock and run)."""

    _lock: threading.RLock
    _run: Run | None
    _root: Path | None
    _store: LocalStorageBackend | None
    _registry: Registry | None
    _reader: Registry | None
    _identity: tuple[int, int, str | None] | None

    def _init_store_access(self) -> None:
        self._root = None
        self._store = None
        self._registry = None
        self._reader = None
        self._identity = None

    @property
    def root(self) -> Path:
        """The store this manager writes to (the active run's, else ``REPRO_HOME``)."""
        return self._root or default_root()

    def set_root(self, root: str | Path) -> None:
        """Point the manager at another store; refused while a run is active."""
        with self._lock:
            if self._run is not None:
                raise RunStateError(
                    f"run {self._run.id} is active on {self.root}; finalize_run() first")
            new_root = _check_root(root)
            if new_root != self._root:
                self._close_store()
                self._root = new_root

    def _open(self, *, create: bool | None = None) -> tuple[LocalStorageBackend, Registry]:
        """The store and registry for writing (created only where the store holds no data,
        or with ``create=True``)."""
        with self._lock:
            if self._store is None or self._registry is None:
                root = self.root
                registry = Registry(root / "registry.sqlite", algorithm=constants.REPRO_HASH,
                                    create=create)
                try:
                    registry.open()
                    store = LocalStorageBackend(root, algorithm=registry.hash_algorithm())
                    store.ensure_layout()
                    store.sweep_tmp()
                    self._after_open(registry)
                except BaseException:
                    registry.close()
                    raise
                self._close_reader()
                self._root, self._store, self._registry = root, store, registry
                self._identity = _identity(registry)
            return self._store, self._registry

    def _after_open(self, registry: Registry) -> None:
        """Housekeeping a writer does on open: runs whose process died become CRASHED, and
        metrics a failed finalize spilled to ``spill/`` are imported (exactly once)."""
        from .metrics import import_spills

        registry.mark_crashed_runs()
        import_spills(registry)

    def _read_registry(self) -> Registry:
        """The writer's registry when open, else a read-only one (never creates a store)."""
        with self._lock:
            if self._registry is not None:
                return self._registry
            if self._reader is None:
                root = self.root
                if not (root / "registry.sqlite").exists() and not root.is_dir():
                    raise StoreNotFoundError(
                        f"no repro store at {root}; log something first, or point to the "
                        "store with init_run(root=...), set_root() or REPRO_HOME", path=root)
                reader = Registry(root / "registry.sqlite", readonly=True)
                reader.open()
                self._reader = reader
            return self._reader

    def _read_store(self) -> LocalStorageBackend:
        """The blob store for reading (its layout is not created)."""
        with self._lock:
            if self._store is not None:
                return self._store
            return LocalStorageBackend(self.root,
                                       algorithm=self._read_registry().hash_algorithm())

    def store(self) -> LocalStorageBackend:
        """The blob store (opened for writing on first use). For integrations."""
        return self._open()[0]

    def registry(self) -> Registry:
        """The registry (opened for writing on first use). For integrations and queries."""
        return self._open()[1]

    @property
    def storage_backend(self) -> LocalStorageBackend:
        """The blob store of this manager's store (the seed's read-only attribute): the open
        one, else one with the store's own digest algorithm (nothing is created)."""
        with self._lock:
            try:
                return self._read_store()
            except ReproError:  # no store (yet): what a new one would be
                return LocalStorageBackend(self.root)

    def _check_store_identity(self) -> None:
        """Reopen when the registry file at the path is no longer the one we hold."""
        with self._lock:
            if self._registry is None or self._identity is None:
                self._close_reader()
                return
            try:
                current = _identity(self._registry, reopen=True)
            except (OSError, ReproError):
                current = None
            if current != self._identity:
                warnings.warn(
                    f"the repro store at {self.root} was removed or replaced since this "
                    "process opened it; reopening it", RuntimeWarning, stacklevel=4)
                self._close_store()

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def _close_store(self) -> None:
        if self._registry is not None:
            self._registry.close()
        self._close_reader()
        self._store = self._registry = None
        self._identity = None


def _check_root(root: object) -> Path:
    """A store root: a non-empty path (``""`` would make the current directory a store)."""
    if not isinstance(root, (str, os.PathLike)) or not str(os.fspath(root)).strip() \
            or "\x00" in str(os.fspath(root)):
        raise InvalidArgumentError(f"root must be a non-empty path, got {root!r}",
                                   argument="root")
    return Path(os.fspath(root)).expanduser().absolute()


def _identity(registry: Registry, *, reopen: bool = False) -> tuple[int, int, str | None]:
    """(device, inode, store id) of the registry file now at the registry's path (for a
    PostgreSQL registry: of the store's ``registry.url``, which names it)."""
    st = os.stat(registry.identity_file)
    if not reopen:
        return st.st_dev, st.st_ino, registry.store_id()
    probe = Registry(registry.path, readonly=True)
    try:
        return st.st_dev, st.st_ino, probe.store_id()
    finally:
        probe.close()
