"""Decorators for plain PyTorch code: ``reproducible``, ``track_artifacts``, ``checkpoint``.

All three work on plain functions, methods and ``async def`` functions (an async function gets
an async wrapper, so the context spans the awaited body — the seed's original recorded an
un-awaited coroutine). Arguments are validated when the decorator is applied.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .capture import capture_config, scrub_text
from .context import ExperimentContext
from .errors import InvalidArgumentError, RunStateError
from .manager import ArtifactManager
from .types import ArtifactMetadata, ArtifactType, parse_key

__all__ = ["checkpoint", "reproducible", "track_artifacts"]

_F = TypeVar("_F", bound=Callable[..., Any])
_CONFIG_NAMES = ("config", "cfg", "conf", "args")
_MODEL_NAMES = ("model", "net", "network")


def _find(bound: inspect.BoundArguments, names: Sequence[str]) -> Any:
    for name in names:
        if name in bound.arguments:
            return bound.arguments[name]
    return None


# -- reproducible -------------------------------------------------------------------------------


def reproducible(name: str | None = None, capture_level: int = 2,
                 offline_mode: bool | None = None) -> Callable[[_F], _F]:
    """Run the function inside an :class:`ExperimentContext` (config from the first parameter
    named ``config``, ``cfg``, ``conf`` or ``args``); the run is named after the function."""
    if name is not None and not isinstance(name, str):
        raise InvalidArgumentError(f"name must be a str, got {name!r}", argument="name")
    if capture_level not in (1, 2, 3):
        raise InvalidArgumentError(
            f"capture_level must be 1 (basic), 2 (standard) or 3 (complete), got "
            f"{capture_level!r}", argument="capture_level")

    def decorate(fn: _F) -> _F:
        signature = inspect.signature(fn)
        run_name = name or fn.__qualname__.replace("<", "").replace(">", "")

        def context(args: tuple[Any, ...], kwargs: dict[str, Any]) -> ExperimentContext:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            return ExperimentContext(config=_find(bound, _CONFIG_NAMES), name=run_name,
                                     capture_level=capture_level, offline_mode=offline_mode)

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                with context(args, kwargs):  # spans the awaited body, not coroutine creation
                    return await fn(*args, **kwargs)

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with context(args, kwargs):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


# -- track_artifacts ----------------------------------------------------------------------------


def track_artifacts(inputs: list[str] | None = None, outputs: list[str] | None = None,
                    capture_args: bool = True, capture_source: bool = False
                    ) -> Callable[[_F], _F]:
    """Use ``inputs`` (``"name:version"`` keys) before the call and log the return values as
    ``outputs`` (artifact types), with the inputs as their parents and the call's arguments
    (JSON-safe summary) and optionally source code recorded. Needs an active run (or opens
    one named after the function for the duration of the call)."""
    input_keys = [_check_input(k) for k in (inputs or [])]
    output_types = [ArtifactType.coerce(t) for t in (outputs or [])]

    def decorate(fn: _F) -> _F:
        tracker = _Tracker(fn, input_keys, output_types, capture_args, capture_source)
        signature = inspect.signature(fn)
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                bound = signature.bind(*args, **kwargs)
                bound.apply_defaults()
                with tracker.session():
                    parents, metadata = tracker.before(bound)
                    result = await fn(*args, **kwargs)
                    tracker.after(result, parents, metadata)
                    return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with tracker.session():
                parents, metadata = tracker.before(bound)
                result = fn(*args, **kwargs)
                tracker.after(result, parents, metadata)
                return result

        return wrapper  # type: ignore[return-value]

    return decorate


def _check_input(key: object) -> str:
    parse_key(key)
    assert isinstance(key, str)
    return key


class _Tracker:
    """What ``track_artifacts`` does around one call."""

    def __init__(self, fn: Callable[..., Any], inputs: list[str],
                 outputs: list[ArtifactType], capture_args: bool, capture_source: bool) -> None:
        self.fn, self.inputs, self.outputs = fn, inputs, outputs
        self.capture_args, self.capture_source = capture_args, capture_source

    @property
    def manager(self) -> ArtifactManager:
        """Looked up at call time: the singleton may have been reset since decoration."""
        return ArtifactManager()

    def session(self) -> Any:
        """The active run, or a context for this call alone (never log without a run)."""
        if self.manager.current_run is not None:
            return contextlib.nullcontext()
        return ExperimentContext(name=self.fn.__name__, monitor_hardware=False)

    def before(self, bound: inspect.BoundArguments) -> tuple[list[str], dict[str, Any]]:
        """Use the inputs (recording used-by edges); return the outputs' parents and metadata."""
        parents = [self.manager.use_artifact(k).key for k in self.inputs]
        metadata: dict[str, Any] = {"function": f"{self.fn.__module__}.{self.fn.__qualname__}"}
        if self.capture_args:
            metadata["args"] = capture_config(dict(bound.arguments))
        if self.capture_source:
            try:
                text = inspect.getsource(self.fn)
            except (OSError, TypeError) as exc:  # REPL / exec: no file to read the source from
                warnings.warn(f"capture_source: no source for {self.fn.__qualname__}: {exc}",
                              RuntimeWarning, stacklevel=4)
                metadata["source"] = f"unavailable: {exc}"
            else:
                source = self.manager.log_artifact(f"{self.fn.__name__}-source",
                                                   ArtifactType.CODE,
                                                   data=scrub_text(text, code=True))
                parents.append(source.key)
        return parents, metadata

    def after(self, result: Any, parents: list[str], metadata: dict[str, Any]
              ) -> list[ArtifactMetadata]:
        """Log each returned value as its declared output type."""
        if not self.outputs:
            return []
        values = result if len(self.outputs) > 1 else (result,)
        if not isinstance(values, (tuple, list)) or len(values) != len(self.outputs):
            raise InvalidArgumentError(
                f"{self.fn.__qualname__} declared outputs={[t.value for t in self.outputs]} "
                f"but returned {type(result).__name__}; return a tuple with one value per "
                "declared output", argument="outputs")
        return [self._log(kind, value, parents, metadata)
                for kind, value in zip(self.outputs, values, strict=True)]

    def _log(self, kind: ArtifactType, value: Any, parents: list[str],
             metadata: dict[str, Any]) -> ArtifactMetadata:
        name = f"{self.fn.__name__}-{kind.value}"
        if isinstance(value, Path):
            return self.manager.log_artifact(name, kind, file_path=value, metadata=metadata,
                                             parent_artifacts=parents)
        if hasattr(value, "state_dict") and callable(value.state_dict):
            value = value.state_dict()  # an nn.Module is logged as its weights
        return self.manager.log_artifact(name, kind, data=value, metadata=metadata,
                                         parent_artifacts=parents)


