"""One ``log_artifact`` call, validated up front and then written (used by the manager).

Splitting *validate* (pure, no I/O) from *write* (blob, then registry row) is what lets the
manager promise that bad input never touches disk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from . import _progress, constants
from ._cache import serve_version
from .capture.scrub import scrub
from .chunks.ingest import SafetensorsSink
from .chunks.ingest import ingest_file as chunk_file
from .directory import ingest_directory, scan_directory
from .errors import InvalidArgumentError, MissingFileError, SerializationError
from .registry import NewVersion, Registry, VersionRow
from .serialize import Payload, canonical_json, prepare
from .store.local import LocalStorageBackend
from .types import (
    ArtifactMetadata,
    ArtifactType,
    ParsedKey,
    parse_key,
    validate_alias,
    validate_name,
)

__all__ = ["ArtifactWriter", "metadata_from_row"]


class _Content(NamedTuple):
    """What one ``log_artifact`` stored: the registry row's content columns."""

    digest: str
    size: int
    format: str
    blobs: list[tuple[str, int]]
    manifest: str | None = None
    chunked: bool = False  # the content, or a file of the directory, is stored chunked


@dataclass(frozen=True)
class ArtifactWriter:
    """A validated ``log_artifact`` request."""

    name: str
    type: ArtifactType
    payload: Payload | None
    file_path: Path | None
    metadata: dict[str, Any]
    parents: tuple[ParsedKey, ...]
    aliases: tuple[str, ...]

    @classmethod
    def validate(
        cls,
        name: object,
        type: object,
        data: object,
        file_path: object,
        metadata: object,
        parent_artifacts: object,
        aliases: object,
    ) -> ArtifactWriter:
        """Check every argument; raise a typed error naming the fix. No I/O beyond ``stat``."""
        validate_name(name)
        assert isinstance(name, str)
        artifact_type = ArtifactType.coerce(type)  # type: ignore[arg-type]
        if (data is None) == (file_path is None):
            raise InvalidArgumentError(
                "give exactly one of data= (an in-memory value) or file_path= (a file or "
                f"directory); got {'both' if data is not None else 'neither'}",
                argument="data",
            )
        payload = prepare(data) if data is not None else None
        path = _check_path(file_path) if file_path is not None else None
        meta = _check_metadata(metadata)
        parents = tuple(parse_key(k) for k in _check_list(parent_artifacts, "parent_artifacts"))
        alias_list = tuple(validate_alias(a) for a in _check_list(aliases, "aliases"))
        if "latest" in alias_list:
            raise InvalidArgumentError("'latest' is set automatically; drop it from aliases",
                                       argument="aliases")
        return cls(name, artifact_type, payload, path, meta, parents, alias_list)

    def write(self, store: LocalStorageBackend, registry: Registry, run_id: str | None,
              project: str) -> tuple[ArtifactMetadata, VersionRow, bool, bool]:
        """Blob(s) first, then one registry transaction. Returns the metadata, the row and
        whether a new version was made (False: same content as ``latest``), and whether the
        run is recorded as having logged it (``add_version``'s ``linked``)."""
        # Unknown parent or a type clash: an error before any content is written. Bare
        # parent names resolve in the project.
        parent_ids = [registry.resolve(p, project=project).id for p in self.parents]
        registry.check_type(project, self.name, self.type.value)
        # gc must not see the blob before its row (on any host sharing the registry).
        with store.publish_guard(), registry.publish_guard():
            content = self._store_content(store)
            row, created, linked = registry.add_version(NewVersion(
                name=self.name, type=self.type.value, digest=content.digest,
                size=content.size, format=content.format, run_id=run_id,
                metadata=self.metadata, parent_ids=parent_ids, aliases=self.aliases,
                blobs=content.blobs, project=project, filename=self._filename(content.format),
                manifest=content.manifest,
            ))
            # Chunked content is put together on first use, not here: logging a checkpoint
            # must not write it twice (its ``path`` is None until ``use_artifact``).
            path = None if content.chunked or row.manifest is not None else \
                self.check_content(store, registry, row, full=False)
        return metadata_from_row(registry, row, path), row, created, linked

    def _filename(self, fmt: str) -> str:
        """The name users see at the end of ``use_artifact(...).path``: the logged file's own
        name, or one made from the artifact name and format (tools look at extensions)."""
        if self.file_path is not None:
            return self.file_path.name
        if self.payload is not None and self.payload.filename is not None:
            return self.payload.filename
        return f"{self.name}{_EXTENSIONS.get(fmt, '')}"

    def _store_content(self, store: LocalStorageBackend) -> _Content:
        """Stream the content into blobs: one, a directory's, or a chunked file's parts and
        manifest (``chunks``: big safetensors per tensor, other big files by content)."""
        min_bytes = constants.REPRO_CHUNK_MIN_BYTES
        if self.payload is not None:
            if self.payload.format == "safetensors":
                return self._store_tensors(store, self.payload, min_bytes)
            with store.open_writer() as writer:
                self.payload.write(writer)
                digest, size = writer.commit()
            return _Content(digest, size, self.payload.format, [(digest, size)])
        assert self.file_path is not None
        if self.file_path.is_dir():
            total = _tree_size(self.file_path) if _progress.possible() else None
            with _progress.tracked(total, f"logging {self.name}/"):
                manifest = ingest_directory(store, self.file_path)
            return _Content(manifest.digest, manifest.total_size, "directory", manifest.blobs,
                            chunked=manifest.chunked)
        with _progress.tracked(_file_size(self.file_path), f"logging {self.file_path.name}"):
            chunked = chunk_file(store, self.file_path, min_bytes)
            if chunked is not None:
                return _Content(chunked.digest, chunked.size, "file", chunked.blobs,
                                chunked.manifest, chunked=True)
            digest, size = store.ingest_file(self.file_path)
        return _Content(digest, size, "file", [(digest, size)])

    @staticmethod
    def _store_tensors(store: LocalStorageBackend, payload: Payload,
                       min_bytes: int | None) -> _Content:
        sink = SafetensorsSink(store, min_bytes)
        try:
            payload.write(sink)
            digest, size, chunked = sink.commit()
        except BaseException:
            sink.abort()
            raise
        if chunked is None:
            return _Content(digest, size, payload.format, [(digest, size)])
        return _Content(digest, size, payload.format, chunked.blobs, chunked.manifest,
                        chunked=True)

    @staticmethod
    def check_content(store: LocalStorageBackend, registry: Registry, row: VersionRow,
                      *, full: bool, copy: bool = False, dest: Path | None = None) -> Path:
        """Size always, digest if ``full``; directories file by file. Returns the path users
        get: a read-only link named as logged, a directory generation, or with ``copy`` a
        private writable copy (at ``dest`` if given; ``_cache.serve_version``). The row is
        untrusted input."""
        copying = copy or dest is not None
        work = row.size * (int(full) + int(copying))  # hashing and copying both read it all
        with _progress.tracked(work, f"{'checking' if full else 'serving'} {row.key}"):
            return serve_version(store, registry, row, full=full, copy=copying, dest=dest,
                                 progress=_progress.report if copying else None)


