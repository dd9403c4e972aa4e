"""``ReproCallback``: one callback gives a Lightning Trainer a fully recorded, resumable run.

``Trainer(callbacks=[ReproCallback(project="mnist")])`` records, with nothing else changed:

- one run per job however many ranks (rank 0 writes; every rank knows the run id), with the
  config (module + datamodule hparams, the Trainer settings that change results, the seed),
  the environment, the hardware monitor, and every ``self.log`` value at its step;
- every checkpoint the Trainer saves, as a ``checkpoint`` version *when it is written*
  (a crash keeps what was saved), descending from the config, the datasets and the previous
  checkpoint; ``best`` follows the ``ModelCheckpoint``'s best path, ``latest`` the newest;
- the end: COMPLETED after ``fit``, FAILED on an exception (traceback kept), INTERRUPTED on
  Ctrl-C or SIGTERM (Lightning's own signal handling raises at the next step);
- the run id inside every checkpoint (``state_dict``), so ``trainer.fit(ckpt_path=...)`` in a
  new process continues the *same* run (its history shows the interruption and the resume).

Hook order this relies on (Lightning ≥ 2.2): ``setup`` runs before a checkpoint is restored
(so the ``CheckpointIO`` installed there loads it), callbacks' ``load_state_dict`` runs during
the restore, and ``on_fit_start`` after it — where the run is opened or continued.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from repro_core import RunState
from repro_core.capture import EnvironmentCaptureLevel
from repro_core.remote import check_remote
from repro_core.types import check_tags, parse_key, validate_project

from ._config import training_config
from ._install import install_checkpoint_io, log_directory_saves, stop_directory_saves
from ._metrics_tap import MetricsTap
from ._session import RunSession, SessionSettings, check_datasets, check_prune
from .logger import ReproLogger

__all__ = ["ReproCallback"]

_FORMATS = ("safetensors", "torch")


class ReproCallback(Callback):
    """Record a Lightning run in repro: config, environment, metrics, checkpoints, lineage.

    Args:
        project: the project runs and artifacts live in (keys read ``project/name:vN``).
        name: the run's name (default: generated).
        datasets: ``{"train": "mnist:v3", ...}``: artifact keys the run uses (recorded as
            inputs, so every checkpoint descends from them).
        capture_level: how much of the environment to capture.
        monitor_hardware: sample CPU/GPU/memory while the run lasts.
        checkpoint_format: ``"safetensors"`` (no pickle; written once into the store) or
            ``"torch"`` (Lightning's own file, logged as written).
        log_metrics: record every ``self.log`` value (every step, whatever
            ``log_every_n_steps`` says to the loggers).
        prune: ``"keep"`` (default): a top-k file Lightning deletes keeps its version;
            ``"mirror"``: its version is pruned too (aliases dropped, ``repro gc`` reclaims it).
        resume: ``"allow"`` (default): ``fit(ckpt_path=...)`` with a checkpoint whose run this
            store knows continues that run (a preempted job carries on); ``"never"``: every
            ``fit`` is a new run, recording the checkpoint it starts from as an input (to
            branch or fine-tune from another run's checkpoint). A checkpoint from a run this
            store does not know always starts a new run.
        checkpoint_name: the artifact name checkpoints are logged under.
        model_name: the artifact name of the final weights logged after a successful
            ``fit`` (safetensors of ``state_dict``, parent: the newest checkpoint); None: not
            logged. Unlike checkpoints, which carry their run, equal weights share one version.
        tags: run tags.
    """

    def __init__(
        self,
        project: str = "default",
        name: str | None = None,
        datasets: Mapping[str, str] | None = None,
        capture_level: EnvironmentCaptureLevel | int = EnvironmentCaptureLevel.STANDARD,
        monitor_hardware: bool = True,
        checkpoint_format: str = "safetensors",
        log_metrics: bool = True,
        *,
        prune: str = "keep",
        checkpoint_name: str = "checkpoint",
        model_name: str | None = "model",
        tags: list[str] | None = None,
        resume: str = "allow",
        remote: str | None = None,
    ) -> None:
        validate_project(project)
        if checkpoint_format not in _FORMATS:
            raise ValueError(f"checkpoint_format must be 'safetensors' or 'torch', got "
                             f"{checkpoint_format!r}")
        parse_key(checkpoint_name)
        if model_name is not None:
            parse_key(model_name)
        if resume not in ("allow", "never"):
            raise ValueError(f"resume must be 'allow' (continue the checkpoint's run) or "
                             f"'never' (always a new run), got {resume!r}")
        self.checkpoint_format, self.resume = checkpoint_format, resume
        self.session = RunSession(SessionSettings(
            project=project, name=name, datasets=check_datasets(datasets),
            capture_level=capture_level, monitor_hardware=bool(monitor_hardware),
            checkpoint_name=checkpoint_name, model_name=model_name, prune=check_prune(prune),
            tags=tuple(check_tags(tags)), remote=check_remote(remote)))
        self._tap = MetricsTap(self._record_metrics) if log_metrics else None
        self._resume_id: str | None = None

    @property
    def state_key(self) -> str:
        # Lightning reads it for every hook call (profiler names): computed once.
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self._state_key = self._generate_state_key(
                project=self.session.settings.project)
        return key

    @property
    def run_id(self) -> str | None:
        """The run's id (also on ranks other than 0), once ``fit`` has started."""
        return self.session.run_id

    # -- setup and restore ------------------------------------------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for logger in trainer.loggers:  # a ReproLogger / TTRLLogger shares this run
            if isinstance(logger, ReproLogger):
                logger.share(self.session, records_metrics=self._tap is not None)
        install_checkpoint_io(trainer, self.session, self.checkpoint_format)
        log_directory_saves(trainer, self.session)
        if self._tap is not None:
            self._tap.attach(trainer)

    def state_dict(self) -> dict[str, Any]:
        return self.session.state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume_id = self.session.restore(state_dict)

    # -- the run ----------------------------------------------------------------------------

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if not self.session.active:
            run_id, self._resume_id = self._resume_id, None
            if run_id is not None and (self.resume == "never"
                                       or not self.session.manager.has_run(run_id)):
                run_id = None  # (rank 0's answer decides the run; see init_run)
            loaded = self.session.resumed_from
            self.session.start(training_config(trainer, pl_module), run_id=run_id,
                               inputs=(loaded,) if loaded and run_id is None else ())

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._start_evaluation(trainer, pl_module)

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        self._start_evaluation(trainer, pl_module)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self._start_evaluation(trainer, pl_module)

    def _start_evaluation(self, trainer: Any, pl_module: Any) -> None:
        """``trainer.validate/test/predict`` outside ``fit``: after a ``fit`` on this Trainer
        its run continues; otherwise a new run that records the checkpoint it evaluates."""
        if self.session.active or trainer.state.fn == TrainerFn.FITTING:
            return
        loaded = self.session.resumed_from
        self.session.start(training_config(trainer, pl_module), run_id=self.session.run_id,
                           inputs=(loaded,) if loaded and not self.session.run_id else ())

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        stop_directory_saves(trainer)
        if self._tap is not None:
            self._tap.detach()
        if stage == "fit" and self.session.active:
            self.session.log_model(pl_module, trainer)
        self.session.finish(RunState.COMPLETED)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        stop_directory_saves(trainer)
        if self._tap is not None:
            self._tap.detach()
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        self.session.finish(RunState.INTERRUPTED if interrupted else RunState.FAILED,
                            exception)

    def _record_metrics(self, values: dict[str, float], step: int) -> None:
        self.session.record(values, step)
