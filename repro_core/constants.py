"""Every setting repro reads from the environment, parsed once.

Other modules read ``constants.X`` at call time (never ``from constants import X``) so tests
and users can monkeypatch a value without re-importing anything.

Variables (README's "Settings" table says the same):

- ``REPRO_HOME``: store root (default ``./repro_store``).
- ``REPRO_OFFLINE``: never talk to a remote tracker (default off).
- ``REPRO_HASH``: digest algorithm of *new* stores, ``blake3`` (default) or ``sha256``.
- ``REPRO_VERIFY``: ``full`` re-hashes on ``use_artifact`` (default); ``size`` checks size only.
- ``REPRO_FSYNC``: ``full`` fsyncs blobs, directories and SQLite (default); ``none`` skips them.
- ``REPRO_BARRIER_TIMEOUT``: seconds a rank waits for the others (default 300).
- ``REPRO_STALE_TMP_SECONDS``: temp files older than this are swept even if their lock state
  is unknown (default 86400).
"""

from __future__ import annotations

import os

_TRUE = {"1", "true", "yes", "on", "y"}


def _is_true(value: str | None) -> bool:
    return value is not None and value.strip().lower() in _TRUE


def _as_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from exc


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = os.environ.get(name, default).strip().lower() or default
    if raw not in allowed:
        raise ValueError(f"{name}={raw!r}: expected one of {', '.join(allowed)}")
    return raw


DEFAULT_HOME = "repro_store"
HASH_ALGORITHMS = ("blake3", "sha256")
FSYNC_MODES = ("full", "none")
VERIFY_MODES = ("full", "size")

REPRO_HOME: str | None = os.environ.get("REPRO_HOME") or None
REPRO_OFFLINE: bool = _is_true(os.environ.get("REPRO_OFFLINE"))
REPRO_HASH: str = _choice("REPRO_HASH", "blake3", HASH_ALGORITHMS)
REPRO_VERIFY: str = _choice("REPRO_VERIFY", "full", VERIFY_MODES)
REPRO_FSYNC: str = _choice("REPRO_FSYNC", "full", FSYNC_MODES)
REPRO_BARRIER_TIMEOUT: float = _as_float("REPRO_BARRIER_TIMEOUT", 300.0)
REPRO_STALE_TMP_SECONDS: float = _as_float("REPRO_STALE_TMP_SECONDS", 86400.0)

# I/O sizes: big buffers keep hashing and copying near memory bandwidth.
IO_CHUNK = 16 * 1024 * 1024
# Files at least this big are hashed with every core (BLAKE3 is parallel within one file).
PARALLEL_HASH_MIN = 32 * 1024 * 1024
# SQLite waits this long for a competing writer before giving up.
SQLITE_BUSY_TIMEOUT_MS = 60_000
