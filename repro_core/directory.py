"""Directory artifacts: a manifest of relative paths and digests, itself content-addressed.

Each file becomes an ordinary blob (so two versions of a dataset share unchanged files, as in
DVC); the manifest is canonical JSON, and *its* digest is the artifact's digest::

    {"format": "repro.directory/1",
     "files": [{"path": "train/0.csv", "digest": "blake3:…", "size": 123, "executable": false}],
     "dirs": ["empty/subdir"]}

A big file (``REPRO_CHUNK_MIN_BYTES``: an Accelerate ``model.safetensors``, a sharded
checkpoint's shards) is stored chunked (``chunks``): its record keeps the whole file's
``digest`` and adds ``"chunks": "<digest of its chunk manifest>"``; its parts are blobs of the
version like any file's, so two saved states share the tensors that did not change.

A manifest read back is untrusted input (``parse_manifest``): it drives the creation of one
file per record, so every path and digest in it is checked before any I/O. ``_cache`` builds the
tree users get from it.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._safepath import check_digest, check_relpath
from .errors import IntegrityError, InvalidArgumentError, StorageError
from .serialize import canonical_json
from .store.local import LocalStorageBackend

__all__ = ["DirManifest", "FileRecord", "Manifest", "check_manifest_row", "ingest_directory",
           "materialize_directory", "parse_manifest", "read_manifest", "scan_directory"]

MANIFEST_FORMAT = "repro.directory/1"


@dataclass(frozen=True)
class _Entry:
    rel: str
    abs: Path
    executable: bool


@dataclass(frozen=True)
class Manifest:
    """A stored directory: the manifest's own digest/size and every blob it needs."""

    digest: str
    manifest_size: int
    total_size: int
    blobs: list[tuple[str, int]]
    files: int
    chunked: bool = False  # some file is stored chunked (put together when served)


@dataclass(frozen=True)
class FileRecord:
    """One file of a checked manifest: ``parts`` is ``path`` split, every part a safe name."""

    path: str
    parts: tuple[str, ...]
    digest: str
    size: int
    executable: bool
    chunks: str | None = None  # chunked (``chunks``): its chunk manifest's digest


@dataclass(frozen=True)
class DirManifest:
    """A checked manifest: paths safe and forming one tree (see ``parse_manifest``)."""

    files: tuple[FileRecord, ...]
    dirs: tuple[tuple[str, ...], ...]

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def scan_directory(root: Path) -> tuple[list[_Entry], list[str]]:
    """List files (following file symlinks) and empty directories, sorted; validate first.

    A symlink to a directory is refused rather than followed: it could loop, and silently
    skipping it would lose data.
    """
    files: list[_Entry] = []
    empty_dirs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        for d in dirnames:
            if (here / d).is_symlink():
                raise InvalidArgumentError(
                    f"{here / d} is a symlink to a directory; repro does not follow those. "
                    "Copy the target in or log it as its own artifact",
                    argument="file_path",
                )
        dirnames.sort()
        if not dirnames and not filenames and here != root:
            empty_dirs.append(_utf8_name(here, here.relative_to(root).as_posix()))
        for name in sorted(filenames):
            path = here / name
            try:
                st = path.stat()
            except OSError as exc:
                raise InvalidArgumentError(
                    f"cannot read {path}: {exc}", argument="file_path"
                ) from exc
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgumentError(
                    f"{path} is not a regular file (socket, fifo or device)", argument="file_path"
                )
            rel = _utf8_name(path, path.relative_to(root).as_posix())
            files.append(_Entry(rel, path, bool(st.st_mode & stat.S_IXUSR)))
    return files, empty_dirs


def _utf8_name(path: Path, rel: str) -> str:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgumentError(
            f"{path!r} has a name that is not valid UTF-8; rename it (manifests store names "
            "as UTF-8 text)", argument="file_path") from None
    try:  # refuse now what use_artifact would refuse to build later
        check_relpath(rel, where=str(path))
    except IntegrityError as exc:
        raise InvalidArgumentError(
            f"{path!r} cannot be stored in a directory manifest: {exc}. Rename it (a backslash "
            "is a path separator on Windows) or flatten the tree", argument="file_path") from None
    return rel


def ingest_directory(store: LocalStorageBackend, root: Path) -> Manifest:
    """Store every file of ``root`` and the manifest; return what the registry must record."""
    files, empty_dirs = scan_directory(root)
    records: list[dict[str, Any]] = []
    blobs: list[tuple[str, int]] = []
    total = 0
    from . import constants
    from .chunks.ingest import ingest_file as chunk_file

    for entry in files:
        chunked = chunk_file(store, entry.abs, constants.REPRO_CHUNK_MIN_BYTES)
        if chunked is not None:
            digest, size = chunked.digest, chunked.size
            records.append({"path": entry.rel, "digest": digest, "size": size,
                            "executable": entry.executable, "chunks": chunked.manifest})
            blobs.extend(chunked.blobs)
        else:
            digest, size = store.ingest_file(entry.abs)
            records.append({"path": entry.rel, "digest": digest, "size": size,
                            "executable": entry.executable})
            blobs.append((digest, size))
        total += size
    blobs = list(dict(blobs).items())  # a part shared by two files: recorded once
    body = canonical_json({"format": MANIFEST_FORMAT, "files": records, "dirs": empty_dirs})
    with store.open_writer() as writer:
        writer.write(body)
        digest, size = writer.commit()
    blobs.append((digest, size))
    return Manifest(digest=digest, manifest_size=size, total_size=total, blobs=blobs,
                    files=len(records), chunked=any("chunks" in r for r in records))


