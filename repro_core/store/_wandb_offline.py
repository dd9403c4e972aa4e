"""Waiting for an offline W&B run's record to reach the disk.

``run.finish()`` (wandb 0.31) returns once wandb-core has *handled* the run's exit; the run's
transaction log, ``run-<id>.wandb`` — the file ``wandb sync`` uploads — is written when
wandb-core closes the run's stream, a moment later (seen here: still only its 7-byte header
when ``finish`` returned, complete half a second later). A push that recorded a version as
mirrored while its artifact record sat in another process's buffer would lose it silently if
the machine went down then, so :meth:`WandBStorageBackend.close` waits, bounded, until the
file's last record is the run's ``exit`` record.

The file, as ``wandb sync`` reads it (W&B's LevelDB-style log)::

    header   ":W&B" 0xBEE1 (little-endian) 0x00                       7 bytes
    blocks   32 KiB each; a tail under 7 bytes is padding
    chunk    CRC-32(type byte + payload) u32 LE | length u16 LE | type u8 | payload
             type FULL=1 is a whole record; FIRST=2, MIDDLE=3, LAST=4 split one
    record   a serialized ``wandb.proto.wandb_internal_pb2.Record``
"""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

__all__ = ["FLUSH_TIMEOUT", "last_record_type", "wait_for_exit_record"]

FLUSH_TIMEOUT = 30.0  # seconds; wandb-core normally writes the file within one
_HEADER = b":W&B" + (0xBEE1).to_bytes(2, "little") + b"\x00"
_BLOCK = 32 * 1024
_FULL, _FIRST, _LAST = 1, 2, 4


def _last_payload(data: bytes) -> bytes | None:
    """The last complete record's bytes, or None (no record yet, or a torn/unwritten tail)."""
    if data[:7] != _HEADER:
        return None
    last, pending, pos = None, b"", 7
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:
            pos += room
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length or zlib.crc32(bytes([kind]) + chunk) != crc:
            return None  # being written: not complete yet
        pos += 7 + length
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            last = pending
    return last


def last_record_type(path: Path) -> str | None:
    """The type (``exit``, ``artifact``, …) of the last complete record of ``path``."""
    from wandb.proto import wandb_internal_pb2

    try:
        payload = _last_payload(path.read_bytes())
    except OSError:
        return None
    if payload is None:
        return None
    record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # (generated code)
    try:
        record.ParseFromString(payload)
    except Exception:  # protobuf's DecodeError: a tail not written yet
        return None
    return record.WhichOneof("record_type")


def wait_for_exit_record(path: Path, timeout: float = FLUSH_TIMEOUT) -> bool:
    """Whether ``path`` ends in the run's exit record within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        if last_record_type(path) == "exit":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.2)