def _file_size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _tree_size(root: Path) -> int:
    """Bytes under a directory (for the progress bar only; walked again when ingested)."""
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            total += _file_size(Path(dirpath) / name) or 0
    return total


_EXTENSIONS = {"json": ".json", "text": ".txt", "bytes": ".bin",
               "safetensors": ".safetensors", "npy": ".npy"}


def metadata_from_row(registry: Registry, row: VersionRow, path: Path | None) -> ArtifactMetadata:
    return ArtifactMetadata(
        name=row.name, type=ArtifactType.coerce(row.type), version=f"v{row.version}",
        hash=row.digest, size_bytes=row.size, created_at=row.created_at, run_id=row.run_id,
        parent_artifacts=[p.key for p in registry.parents_of(row.id)],
        metadata=row.metadata, aliases=registry.aliases_of(row.id), format=row.format,
        path=path, project=row.project,
    )


def _check_path(file_path: object) -> Path:
    if not isinstance(file_path, (str, Path)):
        raise InvalidArgumentError(
            f"file_path must be a str or Path, got {type(file_path).__name__}",
            argument="file_path",
        )
    if isinstance(file_path, str) and "\x00" in file_path:
        raise InvalidArgumentError("file_path contains a NUL byte", argument="file_path")
    path = Path(file_path).expanduser()
    if not path.exists():
        raise MissingFileError(f"file_path {str(path)!r} does not exist", path=path)
    if path.is_dir():
        scan_directory(path)  # refuses directory symlinks and special files before any write
    elif not path.is_file():
        raise InvalidArgumentError(f"{path} is neither a regular file nor a directory",
                                   argument="file_path")
    return path


def _check_metadata(metadata: object) -> dict[str, Any]:
    """Metadata is a record repro keeps (like a config), not the user's content: once it is
    known to be JSON (no cycles, bounded depth), secrets in it are redacted. The artifact's
    data itself is content-addressed and never altered."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise SerializationError(
            f"metadata must be a dict, got {type(metadata).__name__}", path="metadata"
        )
    canonical_json(metadata, root="metadata")
    return scrub(dict(metadata))


def _check_list(value: object, what: str) -> Sequence[Any]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise InvalidArgumentError(f"{what} must be a list, got {value!r}", argument=what)
    return value
