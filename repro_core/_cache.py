"""What ``use_artifact`` hands out: named, read-only paths that never vanish under a reader.

Everything here lives in the store's rebuildable ``cache/``::

    <root>/cache/
    ├── identity/<algo>/<ab>/<rest>          each blob as last known good (store/_identity.py)
    ├── files/<algo>/<hex>/<name>            a single-file artifact: a read-only hard link to
    │                                        its blob, named as it was logged (issue 9)
    ├── trees/<algo>/<hex>/g<ns>-<token>/    a directory artifact: one immutable generation
    ├── trees/<algo>/<hex>/g<ns>-<token>.json  its record: the identity of the files it had to
    │                                        copy; its mtime is when it was last handed out
    ├── trees/<algo>/<hex>/.build-<token>/   a generation being built (flock()ed by its builder)
    └── copies/<token>/<name>                private writable copies (``copy=True``)

Why generations: a tree's hard links go stale when a blob is republished (a repaired blob is a
new inode). Deleting the tree and rebuilding it at the same path made a reader in another
process see 158k ``FileNotFoundError`` in 20 s. A path once handed out is never changed: a new
generation is built beside it under a fresh name and served from then on; old generations are
deleted only by ``repro gc`` (``stale_entries``), after a grace period since last handed out.
A single file needs no generations: its link is swapped with one atomic ``os.replace``.

Why hard links: no copy, and a tool that looks at the extension (``.safetensors``) sees one.
Where linking is refused (another user's blob under ``fs.protected_hardlinks``, another
filesystem) a relative symlink to the blob is used instead. A served path is the blob's inode,
so writing into it would change the blob: ``store.check`` notices such a write by the blob's
identity, even with ``verify=False``; code that writes into what it loads asks for a copy.
In a store this user may not write (a read-only archive), a single file is served as its blob,
which they cannot write either; a directory then needs ``copy=True`` with a ``dest``.

Safety: every name comes from the (untrusted) store and was checked before we get here
(``directory.parse_manifest``, ``_safepath``); every directory is opened relative to its parent
with ``O_NOFOLLOW`` and every file created with ``O_EXCL`` / ``link`` inside a fresh directory,
so nothing outside the store is ever created, followed or overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from . import _fsio, constants
from ._cache_gc import StaleEntry, remove_stale, stale_entries
from ._safepath import (
    check_digest,
    closing_fd,
    open_dir,
    remove_tree,
    safe_component,
    store_dir,
)
from .directory import DirManifest, FileRecord, check_manifest_row, read_manifest
from .errors import IntegrityError, InvalidArgumentError, ReproError, StorageError
from .hashing import parse_digest
from .registry.records import VersionRow
from .store._identity import Identity
from .store.local import LocalStorageBackend

if TYPE_CHECKING:
    from .chunks.manifest import ChunkManifest

__all__ = ["StaleEntry", "file_name", "remove_stale", "serve_file", "serve_tree",
           "serve_version", "stale_entries"]

Progress = Callable[[int], None]
GENERATION = re.compile(r"g[0-9a-f]{16}-[0-9a-f]{8}")
# link() errors that mean "not possible here", not "something is wrong": fall back to a symlink.
_NO_LINK = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.EOPNOTSUPP, errno.EACCES}
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
_MAX_RECORD = 1 << 30
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def file_name(stored: object, digest: str) -> str:
    """The name a served file gets: the one stored with the version if it is a single safe
    file name (it is untrusted: no ``/``, ``..``, NUL, at most 255 bytes), else the digest."""
    return safe_component(stored) or parse_digest(digest)[1]


def serve_file(store: LocalStorageBackend, digest: str, size: int, name: str, *,
               copy: bool = False, dest: Path | None = None,
               progress: Progress | None = None) -> Path:
    """A checked blob as ``cache/files/<algo>/<hex>/<name>`` (read-only, the blob's own inode),
    or with ``copy`` a private writable copy at ``dest`` (which must not exist) or under
    ``cache/copies/``. The caller has checked the blob (``store.check``)."""
    name = file_name(name, digest)
    try:
        if copy:
            return _copy_out(store, name, dest,
                             lambda fd, leaf: _copy_blob(store, digest, size, fd, leaf,
                                                         writable=True, progress=progress))
        return _linked_file(store, digest, name)
    except OSError as exc:
        if not copy and exc.errno in _READ_ONLY:
            # A store we may not write to (read-only mount, someone else's): hand out the blob
            # itself, unnamed — we cannot write to it either, which is what the link protects.
            return store.blob_path(digest)
        raise StorageError(f"serving blob {digest} failed: {exc}{_hint(exc, dest)}",
                           path=store.root / "cache", errno=exc.errno) from exc


def serve_tree(store: LocalStorageBackend, digest: str, manifest: DirManifest, *,
               copy: bool = False, name: object = None, dest: Path | None = None,
               progress: Progress | None = None,
               chunked: dict[str, ChunkManifest] | None = None) -> Path:
    """A checked directory artifact: the newest intact generation under ``cache/trees/``
    (built beside the others when there is none), or with ``copy`` a private writable tree at
    ``dest`` or ``cache/copies/<token>/<name>``. ``chunked``: the checked chunk manifest of
    each chunked file, by path (those files are put together, not linked)."""
    chunked = chunked or {}
    try:
        if copy:
            return _copy_out(store, file_name(name, digest), dest,
                             lambda fd, leaf: _copy_tree(store, manifest, fd, leaf, progress,
                                                         chunked))
        algorithm, hexdigest = parse_digest(digest)
        parts = ("cache", "trees", algorithm, hexdigest)
        with store_dir(store.root, parts, create=True) as hfd:
            base = store.root.joinpath(*parts)
            gen = current_generation(store, hfd, base, manifest)
            if gen is None:
                gen = _build_generation(store, hfd, base, manifest, progress, chunked)
            else:  # its record's mtime says when it was last handed out (gc's grace period)
                os.utime(f"{gen}.json", dir_fd=hfd, follow_symlinks=False)
            return base / gen
    except OSError as exc:
        raise StorageError(f"materialising directory {digest} failed: {exc}"
                           f"{_hint(exc, dest)}", path=store.root / "cache",
                           errno=exc.errno) from exc


def _hint(exc: OSError, dest: Path | None) -> str:
    """What to do when the store cannot be written (an archive): copy out of it."""
    if exc.errno in _READ_ONLY and dest is None:
        return ("; the store is read-only for this user: pass copy_to=<a new path of yours> "
                "to get a copy outside it")
    return ""


class _BlobIndex(Protocol):
    def blobs_of(self, version_id: int) -> list[tuple[str, int]]: ...


def serve_version(store: LocalStorageBackend, registry: _BlobIndex, row: VersionRow, *,
                  full: bool, copy: bool = False, dest: Path | None = None,
                  progress: Progress | None = None) -> Path:
    """Check one version's content (size always, digest if ``full``, every file of a
    directory) and serve it. Everything read from the row and the store is untrusted: a
    digest, manifest or size that does not add up is an ``IntegrityError`` before any write."""
    digest = check_digest(row.digest, where=f"registry row {row.key}")
    if row.manifest is not None:
        from .chunks.serve import serve_chunked

        return serve_chunked(store, registry, row, full=full, copy=copy, dest=dest,
                             progress=progress)
    if row.format != "directory":
        store.check(digest, row.size, full=full)
        return serve_file(store, digest, row.size, file_name(row.filename, digest), copy=copy,
                          dest=dest, progress=progress)
    blobs = dict(registry.blobs_of(row.id))
    if digest not in blobs:
        raise IntegrityError(f"registry row {row.key} records no size for its manifest "
                             f"{digest}; the registry is damaged", digest=digest)
    manifest = read_manifest(store.check(digest, blobs[digest], full=full), digest=digest)
    check_manifest_row(manifest, digest, row.size, blobs)
    chunked = {}
    for record in manifest.files:
        if record.chunks is None:
            store.check(record.digest, record.size, full=full)
            continue
        from .chunks.serve import checked_chunks

        chunked[record.path] = checked_chunks(store, blobs, record, row.key, full)
    return serve_tree(store, digest, manifest, copy=copy, name=row.filename, dest=dest,
                      progress=progress, chunked=chunked)


# -- single files ------------------------------------------------------------------------------


def _linked_file(store: LocalStorageBackend, digest: str, name: str) -> Path:
    algorithm, hexdigest = parse_digest(digest)
    parts = ("cache", "files", algorithm, hexdigest)
    target = "../" * len(parts) + blob_rel(digest)
    with store_dir(store.root, parts, create=True) as dfd, BlobDirs(store) as blobs:
        if is_served(digest, dfd, name, target, blobs):
            return store.root.joinpath(*parts, name)
        # Missing, stale (the blob was republished) or planted: make the new entry under a
        # temp name and swap it in with one rename, so the path is never missing.
        tmp = f".tmp-{secrets.token_hex(8)}"
        _link_blob(blobs, digest, dfd, tmp, target)
        try:
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            os.unlink(tmp, dir_fd=dfd)
            raise
    return store.root.joinpath(*parts, name)


def is_served(digest: str, dfd: int, name: str, target: str, blobs: BlobDirs) -> bool:
    """Whether ``name`` in ``dfd`` is the blob itself (hard link) or our symlink to it."""
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        return os.readlink(name, dir_fd=dfd) == target
    return stat.S_ISREG(st.st_mode) and blobs.same_inode(digest, st)


# -- directory generations ---------------------------------------------------------------------


def current_generation(store: LocalStorageBackend, hfd: int, base: Path,
                       manifest: DirManifest) -> str | None:
    """The newest generation in ``hfd`` that still matches the manifest and the blobs."""
    names = sorted((n for n in os.listdir(hfd) if GENERATION.fullmatch(n)), reverse=True)
    for gen in names:
        with contextlib.suppress(OSError):  # a planted link is never a generation
            if stat.S_ISDIR(os.stat(gen, dir_fd=hfd, follow_symlinks=False).st_mode) \
                    and _intact(store, hfd, base / gen, gen, manifest):
                return gen
    return None


def _intact(store: LocalStorageBackend, hfd: int, path: Path, gen: str,
            manifest: DirManifest) -> bool:
    """Every file is still the blob's inode (or our symlink to it, or an unwritten copy)."""
    copies = _read_record(hfd, f"{gen}.json")
    if copies is None:
        return False
    try:
        for record in manifest.files:
            if not _entry_ok(store, path, record, copies.get(record.path)):
                return False
        return all(stat.S_ISDIR(os.lstat(path.joinpath(*d)).st_mode) for d in manifest.dirs)
    except OSError:
        return False


