"""What a report shows, as plain records: read from the store once (``collect``), then drawn
(``figures``, ``sections``). Keeping the two apart lets the drawing be tested without a store
and the reading without a plotting library."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..registry import RunRow

__all__ = ["ArtifactRow", "CheckpointMark", "ProducedRow", "ReportData", "RunData", "Series",
           "TTRLData"]


@dataclass
class Series:
    """One metric of one run, ordered by ``x`` (a step, an update number or seconds)."""

    x: np.ndarray
    y: np.ndarray

    @property
    def nonfinite(self) -> int:
        """How many values are NaN or ±inf (shown as gaps, and counted under the plot)."""
        return int(len(self.y) - np.isfinite(self.y).sum())


@dataclass
class ArtifactRow:
    """One version a run logged (``role="output"``) or used (``"input"``)."""

    role: str
    key: str
    type: str
    size: int
    stored_bytes: int | None  # what logging it added to the store; None: not known (input)
    digest: str
    aliases: list[str]
    pruned: bool
    missing: list[str] = field(default_factory=list)  # digests of blobs not in the store


@dataclass
class CheckpointMark:
    """A checkpoint on the TTRL update axis: logged after ``position`` updates."""

    key: str
    position: float


@dataclass
class ProducedRow:
    """One row of the updates -> checkpoint table (``checkpoint`` None: the updates made
    after the last checkpoint, which produced nothing yet)."""

    checkpoint: str | None
    count: int
    first_update: str | None
    last_update: str | None
    mean_reward: float | None
    mean_confidence: float | None
    mean_kl: float | None


@dataclass
class TTRLData:
    """A run's online updates as arrays over the update number (1, 2, …)."""

    reward: Series
    confidence: Series
    kl: Series
    checkpoints: list[CheckpointMark]
    produced: list[ProducedRow]
    notes: list[str] = field(default_factory=list)


@dataclass
class RunData:
    """Everything the report shows about one run."""

    run: RunRow
    states: list[tuple[str, str, str | None]]
    environment: dict[str, Any] | None
    metrics: dict[str, Series]  # by step
    hardware: dict[str, Series]  # by seconds since the run started
    ttrl: TTRLData | None
    artifacts: list[ArtifactRow]
    problems: list[str] = field(default_factory=list)  # what could not be read, and why

    @property
    def label(self) -> str:
        """How the run is named in legends: its name and the start of its id."""
        return f"{self.run.name} ({self.run.id[:8]})"


@dataclass
class ReportData:
    """The runs of one report, their combined lineage picture and (two runs) their diff."""

    runs: list[RunData]
    lineage_svg: str | None
    lineage_problem: str | None
    diff: dict[str, Any] | None
    diff_problem: str | None
    generated_at: str
