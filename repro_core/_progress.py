"""Progress bars for long work (hashing, verifying, copying multi-GB content), as
huggingface_hub and W&B show them: bytes done, rate, time left — on a terminal only.

    with progress(total_bytes, "verify") as advance:
        for chunk in chunks:
            ...
            advance(len(chunk))

A bar is drawn on stderr only when all of these hold, else ``advance`` is a no-op:

- stderr is a terminal (a log file or a CI job must not fill with redraws);
- ``REPRO_PROGRESS`` is not ``0`` (``constants.REPRO_PROGRESS``);
- the work is big enough to be worth a bar (``total >= min_total``; library callers keep the
  256 MiB default, the CLI passes ``min_total=0`` because the user is waiting on it).

Off costs one comparison and a function call per chunk: ``rich.progress`` is imported only
when a bar is actually drawn, and callers pass chunk sizes (16 MiB), not bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal

from . import constants

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

__all__ = ["MIN_TOTAL", "Advance", "active", "possible", "progress", "report", "tracked"]

Advance = Callable[[int], None]
# Below this a bar only flickers: a 256 MiB file hashes in well under a second here.
MIN_TOTAL = 256 * 1024 * 1024


def _noop(_: int) -> None:
    """What ``advance`` is when no bar is shown."""


def _stderr_console() -> Console | None:
    """A rich console on stderr when stderr is a terminal, else None (tests replace this)."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console

    return Console(stderr=True)


@contextmanager
def progress(total: int | None, description: str, *, min_total: int | None = None,
             unit: Literal["bytes", "items"] = "bytes",
             console: Console | None = None) -> Iterator[Advance]:
    """Yield ``advance(n)``: draws a transient bar of ``total`` (None: size unknown, a
    spinner-like bar) on a terminal, or does nothing. ``console`` forces a target (tests)."""
    if total is not None and total < (MIN_TOTAL if min_total is None else min_total):
        yield _noop
        return
    if not constants.REPRO_PROGRESS:
        yield _noop
        return
    target = console if console is not None else _stderr_console()
    if target is None or not target.is_terminal:
        yield _noop
        return
    with _bar(target, unit) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _bar(console: Console, unit: str) -> Progress:
    """A rich ``Progress`` with the columns for bytes (size, rate, time left) or items."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    counts = ((DownloadColumn(), TransferSpeedColumn()) if unit == "bytes"
              else (MofNCompleteColumn(),))
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), *counts,
                    TimeRemainingColumn(), console=console, transient=True)


# The bar of the operation in progress in this context (thread / task), if one is shown: the
# loops deep inside (hashing, copying) report to it without every function in between
# passing a callback along.
_CURRENT: ContextVar[Advance | None] = ContextVar("repro_progress", default=None)


@contextmanager
def tracked(total: int | None, description: str, **kwargs: Any) -> Iterator[None]:
    """Show a bar for the work inside the block (when ``progress`` would); the loops in it
    call :func:`report`. Costs one context-variable write when no bar is shown."""
    with progress(total, description, **kwargs) as advance:
        if advance is _noop:
            yield
            return
        token = _CURRENT.set(advance)
        try:
            yield
        finally:
            _CURRENT.reset(token)


def report(n: int) -> None:
    """Advance the current bar by ``n`` (bytes or items); nothing when there is none."""
    advance = _CURRENT.get()
    if advance is not None:
        advance(n)


def possible() -> bool:
    """Whether a bar could be shown at all (terminal, not turned off): lets callers skip
    measuring a total nobody will see."""
    return bool(constants.REPRO_PROGRESS) and sys.stderr.isatty()


def active() -> bool:
    """Whether a bar is shown in this context (lets hot loops skip per-chunk work)."""
    return _CURRENT.get() is not None
