"""What each blob looked like when its content was last known good.

A served path is a hard link to its blob (the same inode), and root may write to a 0444 file:
``open(meta.path, "r+b").write(...)`` silently changes the shared blob. Any write changes the
inode's mtime and ctime, so for each blob we keep the identity seen right after it was published
or re-hashed — ``(device, inode, size, mtime_ns, ctime_ns, nlink)`` — and a size-only check
(``use_artifact(verify=False)``) re-hashes anyway when the identity changed.

Records live in ``cache/identity/<algo>/<ab>/<rest>``, one small JSON file per blob, replaced
atomically. They are a cache: a missing, unreadable or unwritable record costs one re-hash, never
correctness. They do not defend against someone who can write the store (they can write these
records too): ``verify=True`` does, by hashing.

Two details keep the comparison sound:

- Timestamps are coarse (one kernel tick; a second on some filesystems), so a write in the same
  tick as our record could leave mtime unchanged. When a record is made for a file modified in
  the last two seconds, its mtime is first set one second into the past (``_settle``): a value
  no later write can produce, since writes stamp the current time.
- Making a hard link (every cache entry does) changes ctime *and* nlink, while writes never
  change nlink; so a ctime change that comes with an nlink change is not a write.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .._safepath import store_dir
from ..errors import IntegrityError
from ..hashing import parse_digest

__all__ = ["Identity", "forget", "load", "remember", "save"]

_RECENT_NS = 2_000_000_000  # files modified this recently get their mtime settled first
_BACKDATE_NS = 1_000_000_000


@dataclass(frozen=True)
class Identity:
    """The parts of ``stat`` that any write to the file changes."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    nlink: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                   st.st_nlink)

    def vouches_for(self, st: os.stat_result) -> bool:
        """True when ``st`` is this file, unwritten since (see the module docstring)."""
        now = Identity.of(st)
        if (self.dev, self.ino, self.size, self.mtime_ns) != (now.dev, now.ino, now.size,
                                                               now.mtime_ns):
            return False
        return self.ctime_ns == now.ctime_ns or self.nlink != now.nlink

    @classmethod
    def parse(cls, value: object) -> Identity | None:
        """From the JSON form; None for anything malformed (records are untrusted too)."""
        fields = cls.__dataclass_fields__
        if not isinstance(value, dict) or set(value) != set(fields):
            return None
        if not all(type(v) is int for v in value.values()):
            return None
        return cls(**value)

    def to_json(self) -> dict[str, int]:
        return asdict(self)


def _location(digest: str) -> tuple[tuple[str, ...], str]:
    algorithm, hexdigest = parse_digest(digest)
    return ("cache", "identity", algorithm, hexdigest[:2]), hexdigest[2:]


def load(root: Path, digest: str) -> Identity | None:
    """The recorded identity of a blob, or None (no record, or one we cannot read or trust)."""
    parts, name = _location(digest)
    try:
        fd = os.open(root.joinpath(*parts, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
        return Identity.parse(json.loads(raw))
    except (OSError, ValueError, RecursionError):
        return None


def save(root: Path, digest: str, st: os.stat_result) -> None:
    """Record ``st`` as the blob's known-good identity (best effort: a store we may not write
    to just re-hashes more often)."""
    parts, name = _location(digest)
    body = json.dumps(Identity.of(st).to_json()).encode()
    tmp = f".{name[:16]}.{secrets.token_hex(6)}.tmp"
    with contextlib.suppress(OSError, IntegrityError), store_dir(root, parts, create=True) as fd:
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o644, dir_fd=fd)
        try:
            os.write(out, body)
        finally:
            os.close(out)
        try:
            os.replace(tmp, name, src_dir_fd=fd, dst_dir_fd=fd)
        except OSError:
            os.unlink(tmp, dir_fd=fd)
            raise


def forget(root: Path, digest: str) -> None:
    """Drop the record (the content is known bad): the next publish of these bytes replaces the
    blob instead of trusting it, which is how re-logging repairs a rotted blob."""
    parts, name = _location(digest)
    with contextlib.suppress(OSError, IntegrityError), store_dir(root, parts,
                                                                 create=False) as fd:
        os.unlink(name, dir_fd=fd)


def remember(root: Path, digest: str, path: Path, seen: os.stat_result) -> None:
    """After hashing ``path`` (and finding it good) with ``seen`` its ``lstat`` beforehand:
    record it, unless it changed meanwhile."""
    try:
        now = os.lstat(path)
    except OSError:
        return
    if Identity.of(now) != Identity.of(seen):
        return  # written to while we hashed: the hash may not describe what is there now
    settled = _settle(path, now)
    if settled is not None:
        save(root, digest, settled)


def backdated(path: Path) -> os.stat_result | None:
    """Set ``path``'s mtime one second back (also refreshes it for gc's grace period);
    the new ``lstat``, or None where we may not (someone else's file)."""
    when = time.time_ns() - _BACKDATE_NS
    try:
        os.utime(path, ns=(when, when), follow_symlinks=False)
        st = os.lstat(path)
    except OSError:
        return None
    return st if stat.S_ISREG(st.st_mode) else None


def _settle(path: Path, st: os.stat_result) -> os.stat_result | None:
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RECENT_NS:
        return st
    return backdated(path)
