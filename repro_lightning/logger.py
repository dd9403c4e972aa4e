"""``ReproLogger``: the same run as a Lightning ``Logger``, for users who prefer loggers.

With ``ReproCallback`` in the same Trainer the two share one run: the callback owns its
lifecycle, checkpoints and metrics, and the logger is a view of it (``logger.experiment`` is
the run's context). Alone, the logger drives the run itself from global rank 0 (Lightning
calls loggers there only): the run starts at ``log_hyperparams`` (the module's and
datamodule's hparams are its config), metrics come at the steps Lightning logs them (every
``log_every_n_steps``), each checkpoint file is logged in ``after_save_checkpoint`` (note:
``save_last="link"`` never calls it — use ``ReproCallback`` to catch those), and ``finalize``
records the end.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from repro_core import RunState
from repro_core.capture import EnvironmentCaptureLevel
from repro_core.types import check_tags, parse_key, validate_project

from ._session import RunSession, SessionSettings, check_datasets

__all__ = ["ReproLogger"]

_STATUS = {"success": RunState.COMPLETED, "failed": RunState.FAILED,
           "finished": RunState.INTERRUPTED}  # "finished": SLURM requeue (preemption)


class ReproLogger(Logger):
    """A Lightning logger that records into repro (see the module docstring)."""

    def __init__(
        self,
        project: str = "default",
        name: str | None = None,
        datasets: Mapping[str, str] | None = None,
        capture_level: EnvironmentCaptureLevel | int = EnvironmentCaptureLevel.STANDARD,
        monitor_hardware: bool = True,
        *,
        checkpoint_name: str = "checkpoint",
        tags: list[str] | None = None,
        save_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        validate_project(project)
        parse_key(checkpoint_name)  # everything checked before any run or file exists
        self._session = RunSession(SessionSettings(
            project=project, name=name, datasets=check_datasets(datasets),
            capture_level=capture_level, monitor_hardware=bool(monitor_hardware),
            checkpoint_name=checkpoint_name, tags=tuple(check_tags(tags))))
        self._session.alone = True
        self._owned = True  # False once a ReproCallback shares its session
        self._callback_records = False
        self._save_dir = os.fspath(save_dir) if save_dir is not None else None
        self._logged: dict[str, float] = {}  # checkpoint path -> mtime logged (alone)

    def share(self, session: RunSession, *, records_metrics: bool) -> None:
        """Called by ``ReproCallback.setup``: use its run instead of one of our own."""
        if self._owned and self._session.active:
            self._session.finish(RunState.COMPLETED)
        self._session, self._owned = session, False
        self._callback_records = records_metrics
        self._configure(session)

    def _configure(self, session: RunSession) -> None:
        """Subclasses adjust the shared session (``TTRLLogger`` makes it a TTRL run)."""

    @property
    def session(self) -> RunSession:
        return self._session

    # -- Logger contract ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._session.settings.project

    @property
    def version(self) -> str:
        return self._session.run_id or self._session.planned_id

    @property
    def save_dir(self) -> str | None:
        return self._save_dir

    @property
    def experiment(self) -> Any:
        """The run's ``ExperimentContext`` (``TTRLContext`` for a TTRLLogger); None before
        the run starts."""
        return self._session.context

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if self._owned and not self._session.active:
            self._configure(self._session)
            self._session.start(_as_dict(params))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self._owned and self._callback_records:
            return  # ReproCallback's tap already records every value, at every step
        if self._owned and not self._session.active:
            self.log_hyperparams({})
        values = {str(k): float(v) for k, v in metrics.items()}
        self._session.record(values, int(step) if step is not None else 0)

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        if not self._owned or not self._session.active:
            return  # with ReproCallback its CheckpointIO logged the file as it was written
        path = getattr(checkpoint_callback, "_last_checkpoint_saved", None) or \
            getattr(checkpoint_callback, "last_model_path", "")
        if not path or not os.path.isfile(path):
            return
        mtime = os.stat(path).st_mtime
        if self._logged.get(path) == mtime:
            return
        view = SimpleNamespace(checkpoint_callback=checkpoint_callback, current_epoch=None,
                               global_step=getattr(checkpoint_callback,
                                                   "_last_global_step_saved", None))
        # No link at the path: Lightning's own writer (not ours here) may write into it.
        self._session.log_checkpoint(None, path, view, link=False)
        self._logged[path] = os.stat(path).st_mtime

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._owned:
            self._session.finish(_STATUS.get(status, RunState.FAILED))


def _as_dict(params: Any) -> dict[str, Any]:
    if isinstance(params, Mapping):
        return dict(params)
    return dict(vars(params)) if hasattr(params, "__dict__") else {}
