"""repro_lightning: thin PyTorch Lightning and Hugging Face Accelerate adapters over
repro_core. No storage logic lives here: every write and read goes through ``repro_core``.

- Lightning: ``Trainer(callbacks=[ReproCallback(project="mnist")])`` is all a user adds.
- Accelerate: ``Accelerator(log_with=[ReproTracker(project="mnist")])``, and
  ``repro_lightning.save_state(accelerator)`` / ``load_state(accelerator, "state:latest")``
  where ``accelerator.save_state`` / ``load_state`` were called.

Each side needs only its own host package: the Lightning names are imported with the package
when ``lightning`` is installed (one line saying what to install otherwise, on first use), the
Accelerate names on first use.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from ._compat import lightning_available, require_lightning

_LIGHTNING = {
    "ReproCallback": ".callback", "ReproLogger": ".logger",
    "SafetensorsCheckpointIO": ".checkpoint_io", "TorchLoggingCheckpointIO": ".checkpoint_io",
    "TTRLLogger": ".ttrl_logger", "checkpoint_callback": ".checkpoint",
    "checkpoint_path": ".checkpoint", "load_from_checkpoint": ".checkpoint",
}
_ACCELERATE = {
    "ReproTracker": ".tracker", "save_state": "._accelerate_state",
    "load_state": "._accelerate_state", "save_model": "._accelerate_state",
    "state_path": "._accelerate_state",
}

__all__ = sorted([*_LIGHTNING, *_ACCELERATE])

if lightning_available():
    # Eager: importing ``.checkpoint`` makes ``LightningModule.load_from_checkpoint`` read
    # repro checkpoints, which must hold before any user code loads one.
    from .callback import ReproCallback  # noqa: F401
    from .checkpoint import checkpoint_callback, checkpoint_path, load_from_checkpoint  # noqa
    from .checkpoint_io import SafetensorsCheckpointIO, TorchLoggingCheckpointIO  # noqa: F401
    from .logger import ReproLogger  # noqa: F401
    from .ttrl_logger import TTRLLogger  # noqa: F401


def __getattr__(name: str) -> Any:
    """PEP 562: the Accelerate names (and, without Lightning, its one-line error)."""
    if name in _LIGHTNING:
        require_lightning()
    module = _ACCELERATE.get(name) or _LIGHTNING.get(name)
    if module is None:
        raise AttributeError(f"module 'repro_lightning' has no attribute {name!r}")
    if module in _ACCELERATE.values():
        _require("accelerate", "repro_lightning's Accelerate adapter needs `accelerate`: "
                               "pip install 'repro-lightning[accelerate]'")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def _require(package: str, hint: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ModuleNotFoundError(hint, name=package)
