"""Child-process side of ``tests/backend_suite.py``: one storage backend in a fresh interpreter.

Run as ``python backend_worker.py SPEC COMMAND ARGS…`` where SPEC is the JSON the harness
gives (``{"kind": "local", "root": …}`` or ``{"kind": "fsspec", "url": …, …}``); credentials
and ``AWS_ENDPOINT_URL`` come from the inherited environment, as for any user. Each command
talks to the parent on stdout, one word or JSON object per line, flushed at once:

``upload FILE DIGEST``
    print ``ready``, wait for ``go`` on stdin (so several writers start together), upload,
    print ``done``.
``stall FILE DIGEST BYTES``
    upload, but once BYTES have been hashed print ``stalled`` and sleep: the parent SIGKILLs
    the process mid-transfer.
``rss FILE DIGEST TARGET``
    warm up on a small file, then upload FILE and download it to TARGET; print
    ``{"growth_mb": …}``: the peak RSS during the transfers minus the RSS before them. The
    peak is the kernel's high-water mark (``VmHWM``), reset before the transfers through
    ``/proc/self/clear_refs``; ``getrusage``'s ``ru_maxrss`` would not do: after fork+exec it
    starts at the *parent's* RSS (pytest's, with moto's objects in it), which hides any growth.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from repro_core import hashing
from repro_core.store import FsspecStorageBackend, LocalStorageBackend, StorageBackend


def make_backend(spec: dict[str, Any]) -> StorageBackend:
    if spec["kind"] == "local":
        return LocalStorageBackend(spec["root"])
    return FsspecStorageBackend(spec["url"], block_size=spec.get("block_size"),
                                retries=spec.get("retries"), backoff=spec.get("backoff"),
                                max_concurrency=spec.get("max_concurrency"))


def _say(line: str | dict[str, Any]) -> None:
    sys.stdout.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")
    sys.stdout.flush()


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _stall_after(limit: int) -> None:
    """Every hasher (local copy, remote stream) feeds ``_Digester.update``: block it there."""
    original = hashing._Digester.update
    seen = [0]

    def update(self: hashing._Digester, data: bytes | bytearray | memoryview) -> None:
        original(self, data)
        seen[0] += len(data)
        if seen[0] >= limit:
            _say("stalled")
            time.sleep(600)

    hashing._Digester.update = update  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    spec, command, args = json.loads(argv[0]), argv[1], argv[2:]
    backend = make_backend(spec)
    if command == "upload":
        _say("ready")
        sys.stdin.readline()
        backend.upload(Path(args[0]), args[1])
        _say("done")
    elif command == "stall":
        _stall_after(int(args[2]))
        backend.upload(Path(args[0]), args[1])
        _say("finished")  # (the parent kills us before this)
    elif command == "rss":
        with tempfile.TemporaryDirectory() as tmp:  # every code path runs once before we measure
            small = Path(tmp) / "small"
            small.write_bytes(os.urandom(1 << 20))
            digest = hashing.hash_file(small)
            backend.upload(small, digest)
            backend.download(digest, Path(tmp) / "back")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_mb("VmRSS")
        assert _status_mb("VmHWM") - before < 8, "the peak RSS could not be reset"
        backend.upload(Path(args[0]), args[1])
        after_upload = _status_mb("VmHWM")
        backend.download(args[1], Path(args[2]))
        _say({"growth_mb": _status_mb("VmHWM") - before, "upload_mb": after_upload - before,
              "before_mb": before})
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
