"""Every setting repro reads from the environment, parsed once, on first use.

Other modules read ``constants.X`` at call time (never ``from constants import X``) so tests
and users can monkeypatch a value without re-importing anything.

A bad value is an :class:`~repro_core.errors.InvalidArgumentError` naming the variable, raised
where the setting is first *used* — never at ``import repro_core``, which would turn a typo in
one variable into a traceback in every program that merely imports the package (and in the
CLI, which prints it as one line and exits 2). Settings are parsed lazily through the module's
``__getattr__`` (PEP 562) and cached as ordinary attributes after the first read.

Variables (README's "Settings" table says the same):

- ``REPRO_HOME``: store root (default ``./repro_store``).
- ``REPRO_OFFLINE``: never talk to a remote tracker (default off).
- ``REPRO_HASH``: digest algorithm of *new* stores, ``blake3`` (default) or ``sha256``.
- ``REPRO_VERIFY``: ``full`` re-hashes on ``use_artifact`` (default); ``size`` checks size only.
- ``REPRO_FSYNC``: ``full`` fsyncs blobs, directories and SQLite (default); ``none`` skips them.
- ``REPRO_BARRIER_TIMEOUT``: seconds a rank waits for the others (default 300).
- ``REPRO_STALE_TMP_SECONDS``: temp files older than this are swept even if their lock state
  is unknown (default 86400).
- ``REPRO_PROGRESS``: ``0`` turns progress bars off (they show only on a terminal anyway).
- ``REPRO_MATERIALIZE``: ``link`` (default: read-only links into the store) or ``copy``
  (private writable copies) for what ``use_artifact`` hands out.
- ``REPRO_GIT_TIMEOUT``: seconds each git call of a capture may take (default 10).
- ``REPRO_MAX_PATCH_BYTES``: cap on the captured git patch (default 1 MiB).
- ``REPRO_REMOTE_RETRIES``: retries of a remote-store request that failed transiently
  (connection refused or reset, timeout, 5xx, throttling), with exponential backoff (default 4).
- ``REPRO_REMOTE_BACKOFF``: seconds before the first such retry; doubled for each next one
  (default 0.5).
- ``REPRO_REMOTE``: the remote a command means when none is named, and the remote a run
  mirrors its artifacts to in the background as they land (unset: no mirroring).
- ``REPRO_REMOTE_TIMEOUT``: seconds finishing a run waits for its background pushes before it
  leaves the rest queued for the next open or ``repro push`` (default 120).
- ``REPRO_REGISTRY_TIMEOUT``: seconds an operation waits for a PostgreSQL registry's server
  (a restart, an outage) before it fails; the metrics writer keeps retrying (default 60).

- ``REPRO_CHUNK_MIN_BYTES``: files and safetensors payloads at least this big are stored
  chunked — per-tensor blobs for safetensors, content-defined chunks for other files — so
  versions share what did not change (default 32 MiB; ``off``: every file as one blob).
- ``REPRO_ASSEMBLED_CACHE_BYTES``: how much of ``cache/assembled/`` (chunked files put back
  together for ``use_artifact(...).path``) is kept before the least recently used files go
  (default 8 GiB; a file served in the last 10 minutes is never removed).

``REPRO_REGISTRY`` (a ``postgresql://`` URL) is read at every registry open, not here (see
``repro_core.registry.target``), and ``REPRO_REDACT_ALLOW`` / ``REPRO_REDACT_DENY`` at every
capture (``capture/redact.py``), so a program may change them between captures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


def _bad(name: str, raw: str, expected: str) -> Exception:
    from .errors import InvalidArgumentError  # errors imports nothing of ours: no cycle

    return InvalidArgumentError(f"environment variable {name}={raw!r}: expected {expected}",
                                argument=name)


def _as_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad(name, raw, "a number of seconds > 0") from None
    if not math.isfinite(value) or value <= 0:
        raise _bad(name, raw, "a number of seconds > 0")
    return value


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    raw = os.environ.get(name, "")
    value = raw.strip().lower() or default
    if value not in allowed:
        raise _bad(name, raw, f"one of {', '.join(allowed)}")
    return value


def _positive_int(name: str, default: int) -> int:
    return _int_at_least(name, default, 1, "a whole number > 0")


def _count(name: str, default: int) -> int:
    return _int_at_least(name, default, 0, "a whole number >= 0")


def _bytes_or_off(name: str, default: int) -> int | None:
    """A byte count > 0, or ``off`` (None)."""
    raw = os.environ.get(name, "")
    if raw.strip().lower() in ("off", "none", "no", "false"):
        return None
    return _int_at_least(name, default, 1, "a byte count > 0 or 'off'")


def _int_at_least(name: str, default: int, low: int, expected: str) -> int:
    raw = os.environ.get(name, "")
    if not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise _bad(name, raw, expected) from None
    if value < low:
        raise _bad(name, raw, expected)
    return value


def _flag(name: str, default: bool) -> bool:
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise _bad(name, raw, "1/0, true/false, yes/no or on/off")


DEFAULT_HOME = "repro_store"
HASH_ALGORITHMS = ("blake3", "sha256")
FSYNC_MODES = ("full", "none")
VERIFY_MODES = ("full", "size")
MATERIALIZE_MODES = ("link", "copy")

# Parsed on first access (see the module docstring); the annotations document the types.
REPRO_HOME: str | None
REPRO_OFFLINE: bool
REPRO_HASH: str
REPRO_VERIFY: str
REPRO_FSYNC: str
REPRO_BARRIER_TIMEOUT: float
REPRO_STALE_TMP_SECONDS: float
REPRO_PROGRESS: bool
REPRO_MATERIALIZE: str
REPRO_CHUNK_MIN_BYTES: int | None
REPRO_ASSEMBLED_CACHE_BYTES: int
REPRO_GIT_TIMEOUT: float
REPRO_MAX_PATCH_BYTES: int
REPRO_REMOTE_RETRIES: int
REPRO_REMOTE_BACKOFF: float
REPRO_REMOTE: str | None
REPRO_REMOTE_TIMEOUT: float
REPRO_REGISTRY_TIMEOUT: float

_PARSERS: dict[str, Callable[[], Any]] = {
    "REPRO_HOME": lambda: os.environ.get("REPRO_HOME") or None,
    "REPRO_OFFLINE": lambda: _flag("REPRO_OFFLINE", False),
    "REPRO_HASH": lambda: _choice("REPRO_HASH", "blake3", HASH_ALGORITHMS),
    "REPRO_VERIFY": lambda: _choice("REPRO_VERIFY", "full", VERIFY_MODES),
    "REPRO_FSYNC": lambda: _choice("REPRO_FSYNC", "full", FSYNC_MODES),
    "REPRO_BARRIER_TIMEOUT": lambda: _as_seconds("REPRO_BARRIER_TIMEOUT", 300.0),
    "REPRO_STALE_TMP_SECONDS": lambda: _as_seconds("REPRO_STALE_TMP_SECONDS", 86400.0),
    "REPRO_PROGRESS": lambda: _flag("REPRO_PROGRESS", True),
    "REPRO_MATERIALIZE": lambda: _choice("REPRO_MATERIALIZE", "link", MATERIALIZE_MODES),
    "REPRO_GIT_TIMEOUT": lambda: _as_seconds("REPRO_GIT_TIMEOUT", 10.0),
    "REPRO_MAX_PATCH_BYTES": lambda: _positive_int("REPRO_MAX_PATCH_BYTES", 1 << 20),
    "REPRO_REMOTE_RETRIES": lambda: _count("REPRO_REMOTE_RETRIES", 4),
    "REPRO_REMOTE_BACKOFF": lambda: _as_seconds("REPRO_REMOTE_BACKOFF", 0.5),
    "REPRO_REMOTE": lambda: os.environ.get("REPRO_REMOTE", "").strip() or None,
    "REPRO_REMOTE_TIMEOUT": lambda: _as_seconds("REPRO_REMOTE_TIMEOUT", 120.0),
    "REPRO_REGISTRY_TIMEOUT": lambda: _as_seconds("REPRO_REGISTRY_TIMEOUT", 60.0),
    "REPRO_CHUNK_MIN_BYTES": lambda: _bytes_or_off("REPRO_CHUNK_MIN_BYTES", 32 << 20),
    "REPRO_ASSEMBLED_CACHE_BYTES": lambda: _positive_int("REPRO_ASSEMBLED_CACHE_BYTES", 8 << 30),
}
#: Every setting parsed here (the CLI checks them all before running a command).
SETTINGS = tuple(_PARSERS)


def __getattr__(name: str) -> Any:
    """Parse a setting the first time it is read, then keep it as a plain attribute."""
    parser = _PARSERS.get(name)
    if parser is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = parser()
    globals()[name] = value
    return value


def reload() -> None:
    """Forget parsed settings so the next read sees the current environment (for tests)."""
    for name in _PARSERS:
        globals().pop(name, None)


# I/O sizes: big buffers keep hashing and copying near memory bandwidth.
IO_CHUNK = 16 * 1024 * 1024
# Files at least this big are hashed with every core (BLAKE3 is parallel within one file).
PARALLEL_HASH_MIN = 32 * 1024 * 1024
# Remote stores are read back this much at a time (S3: from one streamed GetObject; other
# fsspec filesystems: reads of this size). The HTTP stack holds a few copies of one read while
# it is in flight (measured: ~30 MiB peak at 8 MiB, ~70 MiB at 16 MiB). Upload part sizes and
# concurrency are the backend's (``store/_blob_config.py``).
REMOTE_READ_CHUNK = 8 * 1024 * 1024
# SQLite waits this long for a competing writer before giving up.
SQLITE_BUSY_TIMEOUT_MS = 60_000
