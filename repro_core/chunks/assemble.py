"""A chunked version as one real file: ``use_artifact(...).path`` of chunked content.

Tools want a path (``safetensors.safe_open``, ``torch.load``, Lightning's ``ckpt_path``), so
the parts are put back together, once, into a bounded cache::

    <root>/cache/assembled/<algo>/<hex>/<name>     the file (0444), named as logged; other
                                                   names of the same content: hard links
    <root>/cache/assembled/<algo>/<hex>/.identity  its identity when last known good; mtime:
                                                   when it was last handed out

The file is written while hashed (one pass, kernel copies from the part blobs) and renamed into
place only when it hashes to the version's digest — the whole-file check of every part and of
the manifest at once. A later use checks it like a blob: by its identity (size mode) or by
hashing it (full mode, with every part checked too, so a rotted part is reported even while
an assembled copy still exists). The cache is bounded by ``REPRO_ASSEMBLED_CACHE_BYTES``:
least recently handed out first, never one handed out in the last ``KEEP_SECONDS`` (a reader
may be about to open it); ``repro gc`` removes the ones not handed out for its grace period.
A path handed out is replaced only by an atomic rename (a reader with it open keeps its bytes).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import json
import os
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

from .. import _fsio, constants
from .._safepath import closing_fd, open_dir, remove_tree, store_dir
from ..errors import IntegrityError, ReproError, StorageError
from ..hashing import copy_and_hash, hash_file, new_hasher, parse_digest
from ..store._identity import Identity
from ..store.local import LocalStorageBackend
from .manifest import ChunkManifest

__all__ = ["KEEP_SECONDS", "assemble_into", "assembled_entries", "check_content", "check_parts",
           "remove_entry", "serve_assembled"]

KEEP_SECONDS = 600.0
RECORD = ".identity"
Progress = Callable[[int], None]


def check_parts(store: LocalStorageBackend, manifest: ChunkManifest, *, full: bool) -> None:
    """Every part blob present, of its size, and (``full``) of its digest; an error names the
    tensor(s) the part holds. Parts are hashed two at a time (most are smaller than what
    BLAKE3 hashes on several threads by itself)."""
    blobs = manifest.blobs()
    if not full or len(blobs) < 2:
        for digest, size in blobs:
            _check_part(store, manifest, digest, size, full)
        return
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="repro-check") as pool:
        for future in [pool.submit(_check_part, store, manifest, d, s, full) for d, s in blobs]:
            future.result()


def check_content(store: LocalStorageBackend, manifest: ChunkManifest, *, full: bool) -> None:
    """What a use checks of chunked content: every part present and of its size (by
    identity, as for a blob); with ``full``, the parts *in manifest order* must hash to the
    whole-file digest — one pass that also catches a manifest whose parts are each genuine
    but wrongly arranged or borrowed from another version. A mismatch is then traced to the
    part at fault (named by its tensors) or blamed on the manifest."""
    if not full:
        check_parts(store, manifest, full=False)
        return
    hasher = new_hasher(parse_digest(manifest.digest)[0], parallel=True)
    for part in manifest.parts:
        try:
            path = store.check(part.digest, part.size, full=False, identity=False)
        except IntegrityError as exc:
            raise _named(manifest, part.digest, exc) from None
        hasher.update_file(path)
    if hasher.digest() != manifest.digest:
        check_parts(store, manifest, full=True)  # raises for a corrupt part
        raise IntegrityError(f"the parts of {manifest.digest} put together hash to "
                             f"{hasher.digest()}: its chunk manifest is wrong (forged?); the "
                             "store is damaged or was tampered with", digest=manifest.digest,
                             expected=manifest.digest, actual=hasher.digest())


def _named(manifest: ChunkManifest, digest: str, exc: IntegrityError) -> IntegrityError:
    return IntegrityError(f"{manifest.label(digest)} of {manifest.digest}: {exc}",
                          digest=digest, path=exc.path, expected=exc.expected,
                          actual=exc.actual)


def _check_part(store: LocalStorageBackend, manifest: ChunkManifest, digest: str, size: int,
                full: bool) -> None:
    try:
        store.check(digest, size, full=full)
    except IntegrityError as exc:
        raise _named(manifest, digest, exc) from None


def serve_assembled(store: LocalStorageBackend, manifest: ChunkManifest, name: str, *,
                    full: bool, progress: Progress | None = None,
                    check: Callable[[], None] | None = None) -> Path:
    """The version's bytes as ``cache/assembled/<algo>/<hex>/<name>`` (built if needed:
    building hash-checks the whole file and names a bad part). ``check``: with ``full``,
    run when an existing file is served (the parts' own check)."""
    if name == RECORD:
        name = parse_digest(manifest.digest)[1]
    algorithm, hexdigest = parse_digest(manifest.digest)
    parts = ("cache", "assembled", algorithm, hexdigest)
    with store_dir(store.root, parts, create=True) as dfd:
        # Shared lock while in use here: eviction and gc take it exclusively (without
        # waiting) and re-read the last-use time under it, so an entry is never removed
        # between our check and our hand-out.
        fcntl.flock(dfd, fcntl.LOCK_SH)
        with contextlib.suppress(OSError):  # in use from now: gc's grace starts again
            os.utime(RECORD, dir_fd=dfd, follow_symlinks=False)
        served = _existing(manifest, dfd, name, full=full)
        if served is None:
            _check_room(store, manifest)
            _build(store, manifest, dfd, name, progress)
        else:
            if full and check is not None:
                check()  # the parts too: a rotted part is reported while a copy exists
            if served != name:  # same bytes under another name: one more hard link
                _link_name(dfd, served, name)
        with contextlib.suppress(OSError):  # when it was last handed out (eviction, gc)
            os.utime(RECORD, dir_fd=dfd, follow_symlinks=False)
    path = store.root.joinpath(*parts, name)
    _evict(store, keep=hexdigest)
    return path


def _existing(manifest: ChunkManifest, dfd: int, name: str, *, full: bool) -> str | None:
    """The name of a good assembled file in ``dfd`` (``name`` first), or None."""
    record = _read_identity(dfd)
    if record is None:
        return None
    candidates = [name, *sorted(n for n in os.listdir(dfd) if n not in (name, RECORD)
                                and not n.startswith(".tmp-"))]
    for candidate in candidates:
        try:
            st = os.stat(candidate, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode) or not record.vouches_for(st):
            continue
        if full and _hash_at(dfd, candidate, manifest.digest) != manifest.digest:
            return None
        return candidate
    return None


def _check_room(store: LocalStorageBackend, manifest: ChunkManifest) -> None:
    """Refuse to put together a file bigger than the free space: a forged manifest that
    repeats one genuine part millions of times must not fill the disk before its digest
    is found wrong."""
    st = os.statvfs(store.root)
    free = st.f_bavail * st.f_frsize
    if manifest.size > free:
        raise StorageError(f"putting {manifest.digest} together needs {manifest.size} bytes, "
                           f"the store's disk has {free} free; free space, or pass "
                           "copy_to= on another disk", path=store.root)


def _hash_at(dfd: int, name: str, digest: str) -> str:
    with closing_fd(os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)) as fd:
        return hash_file(f"/proc/self/fd/{fd}", parse_digest(digest)[0])


