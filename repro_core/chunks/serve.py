"""Chunked versions served as files and trees (``_cache`` calls these for rows and
directory records that have a chunk manifest): checked part by part, put together once, and
hash-checked against the whole-file digest the version records."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

from .._cache import _NEW_FILE, Progress, _BlobIndex, _copy_out, _hint, file_name
from .._safepath import closing_fd
from ..directory import FileRecord
from ..errors import IntegrityError, StorageError
from ..registry.records import VersionRow
from ..store._identity import Identity
from ..store.local import LocalStorageBackend
from .assemble import assemble_into, check_content, serve_assembled
from .manifest import ChunkManifest
from .read import manifest_of, read_chunk_manifest

__all__ = ["assemble_file", "assemble_to", "checked_chunks", "serve_chunked"]

_READ_WRITE = (_NEW_FILE & ~os.O_WRONLY) | os.O_RDWR  # assembling reads back what it wrote


def serve_chunked(store: LocalStorageBackend, registry: _BlobIndex, row: VersionRow, *,
                  full: bool, copy: bool, dest: Path | None,
                  progress: Progress | None) -> Path:
    """A chunked version (``chunks``) as one file: assembled into the bounded cache, or with
    ``copy`` straight into a private copy. The parts are checked (size; with ``full``, their
    digests in order against the version's, once: putting them together does that hash)."""
    manifest = manifest_of(store, registry, row, full=full)
    check_content(store, manifest, full=False)
    name = file_name(row.filename, row.digest)

    def make(parent: int, leaf: str) -> None:
        with closing_fd(os.open(leaf, _READ_WRITE, 0o644, dir_fd=parent)) as out:
            assemble_into(store, manifest, out, progress)

    try:
        if copy:
            return _copy_out(store, name, dest, make)
        return serve_assembled(store, manifest, name, full=full, progress=progress,
                               check=lambda: check_content(store, manifest, full=True))
    except OSError as exc:
        raise StorageError(f"putting {row.key} together failed: {exc}{_hint(exc, dest)}",
                           path=store.root / "cache", errno=exc.errno) from exc


def assemble_to(store: LocalStorageBackend, registry: _BlobIndex, row: VersionRow,
                target: Path) -> None:
    """Put a chunked version together at ``target`` (read-only, replacing what is there
    atomically): ``link_version`` of chunked content. Written once, beside ``target`` (no
    cache entry that eviction or gc could pull from under a checkpoint path)."""
    manifest = manifest_of(store, registry, row, full=False)
    check_content(store, manifest, full=False)
    temp = target.with_name(f".{target.name[:200]}.repro-{secrets.token_hex(6)}")
    try:
        with closing_fd(os.open(temp, _READ_WRITE, 0o644)) as out:
            assemble_into(store, manifest, out)
            os.fchmod(out, 0o444)
        os.replace(temp, target)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise StorageError(f"writing {row.key} to {target} failed: {exc}", path=target,
                           errno=exc.errno) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def checked_chunks(store: LocalStorageBackend, blobs: dict[str, int], record: FileRecord,
                   key: str, full: bool) -> ChunkManifest:
    """A chunked file of a directory version: its chunk manifest and parts, checked."""
    where = f"{key} file {record.path!r}"
    manifest = read_chunk_manifest(store, blobs, record.chunks, record.digest, record.size,
                                   full=full, key=where)
    check_content(store, manifest, full=full)
    return manifest


def assemble_file(store: LocalStorageBackend, chunks: ChunkManifest, record: FileRecord,
                  parent: int, leaf: str, writable: bool,
                  progress: Progress | None) -> Identity:
    """A chunked file of a tree, its parts put together (and hash-checked) in place."""
    try:
        dst = os.open(leaf, _READ_WRITE, 0o600, dir_fd=parent)
    except FileExistsError:
        raise IntegrityError(f"two manifest entries name the same file {leaf!r} on this "
                             "filesystem (case-insensitive?)", digest=record.digest) from None
    with closing_fd(dst):
        assemble_into(store, chunks, dst, progress)
        mode = 0o755 if record.executable else 0o644
        os.fchmod(dst, mode if writable else mode & 0o555)
        if not writable:
            when = time.time_ns() - 1_000_000_000
            os.utime(dst, ns=(when, when))
        return Identity.of(os.fstat(dst))
