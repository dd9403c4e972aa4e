"""Which Lightning: the unified ``lightning`` package (``lightning.pytorch``), nothing else.

The standalone ``pytorch_lightning`` distribution has its own class hierarchy (a
``pytorch_lightning.Trainer`` does not accept a ``lightning.pytorch.Callback``), so supporting
both would mean two copies of every adapter. Where only ``pytorch_lightning`` is installed,
importing an adapter fails with one line saying what to install.
"""

from __future__ import annotations

import importlib.util

__all__ = ["lightning_available", "require_lightning"]

_HINT = ("repro_lightning's Lightning adapters need the `lightning` package (lightning.pytorch, "
         ">= 2.2): pip install 'repro-lightning[lightning]'")


def lightning_available() -> bool:
    """Whether ``lightning.pytorch`` can be imported (found, not imported)."""
    try:
        return importlib.util.find_spec("lightning.pytorch") is not None
    except (ImportError, ValueError):
        return False


def require_lightning() -> None:
    """Raise ``ModuleNotFoundError`` with the install line when ``lightning`` is missing."""
    if not lightning_available():
        standalone = _installed("pytorch_lightning")
        extra = (" (`pytorch_lightning` is installed, but its classes are not "
                 "lightning.pytorch's: use `import lightning.pytorch as pl`)") if standalone else ""
        raise ModuleNotFoundError(_HINT + extra, name="lightning")


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
