"""One run per Trainer: what ``ReproCallback`` and ``ReproLogger`` share.

A session owns the run (a ``repro_core.ExperimentContext``: config and environment artifacts,
hardware monitor, the end state) and the checkpoint bookkeeping: which version each
checkpoint path holds, the previous checkpoint (a new one's parent), and what ``prune="mirror"``
releases when Lightning deletes a top-k file. Every call that talks to the store goes through
``repro_core``; checkpoint logging runs on global rank 0 only (Lightning calls its
``CheckpointIO`` there) and is marked so, so it can never pair with a call other ranks make.
"""

from __future__ import annotations

import math
import os
import secrets
import threading
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from repro_core import ArtifactManager, ArtifactMetadata, ArtifactType, RunState, rank_zero_only
from repro_core.capture import EnvironmentCaptureLevel
from repro_core.context import ExperimentContext
from repro_core.errors import ReproError
from repro_core.ttrl import TTRLContext
from repro_core.types import parse_key

__all__ = ["RunSession", "SessionSettings"]

_PRUNE = ("keep", "mirror")


@dataclass(frozen=True)
class SessionSettings:
    """What the user chose; validated in ``ReproCallback.__init__`` before any run exists."""

    project: str
    name: str | None = None
    datasets: dict[str, str] = field(default_factory=dict)
    capture_level: EnvironmentCaptureLevel | int = EnvironmentCaptureLevel.STANDARD
    monitor_hardware: bool = True
    checkpoint_name: str = "checkpoint"
    model_name: str | None = "model"  # the final weights at the end of fit (None: not logged)
    prune: str = "keep"
    tags: tuple[str, ...] = ()
    remote: str | None = None  # a remote name or URL artifacts are pushed to as they land


