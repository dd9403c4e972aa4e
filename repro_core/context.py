"""``ExperimentContext``: one ``with`` block = one fully recorded run.

On enter: a run is opened, the config is captured (artifact ``config``), the environment is
captured (artifact ``environment``; at COMPLETE the uncommitted git patch as ``git_patch``), the
hardware monitor starts, and SIGTERM is turned into an orderly INTERRUPTED finish.
On exit: the monitor stops (artifact ``hardware_usage`` + ``runs/<id>/hardware.jsonl``), metrics
are flushed and the run is finalized: COMPLETED, FAILED (traceback kept with the run and as an
``error_trace`` artifact) or INTERRUPTED (KeyboardInterrupt, SIGTERM). The user's exception is
always re-raised unchanged; a failure while finalizing is reported as a warning then, never in
its place (the seed's original crashed on exit of every offline run and masked the real error).

Contexts do not nest: one process holds one run at a time (``RunStateError`` says so).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import traceback
import warnings
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Literal

from . import _exit, constants
from ._offline import detect_offline
from .capture import (
    EnvironmentCaptureLevel,
    capture_config,
    capture_environment,
    scrub_text,
)
from .capture.environment import coerce_level
from .capture.redact import Redactor
from .distributed import rank_zero_only
from .errors import RunStateError
from .manager import ArtifactManager
from .monitor import HardwareMonitor
from .types import ArtifactMetadata, ArtifactType, Run, RunState

__all__ = ["ExperimentContext", "Terminated", "detect_offline"]


class Terminated(SystemExit):
    """Raised in the main thread when SIGTERM arrives inside a context (exit status 143)."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class ExperimentContext:
    """Context manager for comprehensive experiment tracking.

    Automatically captures configuration, environment, hardware usage and artifacts.
    """

    _default_prefix = "exp"
    _default_level = EnvironmentCaptureLevel.STANDARD

    def __init__(
        self,
        config: Any | None = None,
        name: str | None = None,
        project: str = "default",
        tags: list[str] | None = None,
        capture_level: EnvironmentCaptureLevel | int | None = None,
        monitor_hardware: bool = True,
        offline_mode: bool | None = None,
        *,
        root: str | Path | None = None,
        monitor_interval: float = 5.0,
        run_id: str | None = None,
        resume: str = "never",
        handle_sigterm: bool = True,
        capture_in_background: bool = False,
        environment_extra: Callable[[], dict[str, Any]] | None = None,
        remote: str | None = None,
    ) -> None:
        """Validate everything now, before any run is opened or file written.

        ``offline_mode=None`` auto-detects (see :func:`detect_offline`). Every store is local
        today, so offline and online runs are recorded the same way; the resolved mode is kept
        in the run's config under ``_repro.offline`` for the remote backends to honour.
        ``run_id``/``resume`` continue an earlier run (``ArtifactManager.init_run``).
        ``handle_sigterm=False`` leaves SIGTERM to a host that handles it itself (Lightning
        turns it into an exception at the next step; the adapter then calls :meth:`close`).
        ``capture_in_background=True`` captures the environment (every installed package,
        git, devices: ~0.1-0.3 s) in a thread while the program goes on — the training loop
        of an adapter — and the run's end waits for it.
        """
        self.capture_level = coerce_level(capture_level if capture_level is not None
                                          else self._default_level)
        self.config = capture_config(config) if config is not None else {}
        self.name = name or f"{self._default_prefix}_{datetime.now():%Y%m%d_%H%M%S}"
        self.project, self.tags, self.root = project, list(tags or []), root
        self.offline = detect_offline() if offline_mode is None else bool(offline_mode)
        self.monitor = HardwareMonitor(monitor_interval) if monitor_hardware else None
        self.manager = ArtifactManager()
        self.run: Run | None = None
        self.config_artifact: ArtifactMetadata | None = None
        self._last_checkpoint: ArtifactMetadata | None = None
        self._previous_sigterm: Any = None
        self._sigterm_installed = False
        self._run_id, self._resume, self._handle_sigterm = run_id, resume, handle_sigterm
        from .remote._config import check_remote  # (no import cost for runs without one)

        self._remote = check_remote(remote)
        check_remote(constants.REPRO_REMOTE)  # a bad $REPRO_REMOTE: now, not at the run
        self._background = bool(capture_in_background)
        self._environment_extra = environment_extra
        self._capturing: threading.Thread | None = None
        self._capture_error: BaseException | None = None

    # -- enter / exit -------------------------------------------------------------------------

    def __enter__(self) -> ExperimentContext:
        """Enter context and capture initial state."""
        if self.manager.current_run is not None:
            raise RunStateError(
                f"{type(self).__name__} cannot nest: run {self.manager.current_run.name!r} is "
                "active. Finish it first, or log into it directly"
            )
        config = {**self.config, "_repro": {"offline": self.offline}}
        self.run = self.manager.init_run(self.name, config=config, project=self.project,
                                         tags=self.tags, root=self.root, run_id=self._run_id,
                                         resume=self._resume, remote=self._remote)
        try:
            self._capture()
            if self.monitor is not None:
                self.monitor.start()
            if self._handle_sigterm:
                self._install_sigterm()
        except BaseException:
            self._finish(RunState.FAILED, None)
            raise
        return self

    def _capture(self) -> None:
        self.config_artifact = self.manager.log_artifact("config", ArtifactType.CONFIG,
                                                         data=self.config)
        if not self._background:
            self._capture_environment()
        elif self.run is not None and self.run.is_rank_zero:
            self._capturing = threading.Thread(target=self._capture_quietly, daemon=True,
                                               name="repro-capture-environment")
            self._capturing.start()

    def _capture_quietly(self) -> None:
        try:
            self._capture_environment()
        except BaseException as exc:  # reported when the run ends (_join_capture)
            self._capture_error = exc

    def _join_capture(self) -> None:
        thread, self._capturing = self._capturing, None
        if thread is not None:
            thread.join()
        error, self._capture_error = self._capture_error, None
        if error is not None:
            warnings.warn(f"repro could not capture the environment of run {self.name!r}: "
                          f"{error!r}", RuntimeWarning, stacklevel=3)

    def _capture_environment(self) -> None:
        # What each rank sees of its machine differs (devices, processes): rank 0's is kept,
        # logged as rank 0's alone so no rank waits for an answer to different arguments.
        with rank_zero_only():
            env = capture_environment(self.capture_level)
            if self._environment_extra is not None:
                env.update(Redactor.from_settings().tree(self._environment_extra()))
            patch = env.get("git", {}).pop("patch", None) \
                if isinstance(env.get("git"), dict) else None
            self.manager.log_artifact("environment", ArtifactType.ENVIRONMENT, data=env)
            if patch:
                self.manager.log_artifact("git_patch", ArtifactType.CODE, data=patch)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> Literal[False]:
        """Exit context and finalize tracking; never swallows or replaces the user's error."""
        state = _state_for(exc)
        if exc is None:
            self._finish(state, None)
            return False
        try:
            self._finish(state, exc)
        except Exception as finish_error:  # report, but let the user's exception propagate
            warnings.warn(f"repro could not finalize run {self.name!r}: {finish_error!r}",
                          RuntimeWarning, stacklevel=2)
        return False

    def close(self, state: RunState, exc: BaseException | None = None, *,
              alone: bool | None = None) -> None:
        """Finish the run with ``state`` (for adapters whose host decides what an exception
        means, e.g. Lightning's ``SIGTERMException`` is an interruption, not a clean exit).
        A FAILED ``exc`` keeps its traceback; nothing here raises in place of ``exc``.
        ``alone=True``: only this rank is here (a rank-zero-only logger), so no call may wait
        for the others (default: alone after an error)."""
        if exc is None:
            self._finish(state, None, alone=alone)
            return
        try:
            self._finish(state, exc, alone=alone)
        except Exception as finish_error:
            warnings.warn(f"repro could not finalize run {self.name!r}: {finish_error!r}",
                          RuntimeWarning, stacklevel=2)

    def _finish(self, state: RunState, exc: BaseException | None, *,
                alone: bool | None = None) -> None:
        self._restore_sigterm()
        self._join_capture()
        # After an error, another rank may be dead or stuck in a collective: rank 0 records
        # the end alone (calls that publish nothing, no barrier); other ranks let go.
        alone = exc is not None if alone is None else alone
        try:
            if alone and self.run is not None and not self.run.is_rank_zero:
                if self.monitor is not None and self.monitor.running:
                    self.monitor.stop()
                return
            with rank_zero_only() if alone else contextlib.nullcontext():
                self._stop_monitor()
                if exc is not None and state is RunState.FAILED:
                    trace = "".join(traceback.format_exception(type(exc), exc,
                                                               exc.__traceback__))
                    # A traceback quotes the exception message, and messages quote URLs
                    # with credentials: repro's own record of it is scrubbed like any other.
                    self.manager.log_artifact("error_trace", ArtifactType.CODE,
                                              data=scrub_text(trace))
        finally:
            if self.manager.current_run is not None:
                reason = None if exc is None else f"{type(exc).__name__}: {exc}"
                if state is not RunState.COMPLETED:
                    self.manager.set_run_state(state, reason=reason)
                self.manager.finalize_run(wait_for_ranks=not alone)

    def _stop_monitor(self) -> None:
        if self.monitor is None or not self.monitor.running:
            return
        summary = self.monitor.stop()
        with rank_zero_only():  # each rank measured its own process: rank 0's is kept
            self.manager.log_artifact("hardware_usage", ArtifactType.METRICS,
                                      data=capture_config(summary))  # NaN-safe JSON
        self._store_hardware_series(self.monitor.samples)
        run_dir = self.run.dir if self.run is not None else None
        if run_dir is not None and self.run is not None and self.run.is_rank_zero:
            self.monitor.write_jsonl(run_dir / "hardware.jsonl")

    def _store_hardware_series(self, samples: list[dict[str, Any]]) -> None:
        """Samples become metric series ``hardware/<metric>`` (and ``hardware/gpu<i>/<m>``),
        indexed by sample number, so the time series lives in the registry with the run."""
        writer = self.manager.metrics_writer()
        if writer is None:
            return
        # A resumed run's samples continue the numbering, so the merged view (later segment
        # wins from its first index on) keeps the earlier segments' samples.
        first = 0
        if self.run is not None and self.run.resumed and self.run.id is not None:
            first = self.manager.registry().next_metric_step(self.run.id, hardware=True)
        for index, sample in enumerate(samples, start=first):
            # ("samples": how many raw samples a merged one stands for — not a measurement)
            values = {f"hardware/{k}": v for k, v in sample.items()
                      if k not in ("t", "gpus", "samples") and isinstance(v, (int, float))}
            values["hardware/t"] = sample["t"]
            for gpu in sample.get("gpus", []):
                values.update({f"hardware/gpu{gpu['index']}/{k}": v for k, v in gpu.items()
                               if k != "index" and isinstance(v, (int, float))})
            writer.log(values, step=index, advance=False)

    # -- SIGTERM --------------------------------------------------------------------------------

    def _install_sigterm(self) -> None:
        """Turn SIGTERM into :class:`Terminated` so ``__exit__`` records INTERRUPTED.

        A handler the program installed earlier is called first (chained); signals can only
        be handled in the main thread, so elsewhere nothing is installed.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous is signal.SIG_IGN or previous is None:
            return  # ignored on purpose, or a handler installed from C: leave it alone

        def handler(signum: int, frame: FrameType | None) -> None:
            if callable(previous):
                previous(signum, frame)
            # Terminated is a SystemExit: if it escapes a context an adapter opened without
            # ``with``, the run is finished at exit, and must read INTERRUPTED there.
            _exit.set_outcome(RunState.INTERRUPTED, "SIGTERM")
            raise Terminated()

        self._previous_sigterm = previous
        self._sigterm_installed = True
        signal.signal(signal.SIGTERM, handler)

    def _restore_sigterm(self) -> None:
        if self._sigterm_installed and threading.current_thread() is threading.main_thread():
            # (exited from another thread: signals cannot be touched there; ours stays and
            # still chains to the previous handler)
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._sigterm_installed = False

    # -- logging --------------------------------------------------------------------------------

    def log_artifact(self, *args: Any, **kwargs: Any) -> ArtifactMetadata:
        """Convenience method to log artifact within context."""
        meta = self.manager.log_artifact(*args, **kwargs)
        if meta is not None and meta.type is ArtifactType.CHECKPOINT:
            self._last_checkpoint = meta
        return meta

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> int | None:
        """Log metrics to the run's metrics store (batched; durable at exit)."""
        return self.manager.log_metrics(metrics, step)

    def log_model_checkpoint(self, model_path: Path, step: int,
                             metrics: dict[str, float] | None = None, *,
                             name: str = "checkpoint") -> ArtifactMetadata:
        """Log a checkpoint file/directory with its step and metrics; its parents are the run's
        previous checkpoint and the config artifact, so the chain of checkpoints is traceable."""
        parents = [a.key for a in (self._last_checkpoint, self.config_artifact) if a is not None]
        return self.log_artifact(
            name, ArtifactType.CHECKPOINT, file_path=model_path,
            metadata={"step": step, "metrics": dict(metrics or {})}, parent_artifacts=parents,
        )

    @property
    def last_checkpoint(self) -> ArtifactMetadata | None:
        """The most recent checkpoint logged through this context."""
        return self._last_checkpoint


def _state_for(exc: BaseException | None) -> RunState:
    if exc is None:
        return RunState.COMPLETED
    if isinstance(exc, (KeyboardInterrupt, Terminated)):
        return RunState.INTERRUPTED
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return RunState.COMPLETED
    return RunState.FAILED
