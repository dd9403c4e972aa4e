"""A run left open when the interpreter exits is finished, not left RUNNING forever.

``wandb.init()`` without ``finish()`` behaves the same way: a clean exit marks the run
COMPLETED; an uncaught exception (seen through a chained ``sys.excepthook``) marks it FAILED
with the exception as the reason. Only rank 0 writes, and no barrier is attempted at exit
(the other ranks may be gone). ``kill -9`` cannot be caught: such a run stays RUNNING, which
is the truth as far as anyone can tell.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
from types import TracebackType
from typing import TYPE_CHECKING

from .types import RunState

if TYPE_CHECKING:
    from .manager import ArtifactManager

__all__ = ["install"]

_lock = threading.Lock()
_installed = False
_uncaught: str | None = None


def install() -> None:
    """Hook ``sys.excepthook`` and ``atexit`` once per process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        previous = sys.excepthook

        def hook(kind: type[BaseException], exc: BaseException,
                 tb: TracebackType | None) -> None:
            global _uncaught
            _uncaught = f"uncaught {kind.__name__}: {exc}"
            previous(kind, exc, tb)

        sys.excepthook = hook
        atexit.register(_finish_open_run)
        _installed = True


def _finish_open_run() -> None:
    from .manager import ArtifactManager

    manager: ArtifactManager | None = ArtifactManager._instance
    run = manager.current_run if manager is not None else None
    if manager is None or run is None or not run.is_rank_zero or run.id is None:
        return
    if _uncaught is not None:
        state, reason = RunState.FAILED, _uncaught
    else:
        state = run.state if run.state.is_terminal else RunState.COMPLETED
        reason = "finalized at interpreter exit (finalize_run() was not called)"
    with contextlib.suppress(Exception):  # never turn a clean exit into a crash
        manager._finish(run, state, reason=reason)
    manager._run = None
