"""Damaging a store on purpose, as bit rot or a careless hand would (shared by the tests)."""

from __future__ import annotations

from pathlib import Path


def flip_byte(path: Path, offset: int) -> None:
    """Flip one bit of the byte at ``offset`` of a read-only file (a blob, an assembled file)
    and make it read-only again."""
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    path.chmod(0o444)