class RunSession:
    """The run of one Trainer, and the checkpoints logged into it."""

    def __init__(self, settings: SessionSettings) -> None:
        self.settings = settings
        self.context: ExperimentContext | None = None
        self.run_id: str | None = None  # the current (or last) run, kept across stages
        self.parents: list[str] = []  # config + datasets: every checkpoint's parents
        self.previous: str | None = None  # key of the newest checkpoint version
        self.paths: dict[str, str] = {}  # checkpoint path -> version key it holds
        self.best: str | None = None  # key of the version aliased ``best``
        self.resumed_from: str | None = None  # the checkpoint version training resumed from
        self.ttrl_keys: tuple[str, str, str] | None = None  # set by a TTRLLogger: the run
        # is then a TTRLContext and values under these keys become online-update rows
        self.planned_id = secrets.token_hex(6)  # a new run's id, known before it starts
        self._lock = threading.RLock()  # checkpoint bookkeeping (AsyncCheckpointIO's thread)
        self.alone = False  # only rank 0 drives it (a logger without ReproCallback)

    @property
    def manager(self) -> ArtifactManager:
        return ArtifactManager()  # the process's singleton (never pickled with the session)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (spawned DDP workers, ``torch.save(trainer)``): an open run belongs to
        its process and stays behind."""
        state = dict(self.__dict__)
        state["context"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        return self.context is not None

    def start(self, config: dict[str, Any], *, run_id: str | None = None,
              inputs: tuple[str, ...] = (), handle_sigterm: bool = False,
              environment: Callable[[], dict[str, Any]] | None = None) -> None:
        """Open (or, with ``run_id``, continue) the run on every rank; record the datasets
        and ``inputs`` (a checkpoint evaluated) as used. ``handle_sigterm``: the host does
        not (Accelerate); ``environment``: the host's sections of the environment artifact."""
        settings = self.settings
        factory = TTRLContext if self.ttrl_keys else ExperimentContext
        context = factory(
            config, name=settings.name, project=settings.project, tags=list(settings.tags),
            capture_level=settings.capture_level, monitor_hardware=settings.monitor_hardware,
            run_id=run_id or self.planned_id, resume="allow" if run_id else "never",
            handle_sigterm=handle_sigterm, capture_in_background=True,
            environment_extra=environment, remote=settings.remote)
        context.__enter__()
        self.context = context
        self.planned_id = secrets.token_hex(6)  # (a later new run of this Trainer: another)
        try:
            assert context.run is not None and context.config_artifact is not None
            self.run_id = context.run.id
            used = [self.manager.use_artifact(key).key for key in settings.datasets.values()]
            with rank_zero_only():  # what this process loaded: rank 0's view decides
                # (identified by its digest when it was loaded: not hashed a second time)
                evaluated = [self.manager.use_artifact(key, verify=False) for key in inputs]
            self.parents = [context.config_artifact.key, *used,
                            *(meta.key for meta in evaluated if meta is not None)]
        except BaseException as exc:
            self.finish(RunState.FAILED, exc)
            raise

    def finish(self, state: RunState, exc: BaseException | None = None) -> None:
        """End the run (idempotent); never raises in place of ``exc``."""
        context, self.context = self.context, None
        if context is not None:
            context.close(state, exc, alone=True if self.alone else None)

    def record(self, values: dict[str, float], step: int) -> None:
        """Metrics at ``step``; with a TTRLLogger, a reward (+ confidence, KL) is also an
        online-update row linked to the checkpoint in force. Written on rank 0 only."""
        context = self.context
        if context is None or context.run is None or not context.run.is_rank_zero:
            return  # (the rank was read once, when the run started: this runs every step)
        keys = self.ttrl_keys
        if keys is not None and keys[0] in values and isinstance(context, TTRLContext):
            reward, confidence, kl = keys
            context.log_online_update(
                f"step-{step}", values[reward], values.get(confidence, math.nan),
                values.get(kl), metadata={"step": step})
        context.manager.log_metrics(values, step=step)  # (the run's manager: no lookup)

    # -- checkpoints (global rank 0 only) ---------------------------------------------------

    def log_checkpoint(self, data: Any, path: str, trainer: Any, *, link: bool = True,
                       checkpoint: dict[str, Any] | None = None,
                       aliases: list[str] | None = None,
                       extra: dict[str, Any] | None = None) -> ArtifactMetadata | None:
        """Log what Lightning saves at ``path`` as a ``checkpoint`` version and put a link to
        it at ``path``. ``data`` is a ``repro_core`` Payload (safetensors, streamed into the
        store) or None for a file Lightning already wrote there (torch format). Returns None
        when no run is active (the caller then writes the file itself). ``checkpoint``: the
        dict being saved — its step and epoch are the version's (an ``AsyncCheckpointIO``
        writes after training moved on); the bookkeeping is locked for the same reason.
        ``aliases`` and ``extra`` metadata: a host's own (Accelerate's ``save_state``)."""
        with self._lock:
            return self._log_checkpoint(data, path, trainer, link, checkpoint,
                                        list(aliases or ()), dict(extra or {}))

    def _log_checkpoint(self, data: Any, path: str, trainer: Any, link: bool,
                        checkpoint: dict[str, Any] | None, aliases: list[str],
                        extra: dict[str, Any]) -> ArtifactMetadata | None:
        if not self.active:
            return None
        settings = self.settings
        parents = [*self.parents, *([self.previous] if self.previous else [])]
        if _is_best(trainer, path) and "best" not in aliases:
            aliases.append("best")
        metadata = {**_checkpoint_metadata(trainer, path, self.run_id), **extra}
        for name in ("global_step", "epoch"):
            if checkpoint is not None and _int_or_none(checkpoint.get(name)) is not None:
                metadata[name] = checkpoint[name]
        with rank_zero_only():
            if data is None:
                meta = self.manager.log_artifact(
                    settings.checkpoint_name, ArtifactType.CHECKPOINT, file_path=path,
                    metadata=metadata, parent_artifacts=parents, aliases=aliases)
            else:
                meta = self.manager.log_artifact(
                    settings.checkpoint_name, ArtifactType.CHECKPOINT, data=data,
                    metadata=metadata, parent_artifacts=parents, aliases=aliases)
        assert meta is not None  # (rank 0)
        # A directory (a sharded strategy's) stays as written; ``link=False``: the writer of
        # that path is not ours and might write into it in place (ReproLogger alone).
        if link and not os.path.isdir(path):
            self.manager.link_version(meta.key, path)
        if isinstance(self.context, TTRLContext):  # later online updates link to it
            self.context.set_model_version(meta.key)
        if "best" in aliases:
            self.best = meta.key
        self.previous = meta.key
        self._replace(os.path.abspath(path), meta.key)
        return meta

    def loaded(self, key: str, path: str) -> None:
        """A checkpoint verified as version ``key`` was loaded (to resume or evaluate): the
        next checkpoint descends from it."""
        self.resumed_from = key

    def log_model(self, module: Any, trainer: Any) -> ArtifactMetadata | None:
        """The final weights after ``fit`` as a ``model`` version (safetensors of the module's
        ``state_dict``), descending from the newest checkpoint. Weights only, nothing that
        names the run: two runs that train the same weights (same seed, ``deterministic``)
        share one version and one blob, as checkpoints — which carry their run — cannot."""
        name = self.settings.model_name
        if name is None or not self.active:
            return None
        tensors = {k: v for k, v in module.state_dict().items() if _is_tensor(v)}
        parents = [*self.parents, *([self.previous] if self.previous else [])]
        metadata = {"global_step": _int_or_none(getattr(trainer, "global_step", None)),
                    "epoch": _int_or_none(getattr(trainer, "current_epoch", None)),
                    "run_id": self.run_id}
        try:
            with rank_zero_only():  # rank 0's weights (DDP keeps every rank's equal)
                return self.manager.log_artifact(name, ArtifactType.MODEL, data=tensors or {},
                                                 metadata=metadata, parent_artifacts=parents)
        except ReproError as exc:  # e.g. a dtype safetensors cannot store: the fit succeeded
            warnings.warn(f"repro: the final weights were not logged as {name!r}: {exc}",
                          RuntimeWarning, stacklevel=3)
            return None

    def released(self, path: str) -> None:
        """Lightning deleted the checkpoint at ``path`` (top-k): with ``prune="mirror"`` its
        version is pruned too (aliases dropped, blobs left for ``repro gc``)."""
        with self._lock:
            key = self.paths.pop(os.path.abspath(path), None)
        if key is not None:
            self._maybe_prune(key)

    def _replace(self, path: str, key: str) -> None:
        old = self.paths.get(path)
        self.paths[path] = key
        if old is not None and old != key:  # overwritten in place (last.ckpt): old is gone
            self._maybe_prune(old)

    def _maybe_prune(self, key: str) -> None:
        if self.settings.prune != "mirror" or key in self.paths.values() \
                or key in (self.previous, self.best):
            return
        try:
            with rank_zero_only():
                self.manager.prune_version(key)
        except ReproError as exc:  # mirroring is housekeeping: never fail the training
            warnings.warn(f"repro: could not prune {key}: {exc}", RuntimeWarning, stacklevel=3)

    # -- state carried inside the checkpoint ------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "project": self.settings.project,
                "previous": self.previous, "best": self.best, "paths": dict(self.paths)}

    def restore(self, state: dict[str, Any]) -> str | None:
        """Take the run id and checkpoint bookkeeping a checkpoint carried; returns the run
        id to continue (None if it belongs to another project or carries none)."""
        run_id = state.get("run_id")
        if not isinstance(run_id, str) or state.get("project") != self.settings.project:
            return None
        previous, best = state.get("previous"), state.get("best")
        # The state was saved *before* its own file was written: the version resumed from
        # (identified when it was loaded) is the newer one.
        self.previous = self.resumed_from or (previous if isinstance(previous, str) else None)
        self.best = best if isinstance(best, str) else None
        paths = state.get("paths")
        if isinstance(paths, dict):
            self.paths = {str(k): str(v) for k, v in paths.items()
                          if isinstance(k, str) and isinstance(v, str)}
        return run_id