def _build(store: LocalStorageBackend, manifest: ChunkManifest, dfd: int, name: str,
           progress: Progress | None) -> None:
    tmp = f".tmp-{secrets.token_hex(8)}"
    out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                  0o600, dir_fd=dfd)
    try:
        with closing_fd(out):
            assemble_into(store, manifest, out, progress)
            os.fchmod(out, 0o444)
            when = time.time_ns() - 1_000_000_000  # settled (store/_identity.py)
            os.utime(out, ns=(when, when))
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    # (other names of an older build stay: another process may have just handed one out;
    # its identity no longer matches the record, so it is never served again here)
    _write_identity(dfd, os.stat(name, dir_fd=dfd, follow_symlinks=False))


def assemble_into(store: LocalStorageBackend, manifest: ChunkManifest, out: int,
                  progress: Progress | None = None) -> None:
    """Write the parts in order into ``out`` (open for reading too), hashing what landed
    there; the result must hash to the version's digest, else the part at fault is found
    and named (``IntegrityError``)."""
    hasher = new_hasher(parse_digest(manifest.digest)[0], parallel=True)
    for part in manifest.parts:
        path = store.blob_path(part.digest)
        try:
            src = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            check_parts(store, manifest, full=False)  # names the missing part
            raise
        with closing_fd(src):
            if not stat.S_ISREG(os.fstat(src).st_mode) or os.fstat(src).st_size != part.size:
                check_parts(store, manifest, full=False)
            copied = copy_and_hash(src, out, hasher, _fsio.copy_range,
                                   start=os.lseek(out, 0, os.SEEK_CUR))
        if copied != part.size:
            check_parts(store, manifest, full=False)
        if progress is not None:
            progress(part.size)
    if hasher.digest() != manifest.digest:
        check_parts(store, manifest, full=True)  # raises for the corrupt part
        raise IntegrityError(f"the parts of {manifest.digest} put together hash to "
                             f"{hasher.digest()}: the chunk manifest is wrong",
                             digest=manifest.digest, expected=manifest.digest,
                             actual=hasher.digest())


