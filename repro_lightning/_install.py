"""Put repro's ``CheckpointIO`` on a Trainer's strategy (from ``ReproCallback.setup``).

Lightning resolves the strategy's ``CheckpointIO`` lazily: none configured means its own
``TorchCheckpointIO``. Ours replaces that default (or the base of a wrapping one such as
``AsyncCheckpointIO``). A ``CheckpointIO`` the user chose is theirs: replacing it silently
would drop what they asked for, so that is a clear error naming both ways out.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from ._session import RunSession
from .checkpoint_io import SafetensorsCheckpointIO, TorchLoggingCheckpointIO

__all__ = ["install_checkpoint_io", "log_directory_saves", "stop_directory_saves"]

_OURS = (SafetensorsCheckpointIO, TorchLoggingCheckpointIO)


def install_checkpoint_io(trainer: Any, session: RunSession, checkpoint_format: str) -> None:
    strategy = trainer.strategy
    current = strategy.checkpoint_io  # (Lightning creates its default here if none is set)
    wrapper = current if isinstance(current, _WrappingCheckpointIO) else None
    base = wrapper.checkpoint_io if wrapper is not None else current
    if isinstance(base, _OURS) and base.session is session:
        base.trainer = trainer
        return
    if type(base) is not TorchCheckpointIO:
        raise ValueError(
            f"ReproCallback logs checkpoints through its own CheckpointIO, but this Trainer "
            f"uses {type(base).__name__}. Remove that plugin, or log its files yourself "
            "(repro_core.ArtifactManager().log_artifact(..., file_path=...)) and drop "
            "ReproCallback's checkpoint logging")
    io: Any = (SafetensorsCheckpointIO(session) if checkpoint_format == "safetensors"
               else TorchLoggingCheckpointIO(session))
    io.trainer = trainer
    if wrapper is not None:
        wrapper._checkpoint_io = io  # (its setter refuses once a base is configured)
    else:
        strategy.checkpoint_io = io


def log_directory_saves(trainer: Any, session: RunSession) -> None:
    """Sharded strategies (DeepSpeed; FSDP with ``state_dict_type="sharded"``) write a
    checkpoint *directory* with their own code on every rank, never through a
    ``CheckpointIO``. ``trainer.save_checkpoint`` (which ``ModelCheckpoint`` calls on every
    rank, and which ends with a barrier) is wrapped on this Trainer: after it returns, global
    rank 0 logs a directory found at the path as a ``checkpoint`` version (every shard file,
    content-addressed). Files are logged by the ``CheckpointIO`` as they are written."""
    if trainer.__dict__.get("_repro_directory_saves") is session:
        return
    # A save_checkpoint already on the instance (a test's mock, another tool's wrapper) is
    # wrapped, not replaced, and put back by stop_directory_saves.
    previous = trainer.__dict__.get("save_checkpoint")
    original = previous if previous is not None else (
        lambda *args, **kwargs: type(trainer).save_checkpoint(trainer, *args, **kwargs))

    def save_checkpoint(*args: Any, **kwargs: Any) -> None:
        original(*args, **kwargs)  # (the arguments exactly as given: mocks compare them)
        path = os.fspath(args[0] if args else kwargs["filepath"])
        if trainer.is_global_zero and session.active and os.path.isdir(path):
            session.log_checkpoint(None, path, trainer)

    trainer.save_checkpoint = save_checkpoint
    trainer._repro_directory_saves = session
    trainer._repro_saves_previous = previous


def stop_directory_saves(trainer: Any) -> None:
    """Undo ``log_directory_saves`` (at the end of a stage: a Trainer stays picklable)."""
    if trainer.__dict__.pop("_repro_directory_saves", None) is None:
        return
    previous = trainer.__dict__.pop("_repro_saves_previous", None)
    if previous is not None:
        trainer.save_checkpoint = previous
    else:
        trainer.__dict__.pop("save_checkpoint", None)
