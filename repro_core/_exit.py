"""A run left open when the interpreter exits is finished, not left RUNNING forever.

``wandb.init()`` without ``finish()`` behaves the same way: a clean exit marks the run
COMPLETED; ``sys.exit(code)`` with a non-zero code marks it FAILED (``sys.exit`` is wrapped to
see the code, as wandb does); an uncaught exception (seen through a chained
``sys.excepthook``) marks it FAILED, or INTERRUPTED for Ctrl-C. Only the process that opened the
run acts (a ``fork()`` child exiting must not finish its parent's run), only rank 0 writes, and
no barrier is attempted at exit (other ranks may be gone). ``kill -9`` cannot be caught: such a
run is shown CRASHED once its process is gone (``registry.runs``). Limits: ``raise SystemExit(n)``
bypasses ``sys.exit`` and reads as a clean exit, and a ``sys.exit(n)`` caught by the program
(argparse's, say) still counts; use ``ExperimentContext``, which sees the real exit.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import NoReturn

from .types import RunState

__all__ = ["Outcome", "install", "outcome", "reset", "set_outcome"]

Outcome = tuple[RunState, str] | None
_lock = threading.Lock()
_installed = False
_outcome: Outcome = None
_finisher: Callable[[Outcome], None] | None = None


def install(finisher: Callable[[Outcome], None]) -> None:
    """Hook ``sys.excepthook``, ``sys.exit`` and ``atexit`` once per process (idempotent).

    ``finisher`` is called at interpreter exit with what was seen (None: a clean exit); the
    manager hands it in, so this module needs nothing from the manager (no import cycle).
    """
    global _installed, _finisher
    with _lock:
        _finisher = finisher
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


def set_outcome(state: RunState, reason: str) -> None:
    """Record how the process is ending (a SIGTERM handler raising ``SystemExit``, which
    neither ``sys.excepthook`` nor the ``sys.exit`` wrapper sees)."""
    _set_outcome(state, reason)


def outcome() -> Outcome:
    """What was seen so far (None: nothing yet, a clean exit), for adapters that finish a
    run of their own at exit before the manager's finisher runs."""
    return _outcome


def reset() -> None:
    """Forget what an earlier run saw (a caught ``sys.exit`` must not fail the next run)."""
    global _outcome
    _outcome = None


def _finish_open_run() -> None:
    if _finisher is None:
        return
    with contextlib.suppress(Exception):  # never turn a clean exit into a crash
        _finisher(_outcome)
