"""Which cache entries ``repro gc`` may delete (``stale_entries``), and deleting them safely.

Nothing in ``cache/`` is the only copy of anything, but a path handed out by ``use_artifact`` may
still be read by another process, so an entry goes only once it cannot be served any more *and*
has not been handed out for a grace period:

- ``tree``/``tree-record``: a directory generation (and its record) that is not the newest
  intact one (a blob was republished since), or whose manifest blob is gone; its grace period
  counts from when it was last handed out (the record's mtime);
- ``build``: a generation being built by a process that died (its flock can be taken);
- ``file``: a named link whose blob is gone, or a leftover temp link;
- ``identity``: the record of a blob that is gone (no grace needed: it is never handed out);
- ``copy``: a private copy untouched for ``max(grace, COPY_GRACE_SECONDS)``;
- ``legacy``: a tree of the old layout (``cache/dirs/<algo>/<hex>``), replaced by ``trees/``;
- ``assembled``: a chunked version put back together (``cache/assembled/<algo>/<hex>``,
  ``chunks.assemble``) not handed out for the grace period (its ``.identity`` record's mtime,
  touched at every hand-out), or a build's temp file in one older than
  ``REPRO_STALE_TMP_SECONDS`` (its builder died);
- ``foreign``: anything at a level where only our directories belong (a planted link, a stray
  file): removed without following it.

Call it under gc's exclusive publish guard and *after* deleting unreferenced blobs, so that the
cache entries of deleted blobs are seen as stale in the same run.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import constants
from ._safepath import closing_fd, open_dir, remove_tree, store_dir
from .directory import DirManifest, read_manifest
from .errors import ReproError, StorageError
from .store.local import LocalStorageBackend

__all__ = ["COPY_GRACE_SECONDS", "StaleEntry", "entry_bytes", "remove_stale", "stale_entries"]

COPY_GRACE_SECONDS = 7 * 86400.0


@dataclass(frozen=True)
class StaleEntry:
    """One removable cache entry; ``parts`` is its path below the store root."""

    kind: str
    parts: tuple[str, ...]
    idle: float = 0.0  # assembled entries: re-checked under their lock before removal

    @property
    def path(self) -> Path:
        """Relative to the store root."""
        return Path(*self.parts)


def stale_entries(store: LocalStorageBackend, grace_seconds: float, *,
                  now: float | None = None) -> list[StaleEntry]:
    """Every cache entry gc may delete now (see the module docstring)."""
    clock = time.time() if now is None else now
    out: list[StaleEntry] = []
    walkers: dict[str, Callable[[tuple[str, ...], int], None]] = {
        "trees": lambda parts, fd: _trees(store, parts, fd, grace_seconds, clock, out),
        "files": lambda parts, fd: _files(store, parts, fd, grace_seconds, clock, out),
        "identity": lambda parts, fd: _identity(store, parts, fd, out),
        "dirs": lambda parts, fd: _legacy(parts, fd, grace_seconds, clock, out),
        "assembled": lambda parts, fd: _assembled(parts, fd, grace_seconds, clock, out),
    }
    for top, walker in walkers.items():
        _walk2(store, ("cache", top), walker, out)
    _copies(store, max(grace_seconds, COPY_GRACE_SECONDS), clock, out)
    return out


def remove_stale(store: LocalStorageBackend, entry: StaleEntry) -> None:
    """Delete one entry without following links (gone already: nothing to do). An
    assembled file's entry goes only if no one is using it now (``remove_entry``)."""
    if entry.kind == "assembled" and len(entry.parts) == 4:
        from .chunks.assemble import remove_entry

        remove_entry(store, entry.parts, entry.idle)
        return
    try:
        with store_dir(store.root, entry.parts[:-1], create=False) as parent:
            remove_tree(parent, entry.parts[-1])
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"removing {store.root / entry.path} failed: {exc}",
                           path=store.root / entry.path, errno=exc.errno) from exc


