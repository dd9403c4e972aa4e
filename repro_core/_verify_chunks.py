"""What ``verify_store`` reads of manifests: every directory manifest and chunk manifest in
scope, read once, and each chunked file hashed through its parts.

A part of chunked content (``chunks``) is a blob like any other, but hashing each part alone
proves only that the blobs are intact, not that the manifest lists the right blobs in the
right order — a forged manifest naming genuine parts of the version would pass, and loading
would give other tensors. So a full verify hashes each chunked file (a version's, or one file's
of a directory version) *through its parts*, in order, against the whole-file digest the
registry records: exactly what loading it gives back. Only when that fails are its parts hashed
one by one, to name the bad one. Each chunked file's bytes are read once (as for a store
written before chunking); a manifest shared by several versions, once.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from ._safepath import check_digest, closing_fd
from .chunks.manifest import ChunkManifest
from .chunks.read import check_layout, read_chunk_manifest
from .directory import check_manifest_row, read_manifest
from .errors import IntegrityError, StorageError
from .hashing import new_hasher, parse_digest
from .registry import Registry, VersionRow
from .store.local import LocalStorageBackend

__all__ = ["ChunkedFile", "ManifestError", "Manifests", "hash_through_parts", "read_manifests"]


@dataclass(frozen=True)
class ChunkedFile:
    """One chunked file whose manifest read back well: a version's content (``file`` None)
    or one file of a directory version."""

    version: str
    file: str | None
    digest: str  # the whole file's, as the registry (or the directory manifest) records it
    size: int
    manifest_digest: str
    manifest: ChunkManifest

    @property
    def of(self) -> str:
        """`` of file 'x'`` for a directory's file, else nothing (for labels)."""
        return "" if self.file is None else f" of file {self.file!r}"


@dataclass(frozen=True)
class ManifestError:
    """A manifest ``use_artifact`` would refuse: ``digest`` is the manifest's blob,
    ``label`` what it is ("chunk manifest", "chunk manifest of file 'x'"; empty for a
    directory's manifest)."""

    digest: str
    version: str
    label: str
    message: str


@dataclass
class Manifests:
    files: list[ChunkedFile] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)

    def parts(self) -> dict[str, int]:
        """Every part blob of a manifest that read back well, with its size."""
        return {d: n for f in self.files for d, n in f.manifest.blobs()}


def read_manifests(store: LocalStorageBackend, registry: Registry,
                   only: int | None) -> Manifests:
    """Every manifest of the live versions in scope (all, or version ``only``): each one
    parseable and describing its content, every file or part a blob the version records.
    Nothing is reported here; a manifest blob that is missing or corrupt also fails its own
    blob check, and ``verify_store`` reports it once, there."""
    out = Manifests()
    for row in registry.list_versions():
        if only not in (None, row.id) or row.pruned_at is not None:
            continue  # pruned: its blobs may be gone, on purpose
        if row.manifest is not None:
            _chunked(store, dict(registry.blobs_of(row.id)), out, row.key, None,
                     row.manifest, row.digest, row.size, row.format)
        elif row.format == "directory":
            _directory(store, dict(registry.blobs_of(row.id)), out, row)
    return out


def _directory(store: LocalStorageBackend, blobs: dict[str, int], out: Manifests,
               row: VersionRow) -> None:
    """A directory's manifest: a forged one could make a directory artifact write outside
    the store, so it must be one ``use_artifact`` accepts; then its chunked files."""
    try:
        digest = check_digest(row.digest, where=f"registry row {row.key}")
        manifest = read_manifest(store.blob_path(digest), digest=digest)
        check_manifest_row(manifest, digest, row.size, blobs)
    except (IntegrityError, StorageError) as exc:
        out.errors.append(ManifestError(row.digest, row.key, "", str(exc)))
        return
    for record in manifest.files:
        if record.chunks is not None:
            _chunked(store, blobs, out, row.key, record.path, record.chunks, record.digest,
                     record.size)


def _chunked(store: LocalStorageBackend, blobs: dict[str, int], out: Manifests, version: str,
             file: str | None, manifest_digest: str, digest: str, size: int,
             fmt: str | None = None) -> None:
    of = "" if file is None else f" of file {file!r}"
    try:
        manifest = read_chunk_manifest(store, blobs, manifest_digest, digest, size,
                                       full=False, key=f"{version}{of}")
        check_layout(store, manifest, f"{version}{of}", fmt)
    except (IntegrityError, StorageError, OSError) as exc:
        out.errors.append(ManifestError(manifest_digest, version, f"chunk manifest{of}",
                                        str(exc)))
        return
    out.files.append(ChunkedFile(version, file, digest, size, manifest_digest, manifest))


def hash_through_parts(store: LocalStorageBackend, item: ChunkedFile) -> str | None:
    """The digest of ``item``'s parts put together; None when a part is not a regular file
    of its size (its own check says which). Links are never followed."""
    hasher = new_hasher(parse_digest(item.digest)[0], parallel=True)
    for part in item.manifest.parts:
        try:
            fd = os.open(store.blob_path(part.digest),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return None
        with closing_fd(fd):
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != part.size:
                return None
            hasher.update_file(f"/proc/self/fd/{fd}")
    return hasher.digest()
