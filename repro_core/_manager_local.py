"""The manager's rank-local reads and placements (a mixin of ``ArtifactManager``).

Every other manager call is answered by rank 0 and shared (``distributed``). These are not:
each process does them itself, records nothing, and never waits for another rank. They exist
for code that runs where the exchange cannot help:

- before the process group exists (``repro_lightning.checkpoint_path("checkpoint:best")`` is
  evaluated by every rank of a DDP launch before ``Trainer.fit`` starts the group);
- in a host's rank-0-only code path (Lightning calls its ``CheckpointIO`` on global rank 0
  only) that must put a file somewhere without a second copy;
- while loading a checkpoint on every rank, to check it is the one the store logged.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import constants
from ._artifacts import ArtifactWriter, metadata_from_row
from ._safepath import refuse_inside
from .errors import (
    ArtifactNotFoundError,
    IntegrityError,
    InvalidArgumentError,
    StorageError,
    StoreNotFoundError,
)
from .hashing import hash_file
from .registry import Registry, VersionRow
from .store.local import LocalStorageBackend
from .types import ArtifactMetadata, ArtifactType, ParsedKey, Run, parse_key

__all__ = ["LocalReads"]


class LocalReads:
    """Rank-local methods of ``ArtifactManager``; the manager provides what is declared."""

    _lock: threading.RLock
    _run: Run | None
    _read_store: Callable[[], LocalStorageBackend]
    _read_registry: Callable[[], Registry]
    _resolve: Callable[[Any, ParsedKey], VersionRow]

    def artifact_path(self, key: str, type: ArtifactType | str | None = None, *,
                      verify: bool | None = None) -> Path:
        """The checked local path of a logged version, read by this process whatever its
        rank, recording nothing (``use_artifact`` records the use and is answered by rank 0).
        The size is always checked, the digest unless ``verify=False``/``REPRO_VERIFY=size``."""
        path = self.artifact_metadata(key, type, verify=verify).path
        assert path is not None  # (check_content always gives one)
        return path

    def artifact_metadata(self, key: str, type: ArtifactType | str | None = None, *,
                          verify: bool | None = None) -> ArtifactMetadata:
        """``artifact_path`` with the version's metadata (``.path`` is the checked path):
        rank-local, for code every rank runs that needs what was logged with the version
        (an Accelerate state's run and step), before or without a process group."""
        parsed = parse_key(key)
        wanted = ArtifactType.coerce(type) if type is not None else None
        if verify is not None and not isinstance(verify, bool):
            raise InvalidArgumentError(f"verify must be True, False or None, got {verify!r}",
                                       argument="verify")
        full = (constants.REPRO_VERIFY == "full") if verify is None else verify
        store, registry = self._read_store(), self._read_registry()
        row = self._live_row(registry, parsed)
        if wanted is not None and row.type != wanted.value:
            raise ArtifactNotFoundError(
                f"{row.key} is a {row.type!r} artifact, not {wanted.value!r}", key=row.key)
        path = ArtifactWriter.check_content(store, registry, row, full=full)
        return metadata_from_row(registry, row, path)

    def identify_file(self, path: str | os.PathLike[str], name: str
                      ) -> ArtifactMetadata | None:
        """The version of artifact ``name`` whose content is the file at ``path`` (hashed
        now, with the store's algorithm), or None when no version of ``name`` holds it — a
        pruned version included (its content is gone from the store, not from this file).
        No store at all is ``StoreNotFoundError``."""
        parse_key(name)  # validates the name before any I/O
        registry = self._read_registry()
        digest = hash_file(path, registry.hash_algorithm())
        try:
            row = self._resolve(registry, parse_key(f"{name}@{digest}"))
        except ArtifactNotFoundError:
            return None
        return metadata_from_row(registry, row, None)  # (a pruned version's intact file too)

    def has_run(self, run_id: str) -> bool:
        """Whether the store records a run with exactly this id (False without a store)."""
        try:
            return self._read_registry().has_run(run_id)
        except StoreNotFoundError:
            return False

    def link_version(self, key: str, dest: str | os.PathLike[str]) -> Path:
        """Put a logged file version at ``dest`` without a second copy: a hard link to its
        read-only blob, or a symbolic link to the blob where ``dest`` is on another file
        system. ``dest`` is replaced atomically (a new name is linked, then renamed over it),
        so whatever was at ``dest`` before — another version's link included — is never
        written into. A chunked version has no blob to link: it is put together at ``dest``
        (one write, read-only, hash-checked). Rank-local, records nothing."""
        store, registry = self._read_store(), self._read_registry()
        row = self._live_row(registry, parse_key(key))
        if row.format == "directory":
            raise InvalidArgumentError(f"{row.key} is a directory; link_version places files",
                                       argument="key")
        place = Path(os.fspath(dest)).absolute()
        refuse_inside(place, store.root, argument="dest")
        if place.is_dir() and not place.is_symlink():
            raise InvalidArgumentError(f"{place} is a directory; link_version replaces a file "
                                       "(or makes a new one)", argument="dest")
        if row.manifest is not None:  # chunked: no blob to link; put together at dest
            from .chunks.serve import assemble_to

            target = Path(os.fspath(dest)).absolute()
            assemble_to(store, registry, row, target)
            return target
        blob = store.blob_path(row.digest)
        try:
            size = os.stat(blob).st_size
        except OSError as exc:
            raise IntegrityError(f"the blob of {row.key} is missing ({exc}); run `repro "
                                 "verify`", digest=row.digest, path=blob) from exc
        if size != row.size:  # (the content was hashed when logged; this is cheap insurance)
            raise IntegrityError(f"the blob of {row.key} has {size} bytes, not {row.size}",
                                 digest=row.digest, path=blob)
        target = Path(os.fspath(dest)).absolute()
        _place_link(blob, target)
        return target

    def _live_row(self, registry: Registry, parsed: ParsedKey) -> VersionRow:
        row = self._resolve(registry, parsed)
        if row.pruned_at is not None:
            raise ArtifactNotFoundError(f"{row.key} was pruned at {row.pruned_at}; its content "
                                        "is not served", key=row.key)
        return row


def _place_link(blob: Path, target: Path) -> None:
    """Link ``blob`` at ``target`` via a unique temporary name and ``os.replace``."""
    temp = target.with_name(f".{target.name}.repro-{secrets.token_hex(6)}")
    try:
        try:
            os.link(blob, temp)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
            os.symlink(blob, temp)  # another file system: no hard link possible
        os.replace(temp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise StorageError(f"cannot place {target} (a link to {blob}): {exc}",
                           path=target) from exc
