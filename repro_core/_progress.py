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
from typing import TYPE_CHECKING, Literal

from . import constants

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

__all__ = ["MIN_TOTAL", "Advance", "progress"]

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
def progress(total: int | None, description: str, *, min_total: int = MIN_TOTAL,
             unit: Literal["bytes", "items"] = "bytes",
             console: Console | None = None) -> Iterator[Advance]:
    """Yield ``advance(n)``: draws a transient bar of ``total`` (None: size unknown, a
    spinner-like bar) on a terminal, or does nothing. ``console`` forces a target (tests)."""
    if total is not None and total < min_total:
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