def _link_name(dfd: int, served: str, name: str) -> None:
    """``name`` as one more hard link to the good file ``served`` (swapped in atomically)."""
    tmp = f".tmp-{secrets.token_hex(8)}"
    os.link(served, tmp, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
    try:
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise


def _read_identity(dfd: int) -> Identity | None:
    try:
        with closing_fd(os.open(RECORD, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=dfd)) as fd:
            return Identity.parse(json.loads(os.read(fd, 4096)))
    except (OSError, ValueError, RecursionError):
        return None


def _write_identity(dfd: int, st: os.stat_result) -> None:
    body = json.dumps(Identity.of(st).to_json()).encode()
    tmp = f".tmp-{secrets.token_hex(8)}"
    with closing_fd(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                            | os.O_CLOEXEC, 0o644, dir_fd=dfd)) as out:
        _fsio.write_all(out, body)
    os.replace(tmp, RECORD, src_dir_fd=dfd, dst_dir_fd=dfd)


def assembled_entries(store: LocalStorageBackend) -> list[tuple[tuple[str, ...], float, int]]:
    """Every ``cache/assembled/<algo>/<hex>`` as ``(parts, last handed out, bytes)``."""
    out: list[tuple[tuple[str, ...], float, int]] = []
    try:
        with store_dir(store.root, ("cache", "assembled"), create=False) as top:
            for algorithm in os.listdir(top):
                with contextlib.suppress(OSError), closing_fd(open_dir(
                        top, algorithm, create=False, where=Path(algorithm))) as afd:
                    for hexdigest in os.listdir(afd):
                        entry = _entry(afd, hexdigest)
                        if entry is not None:
                            out.append((("cache", "assembled", algorithm, hexdigest), *entry))
    except (FileNotFoundError, NotADirectoryError, ReproError):
        return out
    return out


def _entry(afd: int, name: str) -> tuple[float, int] | None:
    try:
        with closing_fd(open_dir(afd, name, create=False, where=Path(name))) as dfd:
            used = os.stat(dfd).st_mtime
            with contextlib.suppress(FileNotFoundError):
                used = os.stat(RECORD, dir_fd=dfd, follow_symlinks=False).st_mtime
            inodes = {}
            for child in os.listdir(dfd):
                st = os.stat(child, dir_fd=dfd, follow_symlinks=False)
                inodes[st.st_ino] = st.st_size
            return used, sum(inodes.values())
    except (OSError, ReproError):
        return None


def _evict(store: LocalStorageBackend, *, keep: str) -> None:
    """Keep the assembled cache under its cap: least recently handed out go first, never one
    handed out in the last ``KEEP_SECONDS``. Best effort (a cache)."""
    entries = assembled_entries(store)
    total = sum(size for _, _, size in entries)
    cap = constants.REPRO_ASSEMBLED_CACHE_BYTES
    for parts, _, size in sorted(entries, key=lambda e: e[1]):
        if total <= cap:
            return
        if parts[-1] != keep and remove_entry(store, parts, KEEP_SECONDS):
            total -= size


def remove_entry(store: LocalStorageBackend, parts: tuple[str, ...], idle: float) -> bool:
    """Remove one ``cache/assembled/<algo>/<hex>`` entry if it is not in use: its lock can
    be taken at once (no ``serve_assembled`` inside it), no live build, and — re-read under
    the lock — not handed out in the last ``idle`` seconds. False: kept."""
    try:
        with store_dir(store.root, parts[:-1], create=False) as parent, closing_fd(
                open_dir(parent, parts[-1], create=False, where=Path(*parts))) as dfd:
            try:
                fcntl.flock(dfd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            if time.time() - _last_use(dfd) < idle:
                return False
            remove_tree(parent, parts[-1])
            return True
    except FileNotFoundError:
        return True
    except (OSError, ReproError):
        return False


def _last_use(dfd: int) -> float:
    """When an entry was last handed out (its record's mtime; a directory never served has
    none: its own), or now-ish if a build is under way (a live temp file)."""
    now, used = time.time(), None
    building = []
    for name in os.listdir(dfd):
        try:
            mtime = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if name == RECORD:
            used = mtime
        elif name.startswith(".tmp-") and now - mtime <= constants.REPRO_STALE_TMP_SECONDS:
            building.append(mtime)
    return max([os.fstat(dfd).st_mtime if used is None else used, *building])
