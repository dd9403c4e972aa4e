"""Every value a LightningModule passes to ``self.log(...)``, with the step loggers see.

Lightning sends training-step values to its loggers only every ``log_every_n_steps`` (50 by
default) and nothing at all when no logger is attached; epoch-level and validation values
always go through ``_LoggerConnector.log_metrics``. The tap wraps two methods of *this
Trainer's* logger connector (instance attributes, never the class, so other Trainers are
untouched): ``log_metrics`` — everything the loggers get, at the step they get it — and
``update_train_step_metrics`` — the step values Lightning would have sent had the step been
a logging step. Adding a logger instead would change ``ModelCheckpoint``'s default directory
(it is derived from the first logger), which adding ``ReproCallback`` must not do.

On a Lightning release without these internals the tap records what reaches ``log_metrics``
only, and says so once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MetricsTap"]

Sink = Callable[[dict[str, float], int], None]


class MetricsTap:
    """Attach to one Trainer's logger connector; ``detach`` restores it."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._connector: Any = None
        self._sent = False

    def attach(self, trainer: Any) -> None:
        connector = getattr(trainer, "_logger_connector", None)
        if connector is None or self._connector is connector:
            return
        original_log = getattr(connector, "log_metrics", None)
        original_step = getattr(connector, "update_train_step_metrics", None)
        if original_log is None:
            warnings.warn("repro: this Lightning release has no logger connector to read "
                          "self.log() values from; metrics are not recorded", RuntimeWarning,
                          stacklevel=2)
            return

        def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
            self._sent = True
            self._record(trainer, metrics, step)
            original_log(metrics, step)

        connector.log_metrics = log_metrics
        if original_step is not None and hasattr(connector, "metrics"):
            def update_train_step_metrics() -> None:
                self._sent = False
                original_step()
                if not self._sent and trainer.global_rank == 0 and not _accumulating(trainer):
                    self._record(trainer, connector.metrics["log"], None)

            connector.update_train_step_metrics = update_train_step_metrics
        self._connector = connector

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_connector": None}  # a Trainer's internals stay behind

    def detach(self) -> None:
        connector, self._connector = self._connector, None
        if connector is not None:
            for name in ("log_metrics", "update_train_step_metrics"):
                connector.__dict__.pop(name, None)

    def _record(self, trainer: Any, metrics: Mapping[str, Any], step: int | None) -> None:
        """Mirror ``_LoggerConnector.log_metrics``: a ``step`` value logged by the user is the
        step; otherwise the optimizer-step count, with the epoch added."""
        if not metrics or trainer.global_rank != 0:
            return  # (only rank 0 records: no .item() device syncs elsewhere)
        scalars = {str(k): _scalar(v) for k, v in metrics.items()}
        values = {k: v for k, v in scalars.items() if v is not None}
        if step is None:
            logged_step = values.pop("step", None)
            if logged_step is not None and math.isfinite(logged_step):
                step = int(logged_step)
            else:
                values.setdefault("epoch", float(trainer.current_epoch))
                step = int(trainer.fit_loop.epoch_loop._batches_that_stepped)
        if values:
            self._sink(values, max(int(step), 0))


def _scalar(value: Any) -> float | None:
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "numel", lambda: 1)() == 1:
        value = item()
    if isinstance(value, bool):
        return float(value)
    return float(value) if isinstance(value, (int, float)) else None


def _accumulating(trainer: Any) -> bool:
    """Lightning skips step logging while gradients accumulate (no optimizer step yet)."""
    try:
        module = trainer.lightning_module
        return bool(trainer.fit_loop._should_accumulate()) and bool(
            module.automatic_optimization)
    except (AttributeError, RuntimeError):
        return False
