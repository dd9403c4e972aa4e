"""``ReproTracker``: one repro run per Accelerate launch, as an Accelerate ``GeneralTracker``.

``Accelerator(log_with=[ReproTracker(project="demo")])`` + ``accelerator.init_trackers(...)``:
the config given to ``init_trackers`` is the run's ``config`` artifact, ``accelerator.log``
values are its metrics (and reward / confidence / KL values online-update rows), and
``end_training`` finishes it. Accelerate calls trackers on the main process only, so the run
lives there alone: nothing here waits for another process, and no call can pair with one
another process makes (the hangs of accelerate #2690 / #1752 cannot come from here).

The run opens at the first ``log`` (or ``save_state``, ``tracker`` access, ``finish``), not
in ``start()``: a relaunch after a preemption calls ``init_trackers`` *before* it loads the
logged state, and loading it (``repro_lightning.load_state``) must continue that run rather
than open a new one. A program that ends without ``end_training`` (an exception, SIGTERM,
``sys.exit``) still finishes the run: FAILED with its traceback, INTERRUPTED, or COMPLETED.
"""

from __future__ import annotations

import atexit
import numbers
import os
import sys
import threading
import warnings
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from accelerate.tracking import GeneralTracker

from repro_core import ArtifactManager, RunState, rank_zero_only
from repro_core import _exit as exit_outcome
from repro_core.capture import EnvironmentCaptureLevel, capture_config
from repro_core.capture.environment import coerce_level
from repro_core.context import ExperimentContext, Terminated
from repro_core.errors import RunStateError
from repro_core.remote import check_remote
from repro_core.ttrl import TTRLContext
from repro_core.types import (
    ArtifactMetadata,
    ArtifactType,
    Run,
    check_tags,
    check_text,
    validate_name,
    validate_project,
)

from ._accelerate_checks import check_step
from ._accelerate_launch import launch_info
from ._session import RunSession, SessionSettings, check_datasets, check_prune

__all__ = ["ReproTracker"]

_TTRL_DEFAULT = ("reward", "confidence", "kl_divergence")
_RESUME = ("allow", "never")


