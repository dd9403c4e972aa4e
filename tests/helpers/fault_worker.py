"""Child-process side of ``tests/test_faults.py``: one subcommand per fault scenario.

Run as a script (``python fault_worker.py <command> …``), never imported by the tests, so every
child is a fresh interpreter (the same isolation as multiprocessing's 'spawn' context) and a
SIGKILL or an RLIMIT in it cannot touch the pytest process. Each command talks to the parent on
stdout, one JSON object or one word per line, flushed at once:

``concurrent ROOT NAME WRITER COUNT``
    print ``ready``, wait for ``go`` on stdin (so all writers start together), log COUNT distinct
    ``data=`` values under NAME, finalize, print ``{"versions": [...]}``.
``large ROOT FILE NAME CHUNK``
    open the store with ``IO_CHUNK = CHUNK``, print ``ready``, ``log_large_artifact(FILE)``,
    print ``{"version": …, "seconds": …}``. The parent SIGKILLs it somewhere in between.
``fsize ROOT FILE NAME LIMIT MODE``
    open the store, cap the size of any file this process writes at LIMIT bytes
    (``RLIMIT_FSIZE``, SIGXFSZ ignored so the write fails with EFBIG instead of killing us), log
    FILE (MODE ``file``: ``file_path=``; ``data``: its bytes as ``data=``), report the error,
    then log a small artifact to show the same process can still write.
"""

from __future__ import annotations

import json
import resource
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import repro_core
from repro_core import ArtifactManager, constants


def _say(line: str | dict[str, Any]) -> None:
    sys.stdout.write((json.dumps(line) if isinstance(line, dict) else line) + "\n")
    sys.stdout.flush()


def _error_record(exc: BaseException) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc),
        "errno": getattr(exc, "errno", None),
        "path": str(getattr(exc, "path", None)),
    }


def concurrent(root: str, name: str, writer: str, count: str) -> None:
    mgr = ArtifactManager.reset_instance()
    _say("ready")
    if sys.stdin.readline().strip() != "go":
        raise SystemExit("parent did not say go")
    mgr.init_run(f"writer-{writer}", root=root)
    versions = []
    for seq in range(int(count)):
        meta = mgr.log_artifact(name, "dataset", data={"writer": int(writer), "seq": seq})
        versions.append(int(meta.version.removeprefix("v")))
    mgr.finalize_run()
    _say({"versions": versions})


def large(root: str, file: str, name: str, chunk: str) -> None:
    constants.IO_CHUNK = int(chunk)
    mgr = ArtifactManager.reset_instance()
    mgr.init_run("large-writer", root=root)
    _say("ready")
    start = time.perf_counter()
    meta = mgr.log_large_artifact(name, file)
    seconds = time.perf_counter() - start
    mgr.finalize_run()
    _say({"version": meta.version, "seconds": seconds})


def fsize(root: str, file: str, name: str, limit: str, mode: str) -> None:
    mgr = ArtifactManager.reset_instance()
    mgr.init_run("fsize-writer", root=root)
    content = Path(file).read_bytes() if mode == "data" else None
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    result: dict[str, Any] = {}
    try:
        if content is not None:
            meta = mgr.log_artifact(name, "dataset", data=content)
        else:
            meta = mgr.log_artifact(name, "dataset", file_path=file)
        result["logged"] = meta.version
    except repro_core.ReproError as exc:
        result["error"] = _error_record(exc)
    except OSError as exc:  # a raw OSError is a bug the parent reports
        result["error"] = _error_record(exc)
    after = mgr.log_artifact(f"{name}-after", "config", data={"still": "writable"})
    result["after"] = after.version
    mgr.finalize_run()
    _say(result)


COMMANDS: dict[str, Callable[..., None]] = {
    "concurrent": concurrent,
    "large": large,
    "fsize": fsize,
}

if __name__ == "__main__":
    COMMANDS[sys.argv[1]](*sys.argv[2:])