def read_manifest(path: Path, *, digest: str | None = None) -> DirManifest:
    """Read and check a stored manifest (see ``parse_manifest``)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StorageError(f"cannot read manifest {path}: {exc}", path=path) from exc
    return parse_manifest(raw, digest=digest)


def parse_manifest(raw: bytes, *, digest: str | None = None) -> DirManifest:
    """Parse a manifest as untrusted input: any flaw is an ``IntegrityError`` before any I/O.

    A manifest drives writes (one file per record), so besides its shape every path is checked
    (relative, normalised, no ``..``: ``_safepath.check_relpath``) and the set of paths must
    describe one tree: no duplicates, no file that is also a parent directory of another entry,
    no "empty" directory with entries below it. Parsing errors of any kind (not UTF-8, not
    JSON, nested deep enough to exhaust the parser's recursion) become ``IntegrityError`` too.
    """
    where = f"manifest {digest}" if digest else "manifest"
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError, MemoryError) as exc:
        raise _bad(where, f"is not JSON ({type(exc).__name__}: {str(exc)[:200]})",
                   digest) from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise _bad(where, f"is not a {MANIFEST_FORMAT!r} manifest", digest)
    files, dirs = data.get("files"), data.get("dirs")
    if not isinstance(files, list) or not isinstance(dirs, list):
        raise _bad(where, "needs 'files' and 'dirs' lists", digest)
    records = tuple(_file_record(r, f"{where} files[{i}]") for i, r in enumerate(files))
    empty = tuple(check_relpath(d, where=f"{where} dirs[{i}]") for i, d in enumerate(dirs))
    _check_tree(records, empty, where, digest)
    return DirManifest(files=records, dirs=empty)


def check_manifest_row(manifest: DirManifest, digest: str, size: int,
                       blobs: dict[str, int]) -> None:
    """The manifest must agree with its registry row: the files' sizes add up to the
    version's size, and each file's blob is one the registry records for the version (else gc
    could delete it and ``verify`` would never look at it)."""
    where = f"manifest {digest}"
    if manifest.total_size != size:
        raise _bad(where, f"lists {manifest.total_size} bytes of files, but the registry "
                   f"records {size} for the version", digest)
    for record in manifest.files:
        if record.chunks is not None:  # its parts are checked with its chunk manifest
            if record.chunks not in blobs:
                raise _bad(where, f"lists {record.path!r} as chunked by {record.chunks}, "
                           "which the registry does not record for this version", digest)
            continue
        if blobs.get(record.digest) != record.size:
            raise _bad(where, f"lists {record.path!r} as blob {record.digest} "
                       f"({record.size} bytes), which the registry does not record for this "
                       "version", digest)


def _bad(where: str, problem: str, digest: str | None) -> IntegrityError:
    return IntegrityError(f"{where} {problem}; the store is damaged or was tampered with "
                          "(`repro verify` lists what is affected)", digest=digest)


_MAX_SIZE = 2**63 - 1


def _file_record(value: object, where: str) -> FileRecord:
    if not isinstance(value, dict):
        raise _bad(where, f"is a {type(value).__name__}, not an object", None)
    path, size, executable = value.get("path"), value.get("size"), value.get("executable")
    parts = check_relpath(path, where=where)
    digest = check_digest(value.get("digest"), where=where)
    if type(size) is not int or not 0 <= size <= _MAX_SIZE:
        raise _bad(where, f"has size {size!r}, not a byte count", None)
    if type(executable) is not bool:
        raise _bad(where, f"has executable {executable!r}, not true/false", None)
    chunks = value.get("chunks")
    if chunks is not None:
        chunks = check_digest(chunks, where=f"{where} chunks")
    return FileRecord(path="/".join(parts), parts=parts, digest=digest, size=size,
                      executable=executable, chunks=chunks)


def _check_tree(files: tuple[FileRecord, ...], dirs: tuple[tuple[str, ...], ...],
                where: str, digest: str | None) -> None:
    file_parts = {f.parts for f in files}
    dir_parts = set(dirs)
    if len(file_parts) != len(files) or len(dir_parts) != len(dirs) or file_parts & dir_parts:
        raise _bad(where, "lists the same path twice", digest)
    for parts in (*file_parts, *dir_parts):
        for depth in range(1, len(parts)):
            prefix = parts[:depth]
            if prefix in file_parts:
                raise _bad(where, f"lists {'/'.join(prefix)!r} as a file and also as a "
                           f"directory holding {'/'.join(parts)!r}", digest)
            if prefix in dir_parts:
                raise _bad(where, f"lists {'/'.join(prefix)!r} as an empty directory but "
                           f"also {'/'.join(parts)!r} inside it", digest)


def materialize_directory(store: LocalStorageBackend, manifest_digest: str,
                          manifest: DirManifest | None = None) -> Path:
    """The served, read-only tree of a stored directory (``_cache.serve_tree``).

    ``manifest``: the parsed manifest, when the caller has already read (and checked) it.
    """
    from . import _cache  # _cache imports this module

    if manifest is None:
        manifest = read_manifest(store.blob_path(manifest_digest), digest=manifest_digest)
    return _cache.serve_tree(store, manifest_digest, manifest)
