"""Directory artifacts: a manifest of relative paths and digests, itself content-addressed.

Each file becomes an ordinary blob (so two versions of a dataset share unchanged files, as in
DVC); the manifest is canonical JSON, and *its* digest is the artifact's digest::

    {"format": "repro.directory/1",
     "files": [{"path": "train/0.csv", "digest": "blake3:…", "size": 123, "executable": false}],
     "dirs": ["empty/subdir"]}

``use_artifact`` materialises a directory once under ``cache/dirs/<algo>/<hex>/`` with hard
links to the read-only blobs (a copy where links are not possible), built in ``tmp/`` and renamed
into place so a half-built tree is never visible.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError, StorageError
from .hashing import parse_digest
from .serialize import canonical_json
from .store.local import LocalStorageBackend, new_locked_temp

__all__ = ["Manifest", "ingest_directory", "materialize_directory", "read_manifest",
           "scan_directory"]

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
    return rel


def ingest_directory(store: LocalStorageBackend, root: Path) -> Manifest:
    """Store every file of ``root`` and the manifest; return what the registry must record."""
    files, empty_dirs = scan_directory(root)
    records: list[dict[str, Any]] = []
    blobs: list[tuple[str, int]] = []
    total = 0
    for entry in files:
        digest, size = store.ingest_file(entry.abs)
        records.append({"path": entry.rel, "digest": digest, "size": size,
                        "executable": entry.executable})
        blobs.append((digest, size))
        total += size
    body = canonical_json({"format": MANIFEST_FORMAT, "files": records, "dirs": empty_dirs})
    with store.open_writer() as writer:
        writer.write(body)
        digest, size = writer.commit()
    blobs.append((digest, size))
    return Manifest(digest=digest, manifest_size=size, total_size=total, blobs=blobs,
                    files=len(records))


def read_manifest(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_bytes())
    if data.get("format") != MANIFEST_FORMAT:
        raise StorageError(f"{path} is not a repro directory manifest", path=path)
    return data


def materialize_directory(store: LocalStorageBackend, manifest_digest: str,
                          manifest: dict[str, Any] | None = None) -> Path:
    """Return ``cache/dirs/<algo>/<hex>``, building it atomically on first use.

    ``manifest``: the parsed manifest, when the caller has already read (and checked) it.
    """
    algorithm, hexdigest = parse_digest(manifest_digest)
    final = store.root / "cache" / "dirs" / algorithm / hexdigest
    if manifest is None:
        manifest = read_manifest(store.blob_path(manifest_digest))
    if final.is_dir():
        if _still_linked(store, manifest, final):
            return final
        _discard(store, final)  # a blob was replaced (repaired): rebuild from the blobs
    store.ensure_layout()
    build, lock_fd = new_locked_temp(store.tmp_dir, ".dir", directory=True)
    try:
        try:  # the flock marks the build as live for sweep_tmp()
            _populate(store, manifest, build)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(build, final)
            except OSError:
                if not final.is_dir():  # someone else won the race: theirs is identical
                    raise
        finally:
            os.close(lock_fd)
    except OSError as exc:
        raise StorageError(f"materialising {manifest_digest} failed: {exc}", path=final) from exc
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)
    return final


def _still_linked(store: LocalStorageBackend, manifest: dict[str, Any], built: Path) -> bool:
    """Hard-linked files are the blobs themselves; if a blob was replaced since (publishing
    renames verified bytes over a rotted blob) the cache still holds the old inode."""
    try:
        return all(os.path.samefile(built / r["path"], store.blob_path(r["digest"]))
                   for r in manifest["files"] if not r["executable"])
    except OSError:
        return False


def _discard(store: LocalStorageBackend, built: Path) -> None:
    """Move a stale cache tree into tmp/ (atomic), then delete it."""
    trash, fd = new_locked_temp(store.tmp_dir, ".dir", directory=True)
    try:
        os.rename(built, trash / "old")
    except OSError:
        pass  # another process discarded it first
    finally:
        os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)


def _populate(store: LocalStorageBackend, manifest: dict[str, Any], build: Path) -> None:
    for rel in manifest["dirs"]:
        (build / rel).mkdir(parents=True, exist_ok=True)
    for record in manifest["files"]:
        target = build / record["path"]
        target.parent.mkdir(parents=True, exist_ok=True)
        source = store.blob_path(record["digest"])
        if not record["executable"]:
            try:
                os.link(source, target)  # read-only blob shared, no copy
                continue
            except OSError:
                pass
        # Executable files are copied: a hard link shares the blob's 0444 mode.
        shutil.copyfile(source, target)
        os.chmod(target, 0o555 if record["executable"] else 0o444)
