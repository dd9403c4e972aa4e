"""What a Lightning run's config records: the module's and datamodule's hyper-parameters,
the Trainer settings that change results, and the global seed.

Only settings that change what is computed are kept (not ``enable_progress_bar``): two runs
with equal configs should be expected to produce equal checkpoints (with ``deterministic``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from repro_core import capture_config

__all__ = ["training_config"]

# Trainer attribute -> config key. Read with getattr: a Lightning release that lacks one
# records None rather than failing the run.
_TRAINER_SETTINGS = (
    "max_epochs", "min_epochs", "max_steps", "min_steps", "precision",
    "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
    "num_nodes", "num_devices", "world_size", "limit_train_batches", "limit_val_batches",
    "val_check_interval", "check_val_every_n_epoch", "log_every_n_steps",
)


def training_config(trainer: Any, pl_module: Any) -> dict[str, Any]:
    """The run config for ``trainer.fit(pl_module, ...)`` (JSON, secrets redacted)."""
    datamodule = getattr(trainer, "datamodule", None)
    config: dict[str, Any] = {
        "model": _hparams(pl_module),
        "model_class": _qualname(pl_module),
        "trainer": _trainer_settings(trainer),
        "seed": _seed(),
    }
    if datamodule is not None:
        config["datamodule"] = _hparams(datamodule)
        config["datamodule_class"] = _qualname(datamodule)
    return capture_config(config)


def _hparams(obj: Any) -> dict[str, Any]:
    hparams = getattr(obj, "hparams", None)
    return dict(hparams) if isinstance(hparams, Mapping) else {}


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _trainer_settings(trainer: Any) -> dict[str, Any]:
    settings = {name: _plain(getattr(trainer, name, None)) for name in _TRAINER_SETTINGS}
    connector = getattr(trainer, "_accelerator_connector", None)
    deterministic = getattr(connector, "deterministic", None)
    settings["deterministic"] = _plain(deterministic if deterministic is not None
                                       else _torch_deterministic())
    settings["strategy"] = type(trainer.strategy).__name__
    settings["accelerator"] = type(trainer.accelerator).__name__
    settings["devices"] = _plain(getattr(trainer, "device_ids", None))
    return settings


def _torch_deterministic() -> bool | str:
    """What ``Trainer(deterministic=…)`` set (Lightning 2.6 keeps no attribute for it: it
    sets torch's flag in ``__init__``): True, ``"warn"`` (warn only) or False."""
    import torch

    if not torch.are_deterministic_algorithms_enabled():
        return False
    return "warn" if torch.is_deterministic_algorithms_warn_only_enabled() else True


def _plain(value: Any) -> Any:
    """Trainer values as JSON-able scalars (precision may be a str, limits floats or ints)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _seed() -> int | None:
    """The seed ``lightning.seed_everything`` (or ``repro_core.seed_everything``, which
    exports the same variable) set; None when neither ran."""
    raw = os.environ.get("PL_GLOBAL_SEED")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None
