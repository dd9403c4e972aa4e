"""Checkpoints the Lightning way: configure, resume, load — by path or by artifact key.

- ``checkpoint_callback(frequency, save_best, metric, mode)``: repro's ``checkpoint(...)``
  semantics as a configured ``ModelCheckpoint``.
- ``checkpoint_path("checkpoint:best")``: the verified local path of a logged checkpoint, for
  ``trainer.fit(model, ckpt_path=...)`` (one line to resume from the store).
- ``load_from_checkpoint(MyModel, "checkpoint:best" or a path)``.

``LightningModule.load_from_checkpoint(path)`` calls ``torch.load`` directly, bypassing every
``CheckpointIO``, so on a safetensors checkpoint it would fail to unpickle. Importing
``repro_lightning`` therefore wraps the loader that method and Lightning's default
``TorchCheckpointIO`` use (``pl_load`` in ``lightning.pytorch.core.saving`` and
``lightning.fabric.plugins.io.torch_io``): a file that is a repro checkpoint is read without
pickle; any other goes to the original loader unchanged.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

from lightning.fabric.plugins.io import torch_io
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.core import saving

from repro_core import ArtifactManager

from . import _skeleton
from .checkpoint_io import verify_checkpoint

__all__ = ["checkpoint_callback", "checkpoint_path", "load_from_checkpoint"]

_T = TypeVar("_T")


def checkpoint_callback(
    frequency: str | int = "epoch",
    save_best: bool = True,
    metric: str = "val_loss",
    mode: str = "min",
    **model_checkpoint_kwargs: Any,
) -> ModelCheckpoint:
    """A ``ModelCheckpoint`` with repro's ``checkpoint`` semantics.

    ``frequency``: ``"epoch"`` (every epoch), ``"step"`` (every training step) or an int N
    (every N training steps). ``save_best``: keep the best checkpoint by ``metric``
    (``mode`` ``"min"`` or ``"max"``) as ``best``; False keeps every checkpoint, unmonitored.
    The last checkpoint is always kept too (``save_last=True``). Other keyword arguments go
    to ``ModelCheckpoint`` unchanged. A metric that is never logged is reported by Lightning
    at the first validation end.
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' (lower {metric} is better) or 'max', got {mode!r}")
    if not isinstance(save_best, bool):
        raise ValueError(f"save_best must be True or False, got {save_best!r}")
    if save_best and (not isinstance(metric, str) or not metric):
        raise ValueError(f"save_best=True needs metric= (a name you self.log), got {metric!r}")
    kwargs: dict[str, Any] = {"save_last": True, **_frequency(frequency)}
    if save_best:
        kwargs.update(monitor=metric, mode=mode, save_top_k=1)
    else:
        kwargs.update(monitor=None, save_top_k=-1)
    clash = sorted(set(kwargs) & set(model_checkpoint_kwargs) - {"save_last", "save_top_k"})
    if clash:
        raise ValueError(f"{', '.join(clash)} would override frequency/save_best/metric/mode; "
                         "pass one or the other")
    kwargs.update(model_checkpoint_kwargs)
    return ModelCheckpoint(**kwargs)


def _frequency(frequency: object) -> dict[str, int]:
    if frequency == "epoch":
        return {"every_n_epochs": 1}
    if frequency == "step":
        return {"every_n_train_steps": 1}
    if isinstance(frequency, int) and not isinstance(frequency, bool) and frequency > 0:
        return {"every_n_train_steps": frequency}
    raise ValueError(f"frequency must be 'epoch', 'step' or a positive number of training "
                     f"steps, got {frequency!r}")


def checkpoint_path(key: str) -> str:
    """The local, verified (digest) path of a logged checkpoint version, e.g.
    ``trainer.fit(model, ckpt_path=checkpoint_path("checkpoint:best"))``. Read by each
    process itself (works on every rank before the process group exists); records nothing —
    the run that loads it records where it resumed from."""
    return os.fspath(ArtifactManager().artifact_path(key, type="checkpoint"))


def load_from_checkpoint(cls: type[_T], source: str | os.PathLike[str], *,
                         map_location: Any = None, **kwargs: Any) -> _T:
    """``cls.load_from_checkpoint`` for a path or an artifact key (``"checkpoint:best"``,
    ``"mnist/checkpoint:v3"``). A path that exists is a path; anything else is a key."""
    path = os.fspath(source)
    if not os.path.exists(path):
        path = checkpoint_path(path)
    loader = getattr(cls, "load_from_checkpoint", None)
    if loader is None:
        raise TypeError(f"{cls!r} has no load_from_checkpoint (a LightningModule or "
                        "LightningDataModule class is expected)")
    return loader(path, map_location=map_location, **kwargs)  # type: ignore[no-any-return]


def _repro_aware_load(path_or_url: Any, map_location: Any = None,
                      weights_only: bool | None = None) -> Any:
    """``pl_load`` for ``load_from_checkpoint``: repro checkpoints without pickle."""
    if isinstance(path_or_url, (str, os.PathLike)) and _skeleton.is_repro_checkpoint(path_or_url):
        verify_checkpoint(os.fspath(path_or_url))
        return _skeleton.load(path_or_url, map_location=map_location)
    return _ORIGINAL_LOAD(path_or_url, map_location=map_location, weights_only=weights_only)


_ORIGINAL_LOAD = getattr(saving.pl_load, "__wrapped__", saving.pl_load)
_repro_aware_load.__wrapped__ = _ORIGINAL_LOAD  # type: ignore[attr-defined]
saving.pl_load = _repro_aware_load
# Lightning's default TorchCheckpointIO loads through the same function: a Trainer without
# ReproCallback (or the main process of a ``ddp_spawn`` job, which reads back the weights its
# rank-0 worker saved) reads repro checkpoints too, still without pickle.
torch_io.pl_load = _repro_aware_load
