"""Seed every RNG a training run uses, and remember the seed so the environment capture can
record it (a seed nobody wrote down cannot reproduce anything).

Like Lightning's ``seed_everything`` it also exports ``PL_GLOBAL_SEED`` / ``PL_SEED_WORKERS``, so
processes Lightning spawns (DDP) and its dataloader workers re-seed identically, and a run mixing
both helpers records one seed.
"""

from __future__ import annotations

import importlib.util
import os
import random
import sys
import threading
from typing import Any

from ..errors import InvalidArgumentError

__all__ = ["recorded_seed", "seed_everything"]

_MAX_SEED = 2**32 - 1  # numpy's legacy RNG accepts no more
# cuBLAS is only deterministic with a fixed workspace; Lightning sets the same value.
_CUBLAS_DETERMINISTIC = ":4096:8"

_lock = threading.Lock()
_recorded: dict[str, Any] | None = None


def seed_everything(seed: int, *, workers: bool = False, deterministic: bool = False) -> int:
    """Seed ``random``, numpy and torch (each if installed) and record the seed.

    ``workers=True`` asks Lightning's dataloader worker init to derive per-worker seeds.
    ``deterministic=True`` also switches torch to deterministic algorithms (cuDNN deterministic,
    benchmark off) and sets ``CUBLAS_WORKSPACE_CONFIG`` unless the user already set it; it must
    run before the first cuBLAS call to take effect. Returns ``seed``.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _MAX_SEED:
        raise InvalidArgumentError(
            f"seed must be an int in [0, {_MAX_SEED}], got {seed!r}", argument="seed"
        )
    seeded = ["python"]
    random.seed(seed)
    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = str(int(workers))
    if _installed("numpy"):
        import numpy as np

        np.random.seed(seed)
        seeded.append("numpy")
    if _installed("torch"):
        _seed_torch(seed, deterministic)
        seeded.append("torch")
    elif deterministic:
        raise ModuleNotFoundError(
            "deterministic=True needs torch: pip install 'repro-lightning[torch]'", name="torch"
        )
    global _recorded
    with _lock:
        _recorded = {
            "seed": seed, "workers": workers, "deterministic": deterministic, "seeded": seeded,
        }
    return seed


def recorded_seed() -> dict[str, Any] | None:
    """What the last :func:`seed_everything` call did in this process, or None."""
    with _lock:
        return None if _recorded is None else dict(_recorded, seeded=list(_recorded["seeded"]))


def _installed(module: str) -> bool:
    # Seeding an installed-but-not-yet-imported torch matters: the user imports it later.
    return module in sys.modules or importlib.util.find_spec(module) is not None


def _seed_torch(seed: int, deterministic: bool) -> None:
    import torch

    torch.manual_seed(seed)  # seeds every CUDA device too, lazily
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", _CUBLAS_DETERMINISTIC)
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
