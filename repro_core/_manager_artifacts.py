"""The manager's artifact API: log, use and load versions (a mixin of ``ArtifactManager``).

Order of every write, and why:

1. validate every argument (names, types, metadata, parents, data) — nothing touches disk
   before the call is known to be acceptable;
2. stream the content into a blob (temp file → fsync → rename) *without* holding the manager's
   lock, so a 50 GB checkpoint does not stall metric logging in other threads;
3. commit the registry row in one transaction (version number assigned inside it);
4. append the version to the run's journal (``_journal``: what ``repro recover`` reads).

A crash between 2 and 3 leaves an unreferenced blob (``repro gc`` removes it), never a row
whose blob is missing or a half-written blob.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import constants, distributed
from ._artifacts import ArtifactWriter, metadata_from_row
from ._journal import append_event
from ._safepath import refuse_inside
from .distributed import Exchange
from .errors import ArtifactNotFoundError, InvalidArgumentError, StorageError
from .registry import Registry, VersionRow
from .serialize import load_payload
from .store.local import LocalStorageBackend
from .types import ArtifactMetadata, ArtifactType, ParsedKey, Run, parse_key, utc_now

if TYPE_CHECKING:
    from .chunks.manifest import ChunkManifest

__all__ = ["ArtifactsAPI"]


class ArtifactsAPI:
    """Artifact methods of ``ArtifactManager``; the manager provides what is declared here."""

    _lock: threading.RLock
    _run: Run | None
    _exchange: Exchange
    _open: Callable[..., tuple[LocalStorageBackend, Registry]]
    _read_store: Callable[[], LocalStorageBackend]
    _read_registry: Callable[[], Registry]
    _resolve: Callable[[Any, ParsedKey], VersionRow]
    _require_run: Callable[[str], Run]

    def log_artifact(
        self,
        name: str,
        type: ArtifactType | str,
        data: Any | None = None,
        file_path: str | Path | None = None,
        metadata: dict[str, Any] | None = None,
        parent_artifacts: list[str] | None = None,
        *,
        aliases: Sequence[str] | None = None,
    ) -> ArtifactMetadata:
        """Log an artifact with automatic versioning and lineage tracking.

        Give exactly one of ``data`` (dict/list, str, bytes, tensor dict, numpy array) or
        ``file_path`` (a file or a directory). Content identical to ``latest`` returns that
        version instead of creating a new one.
        """
        with self._lock:
            run = self._require_run("log_artifact")
        def validate_and_write() -> ArtifactMetadata:
            # Validated on rank 0 only: a check that reads the filesystem (file_path) could
            # disagree on another rank, and rank 0's verdict reaches every rank anyway.
            writer = ArtifactWriter.validate(name, type, data, file_path, metadata,
                                             parent_artifacts, aliases)
            store, registry = self._open()
            meta, row, created, linked = writer.write(store, registry, run.id, run.project)
            if run.id is not None:
                _journal(store.root, run.id,
                         _version_event(registry, row, meta, created, linked))
            self._mirror_submit("version", str(row.id))  # type: ignore[attr-defined]
            return meta

        # metadata is left out of the fingerprint: it may differ between ranks (a timestamp,
        # a local loss) without changing the answer (same content = same version).
        call = distributed.Call("log_artifact", name, {
            "type": type, "data": data, "file_path": file_path,
            "parent_artifacts": parent_artifacts, "aliases": aliases,
        })
        result = self._exchange.run_on_zero(
            call, validate_and_write,
            encode=ArtifactMetadata.to_dict, decode=ArtifactMetadata.from_dict,
        )
        return result  # type: ignore[return-value]

    def log_large_artifact(
        self,
        name: str,
        file_path: str | Path,
        type: ArtifactType | str = ArtifactType.MODEL,
        metadata: dict[str, Any] | None = None,
        chunk_size: int = 8192,
    ) -> ArtifactMetadata:
        """Log a large file by streaming it (never loaded in memory).

        ``chunk_size`` is accepted for compatibility; repro always copies with 16 MiB buffers,
        because 8 KiB reads would make hashing several times slower.
        """
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise InvalidArgumentError(
                f"chunk_size must be a positive int, got {chunk_size!r}", argument="chunk_size"
            )
        if file_path is None:
            raise InvalidArgumentError("log_large_artifact needs file_path", argument="file_path")
        return self.log_artifact(name, type, file_path=file_path, metadata=metadata)

    def use_artifact(
        self,
        name: str,
        version: str | None = None,
        type: ArtifactType | str | None = None,
        *,
        verify: bool | None = None,
        copy: bool | None = None,
        copy_to: str | Path | None = None,
    ) -> ArtifactMetadata:
        """Retrieve a logged artifact, check it, and record that the active run used it.

        ``name`` may be a full key (``project/data:v3``, ``data:best``, ``data@blake3:9f2c``)
        or a bare name with ``version`` (``"v3"``, ``"3"``, an alias, or ``"blake3:<prefix>"``).
        A bare name resolves in the active run's project, then ``default``. The size is always
        checked; the digest too unless ``verify=False`` or ``REPRO_VERIFY=size``. ``path`` is a
        read-only file (named as it was logged) or directory; ``copy=True`` (or
        ``REPRO_MATERIALIZE=copy``) gives a private writable copy instead, for code that writes
        into what it loads; ``copy_to`` puts that copy at a path of yours (which must not exist
        yet; the way to get a directory out of a read-only store). Without an active run
        nothing is recorded and no store is created.
        """
        key = parse_key(name, version)
        wanted = ArtifactType.coerce(type) if type is not None else None
        full = (constants.REPRO_VERIFY == "full") if verify is None else _flag(verify, "verify")
        private = (constants.REPRO_MATERIALIZE == "copy") if copy is None else _flag(copy, "copy")
        dest = _check_dest(copy_to)
        if dest is not None and copy is False:
            raise InvalidArgumentError("copy_to= asks for a copy; drop copy=False",
                                       argument="copy")
        with self._lock:
            run = self._run
        result = self._exchange.run_on_zero(
            distributed.Call("use_artifact", name, {"version": version, "type": type}),
            lambda: self._use(key, wanted, full, private, run, dest),
            encode=ArtifactMetadata.to_dict, decode=ArtifactMetadata.from_dict,
        )
        return result  # type: ignore[return-value]

    def _use(self, key: ParsedKey, wanted: ArtifactType | None, full: bool, private: bool,
             run: Run | None, dest: Path | None = None, *,
             serve: bool = True,
             found: list[ChunkManifest] | None = None) -> ArtifactMetadata:
        """``use_artifact`` on rank 0. ``serve=False`` (``load_artifact``): a chunked
        safetensors version is checked but not put together (its ``path`` is None)."""
        recording = run is not None and run.id is not None
        store, registry = self._open() if recording else (self._read_store(),
                                                            self._read_registry())
        if dest is not None:
            refuse_inside(dest, store.root, argument="copy_to")
        row = self._resolve(registry, key)
        if row.pruned_at is not None:
            raise ArtifactNotFoundError(
                f"{row.key} was pruned at {row.pruned_at} (its content may be garbage-collected);"
                " its lineage is kept, its content is not served", key=row.key)
        if wanted is not None and row.type != wanted.value:
            raise ArtifactNotFoundError(
                f"{row.key} is a {row.type!r} artifact, not {wanted.value!r}", key=row.key)
        if registry.engine == "postgresql":  # a shared registry: another host's blobs
            from .remote._fetch import fetch_missing

            fetch_missing(store, registry, row)
        if not serve and row.manifest is not None and row.format == "safetensors":
            path = None  # load_artifact maps the parts (checked here, as a use checks)
            manifest = _check_chunked(store, registry, row, full)
            if found is not None:
                found.append(manifest)
        else:
            path = ArtifactWriter.check_content(store, registry, row, full=full, copy=private,
                                                dest=dest)
        # record_use adds no edge for a run reading back what it logged (that would be a
        # lineage cycle); the journal records only an edge that was added.
        if recording and run is not None and run.id is not None \
                and registry.record_use(run.id, row.id):
            _journal(store.root, run.id, {"event": "use", "at": utc_now(), "key": row.key,
                                          "digest": row.digest})
        return metadata_from_row(registry, row, path)

    def prune_version(self, key: str) -> ArtifactMetadata:
        """Release one version's content: its aliases are dropped (``latest`` moves to the
        newest version left), ``repro gc`` may then reclaim the blobs no other version needs,
        and ``use_artifact`` refuses it; the version number and its lineage edges stay. What
        ``ReproCallback(prune="mirror")`` does when Lightning deletes a top-k checkpoint."""
        parsed = parse_key(key)
        with self._lock:
            run = self._run

        def prune() -> ArtifactMetadata:
            store, registry = self._open()
            row = self._resolve(registry, parsed)
            aliases = registry.prune_version(row.id)
            event = {"event": "prune", "at": utc_now(), "key": row.key, "digest": row.digest,
                     "aliases": aliases}
            # Journaled by the active run, else beside the version in its producer's journal:
            # gc releases the blobs, and ``repro recover`` rebuilds the prune, only from there.
            journal_run = run.id if run is not None and run.id is not None else row.run_id
            if journal_run is not None:
                _journal(store.root, journal_run, event)
            return metadata_from_row(registry, registry.get_version(row.id), None)

        result = self._exchange.run_on_zero(
            distributed.Call("prune_version", key), prune,
            encode=ArtifactMetadata.to_dict, decode=ArtifactMetadata.from_dict)
        return result  # type: ignore[return-value]

    def load_artifact(self, name: str, version: str | None = None) -> Any:
        """``use_artifact`` and load the content back into the object that was logged
        (dict/list, str, bytes, tensor dict, numpy array; a ``Path`` for files/directories)."""
        key = parse_key(name, version)
        full = constants.REPRO_VERIFY == "full"
        private = constants.REPRO_MATERIALIZE == "copy"
        with self._lock:
            run = self._run

        def use() -> tuple[ArtifactMetadata, ChunkManifest | None]:
            found: list[ChunkManifest] = []
            meta = self._use(key, None, full, private, run, serve=False, found=found)
            return meta, (found[0] if found else None)

        # Rank 0 resolves, checks and records the use; the other ranks get the checked
        # manifest with the answer and map the parts themselves (no registry on their side).
        meta, manifest = self._exchange.run_on_zero(
            distributed.Call("load_artifact", name, {"version": version}), use,
            encode=_encode_loaded, decode=_decode_loaded)  # type: ignore[misc]
        if manifest is None:
            assert meta.path is not None and meta.format is not None
            return load_payload(meta.path, meta.format, digest=meta.hash)
        from .chunks.read import load_tensors

        return load_tensors(self._read_store(), manifest, full=False, key=meta.key,
                            check=False)


def _encode_loaded(answer: tuple[ArtifactMetadata, ChunkManifest | None]) -> dict[str, Any]:
    from .chunks.manifest import encode

    meta, manifest = answer
    return {"meta": meta.to_dict(),
            "manifest": None if manifest is None else encode(manifest).decode("utf-8")}


def _decode_loaded(data: dict[str, Any]) -> tuple[ArtifactMetadata, ChunkManifest | None]:
    from .chunks.manifest import parse_manifest

    raw = data["manifest"]
    return (ArtifactMetadata.from_dict(data["meta"]),
            None if raw is None else parse_manifest(raw.encode("utf-8")))


def _check_chunked(store: LocalStorageBackend, registry: Registry, row: VersionRow,
                   full: bool) -> ChunkManifest:
    from . import _progress
    from .chunks.assemble import check_content
    from .chunks.read import manifest_of

    with _progress.tracked(row.size * int(full), f"checking {row.key}"):
        manifest = manifest_of(store, registry, row, full=full)
        check_content(store, manifest, full=full)
    return manifest


def _journal(root: Path, run_id: str, event: dict[str, Any]) -> None:
    """Append to the run's journal. The registry row is committed and is the truth; the
    journal is its spare copy for ``repro recover``, so failing to append is a warning (the
    call's result stands), never a lost or half-reported write."""
    try:
        append_event(root, run_id, event)
    except StorageError as exc:
        warnings.warn(f"repro: {event['event']} of run {run_id} is recorded, but its journal "
                      f"line was not ({exc}); `repro recover` would not see it",
                      RuntimeWarning, stacklevel=4)


def _version_event(registry: Registry, row: VersionRow, meta: ArtifactMetadata,
                   created: bool, linked: bool) -> dict[str, Any]:
    """What the run journal keeps of one logged version (``repro recover`` reads it back)."""
    return {"event": "version", "at": utc_now(), "created": created,
            "linked": linked, "project": row.project,
            "name": row.name, "version": row.version, "type": row.type, "digest": row.digest,
            "size": row.size, "format": row.format, "filename": row.filename,
            "metadata": row.metadata, "created_at": row.created_at,
            "parents": list(meta.parent_artifacts), "aliases": list(meta.aliases),
            "blobs": [list(b) for b in registry.blobs_of(row.id)], "manifest": row.manifest}


def _flag(value: object, name: str) -> bool:
    """A yes/no argument: ``verify="no"`` would be truthy, so only real bools are taken."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"{name} must be True, False or None, got {value!r}",
                                   argument=name)
    return value


def _check_dest(copy_to: object) -> Path | None:
    if copy_to is None:
        return None
    if not isinstance(copy_to, (str, Path)) or "\x00" in str(copy_to):
        raise InvalidArgumentError(f"copy_to must be a path, got {copy_to!r}",
                                   argument="copy_to")
    dest = Path(copy_to).expanduser().absolute()
    if dest.exists() or dest.is_symlink():
        raise InvalidArgumentError(f"copy_to={str(dest)!r} already exists; repro never "
                                   "overwrites a path of yours", argument="copy_to")
    return dest


