"""What the single-process Accelerate test modules share: Accelerate's process-wide state
reset around every test, and trackers that a failing test cannot leave running."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from accelerate.state import AcceleratorState, GradientState

from repro_core import RunState
from repro_lightning import ReproTracker

PROJECT = "acc"
_TRACKERS: list[ReproTracker] = []


def reset_accelerate() -> None:
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def fresh_accelerate() -> Iterator[None]:
    """Accelerate's singletons reset around every test (as Accelerate's own
    ``AccelerateTestCase`` does); a run a failing test left open is finished."""
    reset_accelerate()
    yield
    while _TRACKERS:
        tracker = _TRACKERS.pop()
        tracker.wait()
        if tracker._session.active:
            tracker._session.finish(RunState.COMPLETED)
    reset_accelerate()


def make_tracker(**kwargs: Any) -> ReproTracker:
    """A ``ReproTracker`` of project ``PROJECT`` (hardware monitor off), finished after the
    test if it is still running."""
    kwargs.setdefault("project", PROJECT)
    kwargs.setdefault("monitor_hardware", False)
    tracker = ReproTracker(**kwargs)
    _TRACKERS.append(tracker)
    return tracker