def _entry_ok(store: LocalStorageBackend, gen_path: Path, record: FileRecord,
              copied: Identity | None) -> bool:
    st = os.lstat(gen_path.joinpath(*record.parts))
    if copied is not None:
        return copied.vouches_for(st)
    if stat.S_ISLNK(st.st_mode):
        up = "../" * (len(gen_path.relative_to(store.root).parts) + len(record.parts) - 1)
        return os.readlink(gen_path.joinpath(*record.parts)) == up + blob_rel(record.digest)
    blob = os.lstat(store.blob_path(record.digest))
    return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (blob.st_dev, blob.st_ino)


def _read_record(hfd: int, name: str) -> dict[str, Identity] | None:
    """A generation's record (untrusted like everything in the store): None if unusable."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=hfd)
        with os.fdopen(fd, "rb") as f:
            if os.fstat(fd).st_size > _MAX_RECORD:
                return None
            data = json.loads(f.read())
    except (OSError, ValueError, RecursionError, MemoryError):
        return None
    copies = data.get("copies") if isinstance(data, dict) else None
    if not isinstance(copies, dict):
        return None
    parsed = {k: Identity.parse(v) for k, v in copies.items()}
    if any(v is None for v in parsed.values()):
        return None
    return {k: v for k, v in parsed.items() if v is not None}


def _build_generation(store: LocalStorageBackend, hfd: int, base: Path,
                      manifest: DirManifest, progress: Progress | None,
                      chunked: dict[str, ChunkManifest]) -> str:
    """Build in ``.build-<token>`` (flock()ed: live), write the record, rename into place."""
    token = secrets.token_hex(4)
    build = f".build-{token}"
    os.mkdir(build, 0o755, dir_fd=hfd)
    bfd = open_dir(hfd, build, create=False, where=base / build)
    try:
        fcntl.flock(bfd, fcntl.LOCK_EX)
        copies = _fill(store, manifest, bfd, depth=len(base.relative_to(store.root).parts) + 1,
                       writable=False, progress=progress, chunked=chunked)
        gen = f"g{time.time_ns():016x}-{token}"
        body = json.dumps({"copies": {k: v.to_json() for k, v in copies.items()}}).encode()
        with closing_fd(os.open(f"{gen}.json", _NEW_FILE, 0o644, dir_fd=hfd)) as out:
            if os.write(out, body) != len(body):  # a short write: a full disk
                raise OSError(errno.ENOSPC, "short write of a generation record")
        os.rename(build, gen, src_dir_fd=hfd, dst_dir_fd=hfd)  # the record exists first
        return gen
    except BaseException:
        with contextlib.suppress(OSError, ReproError):  # keep the original error
            remove_tree(hfd, build)
        raise
    finally:
        os.close(bfd)


def _fill(store: LocalStorageBackend, manifest: DirManifest, into: int, *, depth: int,
          writable: bool, progress: Progress | None,
          chunked: dict[str, ChunkManifest]) -> dict[str, Identity]:
    """Create the manifest's tree inside the fresh, empty directory ``into``. Returns the
    identity of each file that had to be copied (executables: a hard link shares the blob's
    0444 mode) so later uses can tell they were not written to."""
    copies: dict[str, Identity] = {}
    with _Dirs(into) as dirs, BlobDirs(store) as blobs:
        for parts in sorted(manifest.dirs):
            dirs.fd(parts)
        for record in sorted(manifest.files, key=lambda r: r.parts):
            parent, leaf = dirs.fd(record.parts[:-1]), record.parts[-1]
            if record.chunks is not None:  # no blob to link: its parts put together
                from .chunks.serve import assemble_file

                ident = assemble_file(store, chunked[record.path], record, parent, leaf,
                                      writable, progress)
                if not writable:
                    copies[record.path] = ident
            elif writable or record.executable:
                ident = _copy_from(blobs, record, parent, leaf, writable, progress)
                if not writable:
                    copies[record.path] = ident
            else:
                up = "../" * (depth + len(record.parts) - 1)
                _link_blob(blobs, record.digest, parent, leaf, up + blob_rel(record.digest))
    return copies


def _link_blob(blobs: BlobDirs, digest: str, parent: int, leaf: str, target: str) -> None:
    sfd, name = blobs.dir(digest)
    try:
        os.link(name, leaf, src_dir_fd=sfd, dst_dir_fd=parent, follow_symlinks=False)
    except FileExistsError:
        raise IntegrityError(f"two manifest entries name the same file {leaf!r} on this "
                             "filesystem (case-insensitive?)", digest=digest) from None
    except OSError as exc:
        if exc.errno not in _NO_LINK:
            raise
        os.symlink(target, leaf, dir_fd=parent)


def _copy_from(blobs: BlobDirs, record: FileRecord, parent: int, leaf: str, writable: bool,
               progress: Progress | None) -> Identity:
    sfd, name = blobs.dir(record.digest)
    mode = 0o755 if record.executable else 0o644
    if not writable:
        mode &= 0o555
    with closing_fd(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)) as src:
        try:
            dst = os.open(leaf, _NEW_FILE, 0o600, dir_fd=parent)
        except FileExistsError:
            raise IntegrityError(f"two manifest entries name the same file {leaf!r} on this "
                                 "filesystem (case-insensitive?)", digest=record.digest) from None
        with closing_fd(dst):
            _copy_fd(src, dst, record.size, progress)
            os.fchmod(dst, mode)
            if not writable:  # settle mtime (see store/_identity.py) before recording it
                when = time.time_ns() - 1_000_000_000
                os.utime(dst, ns=(when, when))
            return Identity.of(os.fstat(dst))


# -- private copies ----------------------------------------------------------------------------


def _copy_out(store: LocalStorageBackend, name: str, dest: Path | None,
              make: Callable[[int, str], object]) -> Path:
    """Run ``make(parent_fd, leaf)`` to create a private copy, at ``dest`` (never replacing
    anything there) or in a fresh ``cache/copies/<token>/``."""
    if dest is None:
        token = f"{time.strftime('%Y%m%d')}-{secrets.token_hex(6)}"
        with store_dir(store.root, ("cache", "copies", token), create=True) as cfd:
            try:
                make(cfd, name)
            except BaseException:
                with contextlib.suppress(OSError, ReproError):  # keep the original error
                    remove_tree(cfd, name)
                raise
        return store.root / "cache" / "copies" / token / name
    dest = Path(dest).expanduser().absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = f".{dest.name[:200]}.{secrets.token_hex(6)}.part"
    with closing_fd(os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)) as pfd:
        try:  # link() and rename() of a directory both refuse to replace what is there
            make(pfd, part)
            _place(pfd, part, dest.name)
        except FileExistsError:
            raise InvalidArgumentError(f"{dest} already exists; remove it or choose another "
                                       "destination for the copy", argument="dest") from None
        finally:
            with contextlib.suppress(OSError, ReproError):
                remove_tree(pfd, part)
    return dest


def _place(pfd: int, part: str, leaf: str) -> None:
    if stat.S_ISDIR(os.stat(part, dir_fd=pfd, follow_symlinks=False).st_mode):
        try:
            os.rename(part, leaf, src_dir_fd=pfd, dst_dir_fd=pfd)
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(exc.errno, exc.strerror) from None
            raise
    else:
        os.link(part, leaf, src_dir_fd=pfd, dst_dir_fd=pfd, follow_symlinks=False)


def _copy_blob(store: LocalStorageBackend, digest: str, size: int, parent: int, leaf: str, *,
               writable: bool, progress: Progress | None) -> None:
    record = FileRecord(path=leaf, parts=(leaf,), digest=digest, size=size, executable=False)
    with BlobDirs(store) as blobs:
        _copy_from(blobs, record, parent, leaf, writable, progress)


def _copy_tree(store: LocalStorageBackend, manifest: DirManifest, parent: int, leaf: str,
               progress: Progress | None, chunked: dict[str, ChunkManifest]) -> None:
    os.mkdir(leaf, 0o755, dir_fd=parent)
    with closing_fd(open_dir(parent, leaf, create=False, where=Path(leaf))) as fd:
        _fill(store, manifest, fd, depth=0, writable=True, progress=progress, chunked=chunked)


# -- helpers -----------------------------------------------------------------------------------


def blob_rel(digest: str) -> str:
    algorithm, hexdigest = parse_digest(digest)
    return f"blobs/{algorithm}/{hexdigest[:2]}/{hexdigest[2:]}"


def _copy_fd(src: int, dst: int, size: int, progress: Progress | None) -> None:
    done = 0
    while done < size:
        n = _fsio.copy_range(src, dst, min(constants.IO_CHUNK, size - done))
        if n == 0:
            raise IntegrityError(f"a blob shrank while it was copied ({done} of {size} bytes)")
        done += n
        if progress is not None:
            progress(n)


class BlobDirs:
    """Shard directories of ``blobs/`` opened without following links (kept open per build:
    a tree of 100k files needs at most 256 of them)."""

    def __init__(self, store: LocalStorageBackend) -> None:
        self._store = store
        self._fds: dict[tuple[str, str], int] = {}

    def dir(self, digest: str) -> tuple[int, str]:
        algorithm, hexdigest = parse_digest(digest)
        key = (algorithm, hexdigest[:2])
        if key not in self._fds:
            with store_dir(self._store.root, ("blobs", algorithm), create=False) as afd:
                self._fds[key] = open_dir(afd, hexdigest[:2], create=False,
                                          where=self._store.blob_path(digest).parent)
        return self._fds[key], hexdigest[2:]

    def same_inode(self, digest: str, st: os.stat_result) -> bool:
        """Whether ``st`` is the blob's inode. A plain ``lstat`` (no descriptors to open): it
        only reads, and what it finds was checked by ``store.check``; new links, which
        write, go through ``dir``."""
        blob = os.lstat(self._store.blob_path(digest))
        return stat.S_ISREG(blob.st_mode) and (blob.st_dev, blob.st_ino) == (st.st_dev, st.st_ino)

    def __enter__(self) -> BlobDirs:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class _Dirs:
    """Directories below a fresh build directory, each created and opened relative to its
    parent with ``O_NOFOLLOW``. Holds one descriptor (the current parent): entries come sorted,
    so consecutive files mostly share it and the walk restarts from the top only on a turn."""

    def __init__(self, top: int) -> None:
        self._top, self._fd, self._parts = top, top, ()  # type: tuple[int, int, tuple[str, ...]]

    def fd(self, parts: tuple[str, ...]) -> int:
        if parts == self._parts:
            return self._fd
        keep = len(self._parts) if parts[:len(self._parts)] == self._parts else 0
        fd, opened = (self._fd if keep else self._top), []
        try:
            for name in parts[keep:]:
                fd = open_dir(fd, name, create=True, where=Path(*parts))
                opened.append(fd)
        except BaseException:
            for f in opened:
                os.close(f)
            raise
        for f in opened[:-1]:
            os.close(f)
        self._release()
        self._fd, self._parts = (opened[-1] if opened else self._top), parts
        return self._fd

    def _release(self) -> None:
        if self._fd != self._top:
            os.close(self._fd)
        self._fd = self._top

    def __enter__(self) -> _Dirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()