class ReproTracker(GeneralTracker):
    """An Accelerate tracker that records the launch as one repro run.

    Args:
        project, name, tags: the run's project, name (default ``accelerate_<time>``), tags.
        datasets: ``{"train": "mnist:v3"}``, dataset versions the run uses (lineage parents
            of every state it saves).
        capture_level, monitor_hardware: as ``ExperimentContext``.
        state_name: artifact name of ``save_state`` directories (``"state"``: keys
            ``state:latest``, ``state:v3``). model_name: of ``save_model`` output.
        resume: ``"allow"`` (loading a logged state before the first log continues the run
            that saved it) or ``"never"`` (always a new run; the state is recorded as used).
        prune: ``"keep"``, or ``"mirror"``: a state directory Accelerate deletes
            (``total_limit``) has its version pruned too.
        ttrl_keys: the (reward, confidence, KL) names whose values become online-update rows
            when the reward is logged (``repro updates``); None: metrics only.
    """

    name = "repro"
    requires_logging_directory = False
    main_process_only = True

    def __init__(
        self,
        project: str = "default",
        name: str | None = None,
        datasets: Mapping[str, str] | None = None,
        capture_level: EnvironmentCaptureLevel | int = EnvironmentCaptureLevel.STANDARD,
        monitor_hardware: bool = True,
        *,
        state_name: str = "state",
        model_name: str = "model",
        tags: list[str] | None = None,
        resume: str = "allow",
        prune: str = "keep",
        ttrl_keys: tuple[str, str, str] | None = _TTRL_DEFAULT,
        remote: str | None = None,
    ) -> None:
        super().__init__()
        validate_project(project)  # everything checked before any run or file exists
        validate_name(state_name, what="state_name")
        validate_name(model_name, what="model_name")
        if name is not None:
            check_text(name, "name")
        coerce_level(capture_level)
        if not isinstance(monitor_hardware, bool):
            raise TypeError(f"monitor_hardware must be True or False, got {monitor_hardware!r}")
        if resume not in _RESUME:
            raise ValueError(f"resume must be 'allow' (loading a logged state continues its "
                             f"run) or 'never' (a new run), got {resume!r}")
        self._session = RunSession(SessionSettings(
            project=project, name=name or f"accelerate_{datetime.now():%Y%m%d_%H%M%S}",
            datasets=check_datasets(datasets), capture_level=capture_level,
            monitor_hardware=bool(monitor_hardware), checkpoint_name=state_name,
            model_name=model_name, prune=check_prune(prune), tags=tuple(check_tags(tags)),
            remote=check_remote(remote)))
        self._session.alone = True  # the main process alone drives it
        self._session.ttrl_keys = _check_ttrl_keys(ttrl_keys)
        self._resume = resume
        # Accelerate < 1.8 has no start(): init_trackers takes a custom tracker as built.
        self._started = "start" not in vars(GeneralTracker)
        self._finished = False
        self._failed: Exception | None = None  # why the run could not start
        self._config: dict[str, Any] = {}
        self._continue: str | None = None  # run id a loaded state asks to continue
        self._resume_step: int | None = None  # and the step its logs went on at
        self._inputs: tuple[str, ...] = ()  # states loaded before the run opened (branch)
        self._next_step = 0
        self._skipped: set[str] = set()
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._last_state: ArtifactMetadata | None = None
        self._pending: threading.Thread | None = None  # a state being logged

    # -- GeneralTracker contract ------------------------------------------------------------

    @property
    def tracker(self) -> ExperimentContext | None:
        """The run's context (a ``TTRLContext``; ``.run.id`` is the run id), opened on first
        access after ``init_trackers``; None before, and after ``finish``."""
        return self._open() if self._started and not self._finished else None

    @property
    def project(self) -> str:
        return self._session.settings.project

    @property
    def run(self) -> Run | None:
        context = self.tracker
        return context.run if context is not None else None

    @property
    def run_id(self) -> str | None:
        return self._session.run_id

    @property
    def last_state(self) -> ArtifactMetadata | None:
        """The newest state version logged by ``repro_lightning.save_state`` (waits for one
        still being logged)."""
        self.wait()
        return self._last_state

    def start(self) -> None:
        """Called by ``init_trackers``. The run itself opens at first use (module doc)."""
        self._started = True
        _warn_if_not_distributed()

    def store_init_configuration(self, values: dict[str, Any]) -> None:
        """``init_trackers(config=...)``: the run's config, captured now (as JSON: the caller's
        dict is not touched, and changing it later changes nothing recorded). Given again
        once the run is open, it is logged as a new ``config`` version, the parent of later
        states."""
        config = capture_config(dict(values or {}))
        self.wait()
        with self._lock:
            if not self._session.active:
                self._config = config
                return
            context = self._session.context
            assert context is not None
            with rank_zero_only():
                meta = context.manager.log_artifact("config", ArtifactType.CONFIG,
                                                    data=config)
            if meta is not None:
                self._session.parents[0] = meta.key

    def log(self, values: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        """Numbers (ints, floats, 0-d tensors, numpy scalars) become metrics at ``step``
        (None: one past the last step logged, as W&B counts); other values are skipped,
        with one warning per name. ``kwargs`` (other trackers' options) are ignored."""
        step = check_step(step)
        with self._lock:
            if self._open() is None:
                return
            keys = self._session.ttrl_keys
            if keys is not None and keys[0] in values:
                self.wait()  # an update links to the state in force: the one just saved
            if step is None:
                step = self._next_step
            self._next_step = max(self._next_step, step + 1)
            numbers_only = self._numbers(values)
            if numbers_only:
                self._session.record(numbers_only, step)

    def finish(self) -> None:
        """``end_training``: flush the metrics and finish the run COMPLETED."""
        self.wait()
        with self._lock:
            if self._started and not self._finished:
                self._open()
            self._finished = True
            self._session.finish(RunState.COMPLETED)

    @property
    def next_step(self) -> int:
        """The step a ``log`` without one would use (kept with each state, so a relaunch
        from it counts on from there)."""
        return self._next_step

    def warn_once(self, topic: str, message: str) -> None:
        if topic not in self._skipped:
            self._skipped.add(topic)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # -- background logging of saved states --------------------------------------------------

    def submit(self, work: Callable[[], None]) -> None:
        """Run ``work`` (logging a saved state) in a background thread, after the previous
        one: training goes on meanwhile, and the order of states is kept."""
        self.wait()
        thread = threading.Thread(target=work, name="repro-log-state", daemon=True)
        self._pending = thread
        thread.start()

    def wait(self) -> None:
        """Wait until a state being logged is in the store."""
        thread = self._pending
        if thread is not None and thread is not threading.current_thread():
            thread.join()  # (interrupted by SIGTERM: still pending, joined again at exit)
        if self._pending is thread:
            self._pending = None

    # -- TTRL -------------------------------------------------------------------------------

    def log_experience(self, experience_id: str, input_data: Any, output_data: Any,
                       metadata: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Store one experience (input, output, metadata) in the run's buffer."""
        context = self.tracker
        if not isinstance(context, TTRLContext):
            raise RuntimeError("log_experience() needs a started ReproTracker with ttrl_keys "
                               "(call accelerator.init_trackers first)")
        return context.log_experience(experience_id, input_data, output_data, metadata)

    # -- the run ----------------------------------------------------------------------------

    def _open(self) -> ExperimentContext | None:
        with self._lock:
            if self._session.active:
                return self._session.context
            if self._finished:
                raise RunStateError("the repro run of this tracker has finished "
                                    "(end_training was called)")
            if not self._started:
                raise RunStateError("call accelerator.init_trackers(...) before logging")
            if self._failed is not None:  # (not a new FAILED run at every later log call)
                raise RunStateError(f"the repro run could not start: {self._failed!r}") \
                    from self._failed
            try:
                self._session.start(self._config, run_id=self._continue, inputs=self._inputs,
                                    handle_sigterm=True, environment=launch_info)
            except Exception as exc:
                self._failed = exc
                raise
            context = self._session.context
            assert context is not None and context.run is not None
            if context.run.resumed and context.run.id is not None:
                self._next_step = self._resume_step if self._resume_step is not None else \
                    context.manager.registry().next_metric_step(context.run.id)
            self._link_updates()
            atexit.register(self._finish_at_exit)
            return context

    def _link_updates(self) -> None:
        """Online updates link to the state in force: after a load, the loaded one."""
        context, previous = self._session.context, self._session.previous
        if isinstance(context, TTRLContext) and previous is not None:
            context.set_model_version(previous)

    def loaded_state(self, meta: ArtifactMetadata) -> None:
        """A logged state was loaded (``repro_lightning.load_state``): before the run opens,
        with ``resume="allow"``, continue the run that saved it; else record it as used. The
        next state descends from it either way."""
        with self._lock:
            run_id = meta.run_id  # the registry's record of who logged it, not its metadata
            same = run_id is not None and meta.project == self.project
            if not self._session.active:
                if self._resume == "allow" and same and ArtifactManager().has_run(str(run_id)):
                    self._continue = str(run_id)
                    step = meta.metadata.get("next_log_step")
                    self._resume_step = step if isinstance(step, int) else None
                else:
                    self._inputs = (meta.key,)
            elif run_id != self._session.run_id:
                with rank_zero_only():  # lineage: this run used that state
                    ArtifactManager().use_artifact(meta.key, verify=False)
            self._session.loaded(meta.key, os.fspath(meta.path or ""))
            self._session.previous = meta.key
            if self._session.active:
                self._link_updates()

    def _finish_at_exit(self) -> None:
        """``atexit``: the program ended without ``end_training``."""
        if os.getpid() != self._pid or not self._session.active:
            return
        self.wait()
        outcome = exit_outcome.outcome()
        state = outcome[0] if outcome is not None else RunState.COMPLETED
        exc: BaseException | None = None
        if state is RunState.FAILED:
            last = getattr(sys, "last_value", None)
            exc = last if isinstance(last, BaseException) else RuntimeError(outcome[1]
                                                                            if outcome else "")
        elif state is RunState.INTERRUPTED:
            last = getattr(sys, "last_value", None)
            exc = last if isinstance(last, KeyboardInterrupt) else Terminated()
        self._finished = True
        self._session.finish(state, exc)

    def _numbers(self, values: Mapping[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        for key, value in values.items():
            number = _as_number(value)
            if number is None:
                if key not in self._skipped:
                    self._skipped.add(key)
                    warnings.warn(f"repro records numbers only; {key!r} ({type(value).__name__}"
                                  ") is not logged", RuntimeWarning, stacklevel=3)
                continue
            out[str(key)] = number
        return out


def _warn_if_not_distributed() -> None:
    """torchrun started several processes but Accelerate runs each alone (a CPU-only machine
    without ``Accelerator(cpu=True)``): every process then trains, saves and logs by itself."""
    from accelerate.state import PartialState

    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return
    if world > 1 and PartialState._shared_state and PartialState().num_processes == 1:
        warnings.warn(f"WORLD_SIZE={world} but Accelerate runs this process alone: every "
                      "process acts as the main one (on a machine without a GPU pass "
                      "Accelerator(cpu=True) for a multi-process CPU launch)",
                      RuntimeWarning, stacklevel=3)


def _as_number(value: Any) -> float | None:
    """A loggable number, or None: Python numbers (bools as 0/1), and one-element tensors or
    numpy values (``loss.detach()``, ``np.float32(...)``) read with ``.item()``."""
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)
    size = getattr(value, "numel", None)
    size = size() if callable(size) else getattr(value, "size", None)
    if item is None or size != 1:
        return None
    try:
        result = item()
    except (TypeError, ValueError, RuntimeError):
        return None
    return float(result) if isinstance(result, numbers.Real) else None


def _check_ttrl_keys(keys: object) -> tuple[str, str, str] | None:
    if keys is None:
        return None
    if not isinstance(keys, (tuple, list)) or len(keys) != 3 or \
            not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != 3:
        raise ValueError(f"ttrl_keys must be three distinct metric names (reward, confidence, "
                         f"KL) or None, got {keys!r}")
    return (keys[0], keys[1], keys[2])

