"""A run left open when the interpreter exits is finished, not left RUNNING forever.

``wandb.init()`` without ``finish()`` behaves the same way: a clean exit marks the run
COMPLETED; ``sys.exit(code)`` with a non-zero code marks it FAILED (``sys.exit`` is wrapped to
see the code, as wandb does); an uncaught exception (seen through a chained
``sys.excepthook``) marks it FAILED, or INTERRUPTED for Ctrl-C. Only the process that opened the
run acts (a ``fork()`` child exiting must not finish its parent's run), only rank 0 writes, and
no barrier is attempted at exit (other ranks may be gone). ``kill -9`` cannot be caught: such a
run stays RUNNING, which is the truth as far as anyone can tell. Limits: ``raise SystemExit(n)``
bypasses ``sys.exit`` and reads as a clean exit, and a ``sys.exit(n)`` caught by the program
(argparse's, say) still counts; use ``ExperimentContext``, which sees the real exit.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn

from .types import RunState

if TYPE_CHECKING:
    from .manager import ArtifactManager

__all__ = ["install"]

_lock = threading.Lock()
_installed = False
_outcome: tuple[RunState, str] | None = None


def install() -> None:
    """Hook ``sys.excepthook``, ``sys.exit`` and ``atexit`` once per process (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        previous_hook, previous_exit = sys.excepthook, sys.exit

        def hook(kind: type[BaseException], exc: BaseException,
                 tb: TracebackType | None) -> None:
            state = (RunState.INTERRUPTED if issubclass(kind, KeyboardInterrupt)
                     else RunState.FAILED)
            _set_outcome(state, f"uncaught {kind.__name__}: {exc}")
            previous_hook(kind, exc, tb)

        def exit_(status: object = None) -> NoReturn:
            # sys.exit in a thread ends only that thread: not the process's outcome.
            if status not in (None, 0) and threading.current_thread() is threading.main_thread():
                _set_outcome(RunState.FAILED, f"sys.exit({status!r})")
            previous_exit(status)  # type: ignore[arg-type]
            raise SystemExit(status)  # unreachable: sys.exit always raises

        sys.excepthook = hook
        sys.exit = exit_
        atexit.register(_finish_open_run)
        _installed = True


def _set_outcome(state: RunState, reason: str) -> None:
    global _outcome
    _outcome = (state, reason)


def reset() -> None:
    """Forget what an earlier run saw (a caught ``sys.exit`` must not fail the next run)."""
    global _outcome
    _outcome = None


def _finish_open_run() -> None:
    from .manager import ArtifactManager

    manager: ArtifactManager | None = ArtifactManager._instance
    run = manager.current_run if manager is not None else None
    if manager is None or run is None or not run.is_rank_zero or run.id is None:
        return
    if manager._run_pid != os.getpid():
        return  # a forked child: the run belongs to the parent
    if _outcome is not None:
        state, reason = _outcome
    else:
        state = run.state if run.state.is_terminal else RunState.COMPLETED
        reason = "finalized at interpreter exit (finalize_run() was not called)"
    with contextlib.suppress(Exception):  # never turn a clean exit into a crash
        manager._finish(run, state, reason=reason)
    manager._run = None
