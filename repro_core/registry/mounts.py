"""Which filesystem a path lives on: SQLite's WAL mode must not be used on network mounts."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["detect_network_fs"]

_NETWORK_FS = ("nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "ceph", "beegfs", "9p")


def detect_network_fs(path: str | Path, mountinfo: str | None = None) -> str | None:
    """Return the filesystem type if ``path`` lives on a network/FUSE filesystem, else None.

    Reads ``/proc/self/mountinfo`` (or the given text, for tests) and picks the longest mount
    point that contains ``path``.
    """
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, best_type = "", ""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 5 or not right.split():
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, right.split()[0]
    if best_type.startswith("fuse") or best_type.split(".")[0] in _NETWORK_FS:
        return best_type
    return None