# -- checkpoint ---------------------------------------------------------------------------------


def checkpoint(frequency: int | str = "epoch", save_best: bool = True, metric: str = "loss",
               mode: str = "min") -> Callable[[_F], _F]:
    """Save the model's state (safetensors) every ``frequency`` calls of a per-epoch or
    per-step training function that returns a metrics dict, keeping alias ``best`` on the
    version with the best ``metric`` (``mode`` ``"min"`` or ``"max"``), like Lightning's
    ``ModelCheckpoint(every_n_epochs / every_n_train_steps, monitor, mode)``. The model is the
    argument named ``model``, ``net`` or ``network``. Needs an active run."""
    every = _check_frequency(frequency)
    if mode not in ("min", "max"):
        raise InvalidArgumentError(f"mode must be 'min' or 'max', got {mode!r}", argument="mode")
    if not isinstance(metric, str) or not metric:
        raise InvalidArgumentError(f"metric must be a metric name, got {metric!r}",
                                   argument="metric")

    def decorate(fn: _F) -> _F:
        return _CheckpointState(fn, every, save_best, metric, mode).wrap()  # type: ignore

    return decorate


def _check_frequency(frequency: object) -> int:
    if frequency in ("epoch", "step"):
        return 1
    if isinstance(frequency, int) and not isinstance(frequency, bool) and frequency > 0:
        return frequency
    raise InvalidArgumentError(
        f"frequency must be 'epoch', 'step' or a positive int (every N calls), got "
        f"{frequency!r}", argument="frequency")


class _CheckpointState:
    """Call counter and best score for one decorated training function."""

    def __init__(self, fn: Callable[..., Any], every: int, save_best: bool, metric: str,
                 mode: str) -> None:
        self.fn, self.every, self.save_best, self.metric, self.mode = (
            fn, every, save_best, metric, mode)
        self.calls = 0
        self.best: float | None = None
        self.previous: str | None = None
        self.signature = inspect.signature(fn)

    def wrap(self) -> Any:
        fn = self.fn

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = self.signature.bind(*args, **kwargs)
            result = fn(*args, **kwargs)
            self.handle(bound, result)
            return result

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                bound = self.signature.bind(*args, **kwargs)
                result = await fn(*args, **kwargs)
                self.handle(bound, result)
                return result

            return async_wrapper
        return wrapper

    def handle(self, bound: inspect.BoundArguments, result: Any) -> ArtifactMetadata | None:
        if not isinstance(result, dict) or self.metric not in result:
            raise InvalidArgumentError(
                f"{self.fn.__qualname__} must return a dict containing {self.metric!r} for "
                f"@checkpoint(metric={self.metric!r}); it returned {result!r:.200}",
                argument="metric")
        manager = ArtifactManager()
        if manager.current_run is None:
            raise RunStateError("@checkpoint needs an active run: call it inside "
                                "ExperimentContext / @reproducible, or init_run() first")
        model = _find(bound, _MODEL_NAMES)
        if model is None or not hasattr(model, "state_dict"):
            raise InvalidArgumentError(
                f"@checkpoint found no model: give {self.fn.__qualname__} a parameter named "
                "model, net or network holding a torch.nn.Module", argument="model")
        self.calls += 1
        if self.calls % self.every:
            return None
        return self._save(manager, model, float(result[self.metric]), result)

    def _save(self, manager: ArtifactManager, model: Any, score: float,
              metrics: dict[str, Any]) -> ArtifactMetadata:
        # NaN is the worst score (as in Lightning): it never becomes, nor displaces, the best.
        improved = not math.isnan(score) and (
            self.best is None or (score < self.best if self.mode == "min" else score > self.best))
        aliases = ["best"] if self.save_best and improved else []
        meta = manager.log_artifact(
            "checkpoint", ArtifactType.CHECKPOINT, data=model.state_dict(),
            metadata={"call": self.calls, "metrics": capture_config(metrics),
                      "monitor": self.metric, "mode": self.mode},
            parent_artifacts=self._parents(manager), aliases=aliases)
        if improved:
            self.best = score
        self.previous = meta.key
        return meta

    def _parents(self, manager: ArtifactManager) -> list[str]:
        """DESIGN: a checkpoint's parents are the run's config, what the run consumed (its
        datasets) and the previous checkpoint."""
        run = manager.current_run
        record = manager.get_run(run.id) if run is not None and run.id else {}
        configs = [k for k in record.get("outputs", []) if parse_key(k).name == "config"]
        parents = [*configs, *record.get("inputs", [])]
        if self.previous:
            parents.append(self.previous)
        return list(dict.fromkeys(parents))
