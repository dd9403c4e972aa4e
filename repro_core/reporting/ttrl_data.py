"""A TTRL run's online updates for the report: reward, confidence and KL over the update
number, where each checkpoint falls on that axis, and which updates produced each checkpoint
(the answer ``repro updates RUN --checkpoint KEY`` gives, for every checkpoint at once).

The update axis (1, 2, …) is the one TTRL users reason in ("checkpoint v3 after update 200");
wall time would squeeze the bursts of updates between slow evaluations into slivers.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np

from ..registry import Registry, VersionRow
from ..ttrl import run_updates, updates_producing
from .records import CheckpointMark, ProducedRow, Series, TTRLData

__all__ = ["MAX_TABLE_CHECKPOINTS", "collect_ttrl"]

# The updates -> checkpoint table answers one query per checkpoint; past this many, the
# newest are shown and the rest left to ``repro updates`` (said in a note).
MAX_TABLE_CHECKPOINTS = 500


def collect_ttrl(registry: Registry, run_id: str, checkpoints: Sequence[VersionRow]
                 ) -> TTRLData | None:
    """The run's updates and checkpoints (``checkpoints``: the checkpoint versions it
    logged, oldest first); None when the run made no online update."""
    rows = run_updates(registry, run_id)
    if not rows:
        return None
    number = np.arange(1, len(rows) + 1, dtype=np.int64)

    def column(name: str) -> Series:
        return Series(x=number, y=np.array([_real(r[name]) for r in rows], dtype=np.float64))

    ours = [v for v in checkpoints if v.run_id == run_id]  # updates link to these only
    notes = []
    shown = ours[-MAX_TABLE_CHECKPOINTS:]
    if len(shown) < len(ours):
        notes.append(f"the table shows the newest {len(shown)} of {len(ours)} checkpoints; "
                     f"`repro updates {run_id} --checkpoint KEY` answers for any")
    return TTRLData(reward=column("reward"), confidence=column("confidence"),
                    kl=column("kl_divergence"), checkpoints=_marks(rows, checkpoints),
                    produced=_produced(registry, rows, shown), notes=notes)


def _real(value: Any) -> float:
    """A stored reward/confidence/KL as a float; a missing KL (None) is a gap."""
    return float(value) if isinstance(value, (int, float)) else math.nan


def _marks(rows: list[dict[str, Any]], checkpoints: Sequence[VersionRow]
           ) -> list[CheckpointMark]:
    """Each checkpoint between the updates before and after it was logged: before the first
    update made under it (its ``model_version_id``), else by its logging time (a checkpoint
    no update followed, or one whose content an earlier version already held)."""
    first_under: dict[int, int] = {}
    for index, row in enumerate(rows):
        if row["model_version_id"] is not None:
            first_under.setdefault(row["model_version_id"], index)
    times = [r["timestamp"] if isinstance(r["timestamp"], (int, float)) else math.nan
             for r in rows]
    ordered = all(a <= b for a, b in itertools.pairwise(times))
    marks = []
    for v in checkpoints:
        if v.id in first_under:
            position = first_under[v.id] + 0.5  # between update n and n + 1 (1-based)
        elif ordered and (logged := _unix(v.created_at)) is not None:
            position = bisect.bisect_left(times, logged) + 0.5
        else:
            continue  # no way to place it honestly
        marks.append(CheckpointMark(key=v.key, position=position))
    return marks


def _produced(registry: Registry, rows: list[dict[str, Any]],
              checkpoints: Sequence[VersionRow]) -> list[ProducedRow]:
    """One row per checkpoint: the updates that produced it (``updates_producing``, the
    same rule as ``repro updates --checkpoint``); then the updates made under the newest
    checkpoint, which produced nothing yet."""
    table = [_row(v.key, updates_producing(registry, v.id)) for v in checkpoints]
    latest = max((r["model_version_id"] for r in rows if r["model_version_id"] is not None),
                 default=None)
    after = [r for r in rows if r["model_version_id"] == latest] if checkpoints else rows
    if after and (not checkpoints or latest == checkpoints[-1].id):
        table.append(_row(None, after))
    return table


def _row(key: str | None, updates: list[dict[str, Any]]) -> ProducedRow:
    return ProducedRow(
        checkpoint=key, count=len(updates),
        first_update=updates[0]["update_id"] if updates else None,
        last_update=updates[-1]["update_id"] if updates else None,
        mean_reward=_mean(u["reward"] for u in updates),
        mean_confidence=_mean(u["confidence"] for u in updates),
        mean_kl=_mean(u["kl_divergence"] for u in updates))


def _mean(values: Any) -> float | None:
    """The mean of the finite values (a NaN reward is counted in the plot, not the mean)."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else None


def _unix(iso: str) -> float | None:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except (TypeError, ValueError):
        return None