def check_prune(prune: object) -> str:
    if prune not in _PRUNE:
        raise ValueError(f"prune must be 'keep' (top-k deletions keep their versions) or "
                         f"'mirror' (they are pruned too), got {prune!r}")
    return str(prune)


def check_datasets(datasets: Mapping[str, str] | None) -> dict[str, str]:
    if datasets is None:
        return {}
    if not isinstance(datasets, Mapping):
        raise TypeError(f"datasets must be a mapping like {{'train': 'mnist:v3'}}, got "
                        f"{datasets!r}")
    checked = {}
    for role, key in datasets.items():
        if not isinstance(role, str) or not isinstance(key, str):
            raise TypeError(f"datasets maps a role (str) to an artifact key (str), got "
                            f"{role!r}: {key!r}")
        parse_key(key)
        checked[role] = key
    return checked


def _is_best(trainer: Any, path: str) -> bool:
    callback = getattr(trainer, "checkpoint_callback", None)
    best = getattr(callback, "best_model_path", "") or ""
    return bool(best) and os.path.abspath(best) == os.path.abspath(path)


def _checkpoint_metadata(trainer: Any, path: str, run_id: str | None) -> dict[str, Any]:
    callback = getattr(trainer, "checkpoint_callback", None)
    score = getattr(callback, "current_score", None)
    value = float(score) if score is not None else None
    return {
        "path": os.path.abspath(path), "filename": os.path.basename(path),
        "epoch": _int_or_none(getattr(trainer, "current_epoch", None)),
        "global_step": _int_or_none(getattr(trainer, "global_step", None)),
        "monitor": getattr(callback, "monitor", None),
        "score": value if value is not None and math.isfinite(value) else None,
        "run_id": run_id,
    }


def _is_tensor(value: Any) -> bool:
    return type(value).__module__.split(".", 1)[0] == "torch" and hasattr(value, "dtype")


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None
