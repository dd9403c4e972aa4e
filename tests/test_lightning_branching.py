"""Which run a ``fit(ckpt_path=...)`` belongs to, and how checkpoints are linked to the runs
that start from them: continue (``resume="allow"``), branch (``resume="never"``), a
checkpoint from another store, the torch format's lineage, pruned files, logger-only saves."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_scripts.common import TinyModel, trainer_kwargs

from repro_core import ArtifactManager
from repro_core.registry import Registry
from repro_lightning import ReproCallback, ReproLogger, checkpoint_path

PROJECT = "branch"


def _fit(tmp: Path, callback: Any, *, max_epochs: int, ckpt_path: str | None = None,
         logger: Any = False, dirname: str = "ckpt") -> pl.Trainer:
    pl.seed_everything(3)
    checkpoint = ModelCheckpoint(dirpath=tmp / dirname, save_top_k=-1)
    callbacks = [checkpoint] if callback is None else [callback, checkpoint]
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(
        max_epochs=max_epochs, limit_train_batches=2, limit_val_batches=1, logger=logger))
    trainer.fit(TinyModel(), ckpt_path=ckpt_path)
    return trainer


def _runs(store_home: Path) -> list[str]:
    return [r.id for r in Registry(store_home / "registry.sqlite", readonly=True).list_runs()]


def _repro(**kwargs: Any) -> ReproCallback:
    return ReproCallback(project=PROJECT, monitor_hardware=False, **kwargs)


def _new(meta_list: list[Any], before: set[str]) -> list[Any]:
    return [m for m in meta_list if m.key not in before]


def _checkpoints() -> list[Any]:
    return ArtifactManager().list_artifacts(f"{PROJECT}/checkpoint")


def test_resume_never_branches_a_new_run_from_the_checkpoint(store_home: Path,
                                                             tmp_path: Path) -> None:
    first = _repro()
    _fit(tmp_path, first, max_epochs=1)
    (start,) = _checkpoints()
    before = {m.key for m in _checkpoints()}
    second = _repro(resume="never")
    _fit(tmp_path, second, max_epochs=2, ckpt_path=checkpoint_path(start.key), dirname="b")
    assert second.run_id != first.run_id and len(_runs(store_home)) == 2
    run = ArtifactManager().get_run(second.run_id)
    assert start.key in run["inputs"]  # the branch point is an input of the new run
    (after,) = _new(_checkpoints(), before)
    assert start.key in after.parent_artifacts and after.run_id == second.run_id
    assert ArtifactManager().get_run(first.run_id)["state"] == "completed"  # untouched


def test_resume_allow_continues_the_checkpoints_run(store_home: Path, tmp_path: Path) -> None:
    first = _repro()
    _fit(tmp_path, first, max_epochs=1)
    (start,) = _checkpoints()
    second = _repro()
    _fit(tmp_path, second, max_epochs=2, ckpt_path=checkpoint_path(start.key), dirname="b")
    assert second.run_id == first.run_id and len(_runs(store_home)) == 1


def test_a_checkpoint_from_another_store_starts_a_new_run(
        store_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = tmp_path / "other-store"
    ArtifactManager.reset_instance().set_root(other)
    monkeypatch.setenv("REPRO_HOME", str(other))
    foreign = _repro()
    trainer = _fit(tmp_path, foreign, max_epochs=1, dirname="foreign")
    copied = tmp_path / "copied.ckpt"
    shutil.copyfile(trainer.checkpoint_callback.best_model_path, copied)
    monkeypatch.setenv("REPRO_HOME", str(store_home))
    ArtifactManager.reset_instance().set_root(store_home)
    local = _repro()
    with pytest.warns(RuntimeWarning, match="loading it unverified"):
        _fit(tmp_path, local, max_epochs=2, ckpt_path=str(copied), dirname="b")
    assert local.run_id != foreign.run_id  # no run adopted under a foreign id
    assert _runs(store_home) == [local.run_id]


def test_torch_format_resume_descends_from_the_checkpoint_loaded(
        store_home: Path, tmp_path: Path) -> None:
    first = _repro(checkpoint_format="torch")
    _fit(tmp_path, first, max_epochs=2)
    oldest = min(_checkpoints(), key=lambda m: int(m.version[1:]))
    before = {m.key for m in _checkpoints()}
    second = _repro(checkpoint_format="torch")
    _fit(tmp_path, second, max_epochs=3, ckpt_path=oldest.metadata["path"], dirname="b")
    assert second.run_id == first.run_id
    new = _new(_checkpoints(), before)
    first_new = min(new, key=lambda m: int(m.version[1:]))
    assert oldest.key in first_new.parent_artifacts  # not the newest saved before it


def test_an_intact_file_of_a_pruned_version_still_loads(store_home: Path, tmp_path: Path) -> None:
    first = _repro(prune="mirror")
    trainer = _fit(tmp_path, first, max_epochs=1)
    path = trainer.checkpoint_callback.best_model_path
    backup = tmp_path / "backup.ckpt"
    shutil.copyfile(path, backup)
    (meta,) = _checkpoints()
    ArtifactManager().prune_version(meta.key)
    again = _repro()
    _fit(tmp_path, again, max_epochs=2, ckpt_path=str(backup), dirname="b")  # no IntegrityError
    assert again.run_id == first.run_id


def test_logger_alone_never_links_lightnings_own_files(store_home: Path, tmp_path: Path) -> None:
    """Without ReproCallback, Lightning's own writer saves the files, and may write into an
    existing one: the logger logs a copy and leaves the file alone (no link to a blob)."""
    logger = ReproLogger(project=PROJECT, monitor_hardware=False)
    _fit(tmp_path, None, max_epochs=2, logger=logger)
    files = sorted((tmp_path / "ckpt").iterdir())
    assert files and all(os.stat(f).st_nlink == 1 and not f.is_symlink() for f in files)
    assert len(_checkpoints()) == 2
