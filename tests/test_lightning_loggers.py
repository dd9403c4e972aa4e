"""``ReproLogger`` and ``TTRLLogger`` with a real Lightning ``Trainer`` on CPU: alone, and
sharing one run with ``ReproCallback``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_scripts.common import TinyModel, trainer_kwargs

from repro_core import ArtifactManager
from repro_core.registry import Registry
from repro_core.ttrl import run_updates
from repro_lightning import ReproCallback, ReproLogger, TTRLLogger

PROJECT = "loggers"


class RLModel(TinyModel):
    """Logs a reward/confidence/KL each step, and one experience through the logger."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)
        self.log("reward", float(batch_idx) / 10)
        self.log("confidence", 0.5 + batch_idx / 100)
        self.log("kl_divergence", 0.01 * batch_idx)
        for logger in self.loggers:
            if isinstance(logger, TTRLLogger):
                logger.log_experience(f"exp-{self.global_step}", {"prompt": batch_idx},
                                      {"answer": batch_idx * 2})
        return out


def _fit(model: pl.LightningModule, callbacks: list[Any], logger: Any, tmp: Path,
         **overrides: Any) -> pl.Trainer:
    pl.seed_everything(7)
    settings = trainer_kwargs(max_epochs=2, limit_train_batches=3, limit_val_batches=1,
                              log_every_n_steps=1)
    settings.update(logger=logger, default_root_dir=tmp, **overrides)
    trainer = pl.Trainer(callbacks=callbacks, **settings)
    trainer.fit(model)
    return trainer


def _checkpoints() -> list[Any]:
    return sorted(ArtifactManager().list_artifacts(f"{PROJECT}/checkpoint"),
                  key=lambda m: int(m.version[1:]))


def test_repro_logger_alone_records_a_run(store_home: Path, tmp_path: Path) -> None:
    logger = ReproLogger(project=PROJECT, monitor_hardware=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    _fit(TinyModel(lr=0.02), [checkpoint], logger, tmp_path)
    manager = ArtifactManager()
    run = manager.get_run(logger.version)
    assert run["state"] == "completed"
    assert run["config"]["lr"] == 0.02  # log_hyperparams started it with the hparams
    metrics = manager.get_metrics(logger.version)
    assert {"train_loss", "val_loss"} <= metrics.keys()
    assert len(metrics["train_loss"]) == 6  # log_every_n_steps=1: every step reached it
    logged = _checkpoints()
    assert len(logged) == 2 and all(m.run_id == logger.version for m in logged)
    assert logger.name == PROJECT and logger.experiment is None  # finished


def test_repro_logger_shares_the_callbacks_run(store_home: Path, tmp_path: Path) -> None:
    callback = ReproCallback(project=PROJECT, monitor_hardware=False)
    logger = ReproLogger(project=PROJECT, monitor_hardware=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    _fit(TinyModel(), [callback, checkpoint], logger, tmp_path, log_every_n_steps=2)
    manager = ArtifactManager()
    assert [r.id for r in Registry(store_home / "registry.sqlite", readonly=True).list_runs()] \
        == [callback.run_id]
    assert logger.version == callback.run_id
    points = manager.get_metrics(callback.run_id)["train_loss"]
    assert [step for step, _, _ in points] == sorted({s for s, _, _ in points})  # no doubles
    assert len(points) == 6  # the callback's per-step tap, not the logger's every 2nd step
    assert len(_checkpoints()) == 2  # logged once, by the CheckpointIO


def test_ttrl_logger_with_the_callback_links_updates_to_checkpoints(
        store_home: Path, tmp_path: Path) -> None:
    callback = ReproCallback(project=PROJECT, monitor_hardware=False)
    logger = TTRLLogger(project=PROJECT, monitor_hardware=False)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    _fit(RLModel(), [callback, checkpoint], logger, tmp_path)
    manager = ArtifactManager()
    run_id = callback.run_id
    assert run_id is not None
    registry = Registry(store_home / "registry.sqlite", readonly=True)
    updates = run_updates(registry, run_id)
    assert len(updates) == 6  # every training step, whatever log_every_n_steps says
    # (Lightning keeps logged floats as float32 tensors: compared at float32 precision)
    assert [u["reward"] for u in updates[:3]] == pytest.approx([0.0, 0.1, 0.2], rel=1e-6)
    assert math.isclose(updates[1]["confidence"], 0.51, rel_tol=1e-6)
    assert math.isclose(updates[2]["kl_divergence"], 0.02, rel_tol=1e-6)
    first_epoch, second_epoch = updates[:3], updates[3:]
    ckpt_v1, _ = _checkpoints()
    assert {u["model_version_id"] for u in first_epoch} == {None}
    assert {u["model_version_id"] for u in second_epoch} == {manager.version_id(ckpt_v1.key)}
    assert {"online/reward", "online/confidence", "online/kl_divergence"} <= \
        manager.get_metrics(run_id).keys()
    assert len(registry.experiences(run_id)) == 6


def test_ttrl_logger_key_validation() -> None:
    with pytest.raises(ValueError, match="three distinct"):
        TTRLLogger(project=PROJECT, reward_key="r", confidence_key="r")
    with pytest.raises(RuntimeError, match="needs the run to have started"):
        TTRLLogger(project=PROJECT).log_experience("e", 1, 2)
