"""Put repro's ``CheckpointIO`` on a Trainer's strategy (from ``ReproCallback.setup``).

Lightning resolves the strategy's ``CheckpointIO`` lazily: none configured means its own
``TorchCheckpointIO``. Ours replaces that default (or the base of a wrapping one such as
``AsyncCheckpointIO``). A ``CheckpointIO`` the user chose is theirs: replacing it silently
would drop what they asked for, so that is a clear error naming both ways out.
"""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from ._session import RunSession
from .checkpoint_io import SafetensorsCheckpointIO, TorchLoggingCheckpointIO

__all__ = ["install_checkpoint_io"]

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