def entry_bytes(store: LocalStorageBackend, entry: StaleEntry) -> int:
    """Bytes a flat entry holds (a file, or a directory of files: each inode once, as hard
    links of one assembled file are one file); 0 when gone or not ours to measure."""
    try:
        with store_dir(store.root, entry.parts[:-1], create=False) as parent:
            st = os.stat(entry.parts[-1], dir_fd=parent, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                return st.st_size
            if not stat.S_ISDIR(st.st_mode):
                return 0
            with closing_fd(open_dir(parent, entry.parts[-1], create=False,
                                     where=entry.path)) as fd:
                inodes = {c.st_ino: c.st_size for _, c in _children(fd)
                          if stat.S_ISREG(c.st_mode)}
            return sum(inodes.values())
    except (OSError, ReproError):
        return 0


# -- walkers -----------------------------------------------------------------------------------


def _children(fd: int) -> list[tuple[str, os.stat_result]]:
    out = []
    for name in sorted(os.listdir(fd)):
        with contextlib.suppress(FileNotFoundError):
            out.append((name, os.stat(name, dir_fd=fd, follow_symlinks=False)))
    return out


def _walk2(store: LocalStorageBackend, top: tuple[str, ...],
           visit: Callable[[tuple[str, ...], int], None], out: list[StaleEntry]) -> None:
    """``visit(parts, fd)`` for each directory ``top/<a>/<b>``; anything else at those two
    levels is ``foreign``."""
    try:
        with store_dir(store.root, top, create=False) as tfd:
            for a, ast in _children(tfd):
                if not stat.S_ISDIR(ast.st_mode):
                    out.append(StaleEntry("foreign", (*top, a)))
                    continue
                with closing_fd(open_dir(tfd, a, create=False, where=Path(a))) as afd:
                    for b, bst in _children(afd):
                        if not stat.S_ISDIR(bst.st_mode):
                            out.append(StaleEntry("foreign", (*top, a, b)))
                            continue
                        with closing_fd(open_dir(afd, b, create=False, where=Path(b))) as bfd:
                            visit((*top, a, b), bfd)
    except FileNotFoundError:
        return


def _trees(store: LocalStorageBackend, parts: tuple[str, ...], hfd: int, grace: float,
           now: float, out: list[StaleEntry]) -> None:
    from ._cache import GENERATION, current_generation

    manifest = _manifest(store, f"{parts[2]}:{parts[3]}")
    base = store.root.joinpath(*parts)
    current = current_generation(store, hfd, base, manifest) if manifest else None
    children = _children(hfd)
    mtimes = {name: st.st_mtime for name, st in children}
    for name, st in children:
        if current is not None and name in (current, f"{current}.json"):
            continue
        if name.startswith(".build-"):
            if _dead_build(hfd, name, st, now):
                out.append(StaleEntry("build", (*parts, name)))
            continue
        gen = name.removesuffix(".json")
        kind = ("tree" if name == gen else "tree-record") if GENERATION.fullmatch(gen) \
            else "foreign"
        if now - mtimes.get(f"{gen}.json", st.st_mtime) >= grace:
            out.append(StaleEntry(kind, (*parts, name)))


def _manifest(store: LocalStorageBackend, digest: str) -> DirManifest | None:
    try:
        return read_manifest(store.blob_path(digest), digest=digest)
    except (ReproError, OSError):  # gone or unusable: no generation can be intact
        return None


def _dead_build(hfd: int, name: str, st: os.stat_result, now: float) -> bool:
    if now - st.st_mtime > constants.REPRO_STALE_TMP_SECONDS:
        return True
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=hfd)
    except OSError:
        return False
    with closing_fd(fd):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # its builder is alive
            return False
    return True


def _files(store: LocalStorageBackend, parts: tuple[str, ...], dfd: int, grace: float,
           now: float, out: list[StaleEntry]) -> None:
    from ._cache import BlobDirs, blob_rel, is_served

    digest = f"{parts[2]}:{parts[3]}"
    children = _children(dfd)
    if not _blob_exists(store, digest):
        if all(now - st.st_ctime >= grace for _, st in children):
            out.append(StaleEntry("file", parts))
        return
    target = "../" * len(parts) + blob_rel(digest)
    with BlobDirs(store) as blobs:
        for name, st in children:
            if now - st.st_ctime >= grace and not is_served(digest, dfd, name, target, blobs):
                out.append(StaleEntry("file", (*parts, name)))


def _blob_exists(store: LocalStorageBackend, digest: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(store.blob_path(digest)).st_mode)
    except (OSError, ReproError):
        return False


def _identity(store: LocalStorageBackend, parts: tuple[str, ...], sfd: int,
              out: list[StaleEntry]) -> None:
    for name, _ in _children(sfd):
        if not _blob_exists(store, f"{parts[2]}:{parts[3]}{name}"):
            out.append(StaleEntry("identity", (*parts, name)))


def _legacy(parts: tuple[str, ...], fd: int, grace: float, now: float,
            out: list[StaleEntry]) -> None:
    if now - os.fstat(fd).st_mtime >= grace:
        out.append(StaleEntry("legacy", parts))


def _assembled(parts: tuple[str, ...], dfd: int, grace: float, now: float,
               out: list[StaleEntry]) -> None:
    from .chunks.assemble import RECORD

    children = _children(dfd)
    times = {name: st.st_mtime for name, st in children}
    building = [t for name, t in times.items() if name.startswith(".tmp-")
                and now - t <= constants.REPRO_STALE_TMP_SECONDS]
    # Last handed out: the record's mtime (a dir never served has none: its own mtime); a
    # build under way (a live temp file) counts as a use, so gc never pulls the directory
    # from under its builder.
    used = max([times.get(RECORD, os.fstat(dfd).st_mtime), *building])
    if now - used >= grace:
        out.append(StaleEntry("assembled", parts, idle=grace))
        return
    for name, t in times.items():
        if name.startswith(".tmp-") and now - t > constants.REPRO_STALE_TMP_SECONDS:
            out.append(StaleEntry("assembled", (*parts, name)))


def _copies(store: LocalStorageBackend, grace: float, now: float,
            out: list[StaleEntry]) -> None:
    top = ("cache", "copies")
    try:
        with store_dir(store.root, top, create=False) as cfd:
            for token, st in _children(cfd):
                newest = max(st.st_mtime, st.st_ctime)
                if stat.S_ISDIR(st.st_mode):
                    with closing_fd(open_dir(cfd, token, create=False, where=Path(token))) as t:
                        newest = max([newest, *(max(c.st_mtime, c.st_ctime)
                                                for _, c in _children(t))])
                if now - newest >= grace:
                    out.append(StaleEntry("copy", (*top, token)))
    except FileNotFoundError:
        return
