"""``ReproCallback`` in one process, with a real ``lightning.pytorch.Trainer`` on CPU.

Each test fits ``TinyModel`` (``tests/lightning_scripts/common.py``: a 32→2 linear layer,
Adam + StepLR, a few batches) into a fresh store under ``tmp_path`` and checks one promise of
the adapter against what Lightning itself reports (``ModelCheckpoint.best_model_path``, the
files it saved, what a logger receives): the run and its end state, config and environment,
one version per save, ``best``, lineage, every ``self.log`` value, links instead of copies,
loading back, pruning, argument errors, other loggers beside it, and determinism.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning_scripts.common import TinyModel, trainer_kwargs
from safetensors.torch import save_file

import repro_lightning
from repro_core import (
    ArtifactManager,
    ArtifactNotFoundError,
    ArtifactType,
    RunState,
    collect_garbage,
    verify_store,
)
from repro_lightning import _skeleton
from repro_lightning._skeleton import CheckpointEncodingError, is_repro_checkpoint

PROJECT = "lit"
SEED = 1234


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in ``tmp_path``: a Trainer's default directories must never land in the checkout."""
    monkeypatch.chdir(tmp_path)


class CountingCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that records every file it saves, in order."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.saved: list[str] = []

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        self.saved.append(os.path.abspath(filepath))
        super()._save_checkpoint(trainer, filepath)


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call, as a logger would write it."""

    def __init__(self) -> None:
        super().__init__()
        self.points: dict[str, list[tuple[int, float]]] = {}

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.points.setdefault(key, []).append((int(step or 0), float(value)))


@pytest.fixture
def store(manager: ArtifactManager, store_root: Path, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[Path]:
    """A fresh store (the ``manager`` fixture's), also named by ``REPRO_HOME``."""
    monkeypatch.setenv("REPRO_HOME", str(store_root))
    yield store_root


def repro(**kwargs: Any) -> repro_lightning.ReproCallback:
    kwargs.setdefault("project", PROJECT)
    kwargs.setdefault("monitor_hardware", False)
    return repro_lightning.ReproCallback(**kwargs)


def fit(model: pl.LightningModule | None = None, *, callbacks: list[Any],
        seed: int = SEED, **overrides: Any) -> pl.Trainer:
    pl.seed_everything(seed)
    settings = trainer_kwargs(max_epochs=3, limit_train_batches=4, limit_val_batches=2)
    settings.update(overrides)
    trainer = pl.Trainer(callbacks=callbacks, **settings)
    trainer.fit(model if model is not None else TinyModel())
    return trainer


def versions(name: str = "checkpoint") -> list[Any]:
    """Live versions of ``PROJECT/name``, oldest first."""
    found = ArtifactManager().list_artifacts(f"{PROJECT}/{name}")
    return sorted(found, key=lambda m: int(m.version[1:]))


def version_at(path: str) -> Any:
    """The newest live checkpoint version logged for ``path``."""
    matching = [m for m in versions() if m.metadata["path"] == os.path.abspath(path)]
    assert matching, f"no version logged for {path}"
    return matching[-1]


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# -- the run, its config and environment ---------------------------------------------------------


def test_fit_records_a_completed_run_with_config_and_environment(store: Path) -> None:
    callback = repro()
    counter = CountingCheckpoint(dirpath=store.parent / "ckpt", monitor="val_loss",
                                 save_top_k=-1, save_last=True)
    trainer = fit(TinyModel(lr=0.02, hidden=16), callbacks=[callback, counter],
                  accumulate_grad_batches=2, precision="bf16-mixed")
    manager = ArtifactManager()
    assert callback.run_id is not None
    run = manager.get_run(callback.run_id)
    assert run["state"] == RunState.COMPLETED.value
    assert run["project"] == PROJECT

    config = manager.load_artifact(f"{PROJECT}/config:latest")
    assert config["model"] == {"lr": 0.02, "hidden": 16, "fail_at_step": None,
                               "fail_rank": None}
    settings = config["trainer"]
    assert settings["max_epochs"] == 3
    assert settings["accumulate_grad_batches"] == 2
    assert settings["precision"] == "bf16-mixed"
    assert config["seed"] == SEED
    env = manager.load_artifact(f"{PROJECT}/environment:latest")
    assert isinstance(env, dict) and env
    assert {f"{PROJECT}/config:v1", f"{PROJECT}/environment:v1"} <= set(run["outputs"])

    # one version per save, in save order, each at the path ModelCheckpoint wrote
    assert len(counter.saved) == 6  # (3 epochs: a top-k file and last.ckpt each)
    logged = versions()
    assert [m.metadata["path"] for m in logged] == counter.saved
    assert all(m.run_id == callback.run_id and m.type is ArtifactType.CHECKPOINT
               for m in logged)
    assert logged[-1].aliases.count("latest") == 1
    assert trainer.global_step == 6  # (4 batches / 2 accumulated, 3 epochs)
    assert logged[-1].metadata["global_step"] == 6


def test_trainer_save_checkpoint_calls_each_make_a_version(store: Path, tmp_path: Path) -> None:
    saves: list[str] = []

    class SaveEveryStep(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            saves.append(str(tmp_path / "manual" / f"s{trainer.global_step}.ckpt"))
            trainer.save_checkpoint(saves[-1])

    callback = repro()
    trainer = fit(callbacks=[callback, SaveEveryStep()], enable_checkpointing=False,
                  max_epochs=1, limit_train_batches=3, limit_val_batches=0)
    assert [m.metadata["path"] for m in versions()] == saves and len(saves) == 3
    assert ArtifactManager().get_run(callback.run_id)["state"] == "completed"
    # after fit the run is over: a save is Lightning's plain file, logged nowhere
    trainer.save_checkpoint(tmp_path / "after.ckpt")
    assert len(versions()) == 3
    assert TinyModel.load_from_checkpoint(tmp_path / "after.ckpt") is not None


# -- best ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "best_epoch"), [("min", 0), ("max", 2)])
def test_best_alias_is_on_the_model_checkpoint_best(store: Path, mode: str,
                                                    best_epoch: int) -> None:
    """``val_epoch`` rises every epoch: ``min`` keeps epoch 0 (not the newest), ``max`` 2."""
    checkpoint = ModelCheckpoint(dirpath=store.parent / "ckpt", monitor="val_epoch", mode=mode,
                                 save_top_k=2, save_last=True,
                                 filename="{epoch}-{val_epoch:.0f}")
    trainer = fit(TinyModel(), callbacks=[repro(), checkpoint])
    best_path = trainer.checkpoint_callback.best_model_path
    assert os.path.basename(best_path).startswith(f"epoch={best_epoch}-")
    best = [m for m in versions() if "best" in m.aliases]
    assert len(best) == 1
    assert best[0].metadata["path"] == os.path.abspath(best_path)
    assert best[0].metadata["epoch"] == best_epoch
    assert ArtifactManager().identify_file(best_path, f"{PROJECT}/checkpoint").key == best[0].key
    assert ArtifactManager().artifact_path(f"{PROJECT}/checkpoint:best").stat().st_ino == \
        os.stat(best_path).st_ino


def test_save_last_link_keeps_latest_on_the_file_the_link_names(store: Path) -> None:
    """``save_last="link"`` makes ``last.ckpt`` a symlink with ``_link_checkpoint`` and never
    calls the loggers' ``after_save_checkpoint``: no version of its own, ``latest`` is the
    version the link points at, and resuming from ``last.ckpt`` identifies that version."""
    checkpoint = CountingCheckpoint(dirpath=store.parent / "ckpt", monitor="val_epoch",
                                    mode="min", save_top_k=-1, save_last="link")
    fit(callbacks=[repro(), checkpoint])
    last = store.parent / "ckpt" / "last.ckpt"
    assert last.is_symlink()
    logged = versions()
    assert [m.metadata["path"] for m in logged] == checkpoint.saved  # the link is no save
    assert not any(m.metadata["filename"] == "last.ckpt" for m in logged)
    (latest,) = [m for m in logged if "latest" in m.aliases]
    assert latest.metadata["path"] == os.path.realpath(last)
    assert ArtifactManager().identify_file(last, f"{PROJECT}/checkpoint").key == latest.key
    (best,) = [m for m in logged if "best" in m.aliases]
    assert best.metadata["epoch"] == 0 and best.key != latest.key


# -- lineage -------------------------------------------------------------------------------------


def test_checkpoints_descend_from_config_datasets_and_the_previous_checkpoint(
        store: Path) -> None:
    manager = ArtifactManager()
    manager.init_run("prepare", project=PROJECT)
    dataset = manager.log_artifact("train-data", ArtifactType.DATASET, data={"rows": [1, 2, 3]})
    manager.finalize_run()

    callback = repro(datasets={"train": dataset.key})
    fit(callbacks=[callback, ModelCheckpoint(dirpath=store.parent / "ckpt", save_last=True)],
        max_epochs=2)
    config_key = f"{PROJECT}/config:v1"
    assert manager.get_run(callback.run_id)["inputs"] == [dataset.key]
    logged = versions()
    assert len(logged) == 4
    for previous, meta in zip([None, *logged[:-1]], logged, strict=True):
        expected = {config_key, dataset.key} | ({previous.key} if previous else set())
        assert set(meta.parent_artifacts) == expected
    lineage = manager.get_lineage(logged[-1].key)
    assert {config_key, dataset.key, logged[0].key} <= set(lineage["ancestors"])
    assert lineage["produced_by"]["id"] == callback.run_id
    assert logged[-1].key in manager.get_lineage(dataset.key)["descendants"]


# -- metrics -------------------------------------------------------------------------------------


def _series(points: dict[str, list[tuple[int, float, float]]]) -> dict[str, list[tuple[int,
                                                                                     float]]]:
    return {k: [(s, pytest.approx(v)) for s, v, _ in rows] for k, rows in points.items()
            if not k.startswith("hardware/")}


def test_every_logged_value_is_recorded_at_its_step(store: Path) -> None:
    """Reference: a logger on a Trainer logging every step. Without any logger and with the
    default ``log_every_n_steps`` (50), repro still records the same points."""
    reference = RecordingLogger()
    with_logger = repro()
    fit(callbacks=[with_logger], enable_checkpointing=False, logger=reference,
        log_every_n_steps=1)
    expected = {k: [(s, pytest.approx(v)) for s, v in rows]
                for k, rows in reference.points.items()}
    assert {"train_loss", "val_loss", "val_acc", "val_epoch", "epoch"} <= expected.keys()
    assert [s for s, _ in expected["train_loss"]] == list(range(12))  # every training step
    metrics = ArtifactManager().get_metrics(with_logger.run_id)
    assert _series(metrics) == expected

    plain = repro()
    trainer = fit(callbacks=[plain], enable_checkpointing=False)  # logger=False, every 50
    assert trainer.log_every_n_steps == 50 and trainer.loggers == []
    assert _series(ArtifactManager().get_metrics(plain.run_id)) == expected


def test_log_metrics_false_records_none(store: Path) -> None:
    callback = repro(log_metrics=False)
    fit(callbacks=[callback], enable_checkpointing=False, max_epochs=1)
    assert _series(ArtifactManager().get_metrics(callback.run_id)) == {}


# -- the files Lightning sees ---------------------------------------------------------------------


def test_checkpoint_files_are_links_to_the_blobs_and_resaves_never_touch_them(
        store: Path) -> None:
    checkpoint = CountingCheckpoint(dirpath=store.parent / "ckpt", every_n_train_steps=2,
                                    save_top_k=0, save_last=True)
    fit(callbacks=[repro(), checkpoint], max_epochs=2, limit_val_batches=0)
    last = str(store.parent / "ckpt" / "last.ckpt")
    assert checkpoint.saved == [last] * 4
    logged = versions()
    assert len(logged) == 4 and len({m.hash for m in logged}) == 4
    manager = ArtifactManager()
    blob = manager.use_artifact(logged[-1].key).path
    assert blob is not None
    stat = os.stat(last)
    assert stat.st_ino == os.stat(blob).st_ino or os.path.samefile(os.path.realpath(last), blob)
    assert stat.st_nlink > 1 or os.path.islink(last)
    assert stat.st_mode & 0o222 == 0  # (the read-only blob itself)
    assert is_repro_checkpoint(last)
    # every earlier version's blob is intact (each save linked a new name over last.ckpt)
    for meta in logged[:-1]:
        assert manager.artifact_path(meta.key, verify=True).stat().st_ino != stat.st_ino
    report = verify_store(store)
    assert report.ok, report.problems


def test_torch_format_logs_versions_of_lightnings_own_files(store: Path) -> None:
    checkpoint = CountingCheckpoint(dirpath=store.parent / "ckpt", monitor="val_loss",
                                    save_top_k=-1, save_last=True)
    trainer = fit(callbacks=[repro(checkpoint_format="torch"), checkpoint], max_epochs=2)
    logged = versions()
    assert [m.metadata["path"] for m in logged] == checkpoint.saved
    assert len(logged) == 4
    path = trainer.checkpoint_callback.best_model_path
    assert not is_repro_checkpoint(path)
    loaded = torch.load(path, weights_only=False)
    assert {"state_dict", "optimizer_states", "lr_schedulers", "callbacks"} <= loaded.keys()
    meta = ArtifactManager().identify_file(path, f"{PROJECT}/checkpoint")
    assert meta is not None and meta.metadata["path"] == os.path.abspath(path)
    assert os.stat(path).st_nlink > 1 or os.path.islink(path)
    assert verify_store(store).ok


def _other_filesystem(than: Path) -> Path | None:
    """A writable directory on another file system than ``than`` (tmpfs /dev/shm), if any."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != than.stat().st_dev:
        return shm
    return None


def test_torch_format_resaving_last_never_rewrites_an_earlier_blob(
        store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's torch saves go through fsspec, whose temp file lives in the system temp
    directory: on another file system the final move is a copy *into* the existing
    ``last.ckpt`` — our hard link to the previous version's blob — unless it is unlinked
    first. (Before the fix, ``verify_store`` found those blobs rewritten.)"""
    import tempfile

    other = _other_filesystem(store.parent)
    if other is None:
        pytest.skip("no second file system (tmpfs /dev/shm) for the temp directory here")
    temp = Path(tempfile.mkdtemp(dir=other))
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    try:
        checkpoint = ModelCheckpoint(dirpath=store.parent / "ckpt", save_last=True,
                                     every_n_train_steps=2, save_top_k=-1)
        fit(callbacks=[repro(checkpoint_format="torch"), checkpoint], max_epochs=2)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    lasts = [m for m in versions() if m.metadata["filename"] == "last.ckpt"]
    assert len(lasts) > 1
    report = verify_store(store)
    assert report.ok, report.problems


class DirectoryStrategy(SingleDeviceStrategy):
    """Saves the way sharded strategies (DeepSpeed, FSDP ``state_dict_type="sharded"``) do:
    a checkpoint *directory* of shard files written by the strategy's own code, never
    through the ``CheckpointIO``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any,
                        storage_options: Any | None = None) -> None:
        os.makedirs(filepath, exist_ok=True)
        state = {k: v.contiguous() for k, v in checkpoint["state_dict"].items()}
        save_file(state, os.path.join(filepath, "model-shard-0.safetensors"))
        meta = {"global_step": checkpoint["global_step"], "epoch": checkpoint["epoch"]}
        with open(os.path.join(filepath, "meta.json"), "w") as f:
            json.dump(meta, f)


def test_a_strategy_that_saves_directories_gets_them_logged(store: Path) -> None:
    checkpoint = CountingCheckpoint(dirpath=store.parent / "ckpt", save_top_k=-1)
    trainer = fit(callbacks=[repro(), checkpoint], max_epochs=2,
                  strategy=DirectoryStrategy(device=torch.device("cpu")))
    logged = versions()
    assert [m.metadata["path"] for m in logged] == checkpoint.saved
    for meta in logged:
        assert meta.format == "directory"
        served = ArtifactManager().artifact_path(meta.key)
        assert sorted(p.name for p in served.iterdir()) == ["meta.json",
                                                             "model-shard-0.safetensors"]
        assert Path(meta.metadata["path"]).is_dir()  # left as the strategy wrote it
    assert "save_checkpoint" not in trainer.__dict__  # unwrapped at the end: picklable
    assert verify_store(store).ok


# -- loading back --------------------------------------------------------------------------------


def test_checkpoints_load_back_every_lightning_way(store: Path) -> None:
    checkpoint = ModelCheckpoint(dirpath=store.parent / "ckpt", monitor="val_epoch",
                                 mode="max", save_last=True)  # best = the final weights
    callback = repro()
    trainer = fit(TinyModel(lr=0.05), callbacks=[callback, checkpoint])
    final = weights(trainer.lightning_module)
    best_path = checkpoint.best_model_path
    assert is_repro_checkpoint(best_path)

    by_path = TinyModel.load_from_checkpoint(best_path)
    assert by_path.hparams.lr == 0.05
    assert_same_weights(weights(by_path), final)
    for key in (f"{PROJECT}/checkpoint:best", best_path):
        by_key = repro_lightning.load_from_checkpoint(TinyModel, key)
        assert_same_weights(weights(by_key), final)
    with pytest.raises(ArtifactNotFoundError):
        repro_lightning.load_from_checkpoint(TinyModel, f"{PROJECT}/checkpoint:v99")

    validated = trainer.validate(ckpt_path="best", verbose=False)
    tested = trainer.test(ckpt_path="best", verbose=False)
    assert "val_loss" in validated[0] and "test_loss" in tested[0]
    assert_same_weights(weights(trainer.lightning_module), final)
    run = ArtifactManager().get_run(callback.run_id)
    assert run["state"] == RunState.COMPLETED.value
    assert repro_lightning.checkpoint_path(f"{PROJECT}/checkpoint:best") == str(
        ArtifactManager().artifact_path(f"{PROJECT}/checkpoint:best"))


# -- pruning -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prune", ["mirror", "keep"])
def test_prune_mirror_releases_replaced_top_k_versions(store: Path, prune: str) -> None:
    checkpoint = CountingCheckpoint(dirpath=store.parent / "ckpt", monitor="val_epoch",
                                    mode="max", save_top_k=1, save_last=True)
    trainer = fit(callbacks=[repro(prune=prune), checkpoint])
    manager = ArtifactManager()
    all_versions = [manager.version_id(f"{PROJECT}/checkpoint:v{i}") for i in range(1, 7)]
    assert len(all_versions) == len(checkpoint.saved) == 6
    live = versions()
    best = manager.use_artifact(f"{PROJECT}/checkpoint:best")
    latest = manager.use_artifact(f"{PROJECT}/checkpoint:latest")
    assert best.metadata["path"] == os.path.abspath(trainer.checkpoint_callback.best_model_path)
    assert latest.metadata["filename"] == "last.ckpt"
    replaced = [f"{PROJECT}/checkpoint:v{i}" for i, path in
                enumerate(checkpoint.saved, 1)
                if "last" not in path and os.path.abspath(path) != best.metadata["path"]]
    assert len(replaced) == 2  # epoch 0 and 1 were replaced by the next epoch's top-1
    for key in replaced:
        assert not os.path.exists(manager.get_lineage(key)["artifact"]["metadata"]["path"])

    before = verify_store(store)
    gc = collect_garbage(store, dry_run=False, grace_seconds=0)
    replaced_digests = {manager.get_lineage(k)["artifact"]["hash"] for k in replaced}
    if prune == "mirror":
        for key in replaced:
            with pytest.raises(ArtifactNotFoundError):
                manager.use_artifact(key)
        assert {m.key for m in live}.isdisjoint(replaced)
        assert replaced_digests <= set(gc.blobs)
    else:
        assert {m.key for m in live} >= set(replaced)
        assert replaced_digests.isdisjoint(gc.blobs)
        for key in replaced:
            assert manager.use_artifact(key).path is not None
    assert before.ok
    after = verify_store(store)
    assert after.ok, after.problems
    for meta in (best, latest):
        assert manager.artifact_path(meta.key, verify=True).exists()


# -- argument errors ------------------------------------------------------------------------------


def test_checkpoint_callback_arguments() -> None:
    with pytest.raises(ValueError, match="mode"):
        repro_lightning.checkpoint_callback(mode="up")
    with pytest.raises(ValueError, match="frequency"):
        repro_lightning.checkpoint_callback(frequency=0)
    with pytest.raises(ValueError, match="frequency"):
        repro_lightning.checkpoint_callback(frequency=True)
    every_three = repro_lightning.checkpoint_callback(3, metric="val_acc", mode="max")
    assert (every_three._every_n_train_steps, every_three.monitor, every_three.mode,
            every_three.save_top_k, every_three.save_last) == (3, "val_acc", "max", 1, True)
    unmonitored = repro_lightning.checkpoint_callback("step", save_best=False)
    assert (unmonitored.monitor, unmonitored.save_top_k) == (None, -1)


def test_a_never_logged_metric_fails_at_the_first_validation_end(store: Path) -> None:
    callback = repro()
    checkpoint = repro_lightning.checkpoint_callback(metric="val_nope",
                                                     dirpath=store.parent / "ckpt")
    with pytest.raises(MisconfigurationException, match="val_nope"):
        fit(callbacks=[callback, checkpoint])
    run = ArtifactManager().get_run(callback.run_id)
    assert run["state"] == RunState.FAILED.value
    assert versions() == []
    assert [s for s, _, _ in ArtifactManager().get_metrics(callback.run_id)["train_loss"]] == \
        [0, 1, 2, 3]  # (the error came at the end of the first epoch)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"checkpoint_format": "pickle"}, ValueError),
    ({"datasets": {"train": 3}}, TypeError),
    ({"datasets": ["mnist:v1"]}, TypeError),
    ({"project": "bad name!"}, ValueError),
    ({"prune": "some"}, ValueError),
    ({"resume": "must"}, ValueError),
    ({"tags": "one-tag"}, ValueError),  # (InvalidArgumentError, a ValueError)
    ({"checkpoint_name": "a/b/c"}, ValueError),
])
def test_bad_callback_arguments_raise_before_any_store_exists(
        store: Path, kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        repro_lightning.ReproCallback(**kwargs)
    if set(kwargs) <= {"datasets", "tags", "checkpoint_name"}:
        with pytest.raises(error):  # the logger checks the same arguments up front
            repro_lightning.ReproLogger(**kwargs)
    assert not store.exists()


def test_an_unrepresentable_hparam_names_the_key_and_the_torch_format(
        store: Path, tmp_path: Path) -> None:
    class WithModule(TinyModel):
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.save_hyperparameters()

    callback = repro()
    with pytest.raises(CheckpointEncodingError) as raised:
        fit(WithModule(torch.nn.Linear(2, 2)), callbacks=[
            callback, ModelCheckpoint(dirpath=tmp_path / "ckpt")], max_epochs=1)
    message = str(raised.value)
    assert "encoder" in message and "hyper_parameters" in message
    assert 'checkpoint_format="torch"' in message
    assert not list((tmp_path / "ckpt").glob("*.ckpt"))  # nothing half-written
    assert ArtifactManager().get_run(callback.run_id)["state"] == RunState.FAILED.value

    # the way out the message names
    torch_format = repro(checkpoint_format="torch")
    fit(WithModule(torch.nn.Linear(2, 2)), callbacks=[
        torch_format, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], max_epochs=1)
    assert ArtifactManager().get_run(torch_format.run_id)["state"] == "completed"
    assert len(versions()) == 1


# -- other loggers beside it ----------------------------------------------------------------------


def _tensorboard(save_dir: Path) -> Logger:
    from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE
    from lightning.pytorch.loggers import TensorBoardLogger

    # (tensorboardX is in the test extra: coexistence with TensorBoardLogger is required)
    assert _TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE, "pip install tensorboardX"

    return TensorBoardLogger(save_dir)


def _wandb(save_dir: Path) -> Logger:
    pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(offline=True, save_dir=str(save_dir), project="lit")


def _checkpoint_layout(trainer: pl.Trainer, save_dir: Path) -> tuple[int, list[str]]:
    dirpath = Path(trainer.checkpoint_callback.dirpath)
    return len(dirpath.relative_to(save_dir).parts), sorted(p.name for p in dirpath.iterdir())


@pytest.mark.parametrize("make_logger", [_tensorboard, _wandb], ids=["tensorboard", "wandb"])
def test_other_loggers_work_beside_it_and_keep_their_checkpoint_dir(
        store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_logger: Any) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb").mkdir()
    layouts = []
    for with_repro in (False, True):
        save_dir = tmp_path / f"logs-{with_repro}"
        save_dir.mkdir()
        callback = repro() if with_repro else None
        trainer = fit(callbacks=[callback] if callback else [], logger=make_logger(save_dir),
                      max_epochs=2, log_every_n_steps=1)
        if hasattr(trainer.logger, "experiment") and hasattr(trainer.logger.experiment, "finish"):
            trainer.logger.experiment.finish()
        layouts.append(_checkpoint_layout(trainer, save_dir))
    assert layouts[0] == layouts[1] == (layouts[0][0], ["epoch=1-step=8.ckpt"])
    assert callback is not None
    assert ArtifactManager().get_run(callback.run_id)["state"] == "completed"
    metrics = ArtifactManager().get_metrics(callback.run_id)
    assert {"train_loss", "val_loss"} <= metrics.keys()
    assert len(metrics["train_loss"]) == 8
    assert [m.metadata["filename"] for m in versions()] == ["epoch=0-step=4.ckpt",
                                                            "epoch=1-step=8.ckpt"]


# -- determinism ---------------------------------------------------------------------------------


def _fit_deterministic(tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    """Fit into ``tmp_path/ckpt`` (emptied first: Lightning's own state records the path)."""
    ckpt = tmp_path / "ckpt"
    shutil.rmtree(ckpt, ignore_errors=True)
    checkpoint = ModelCheckpoint(dirpath=ckpt, save_last=True, save_top_k=0)
    fit(callbacks=[repro(), checkpoint], deterministic=True, max_epochs=2)
    meta = ArtifactManager().identify_file(ckpt / "last.ckpt", f"{PROJECT}/checkpoint")
    assert meta is not None and meta.metadata["global_step"] == 8
    config = ArtifactManager().load_artifact(f"{PROJECT}/config:latest")
    assert config["trainer"]["deterministic"] is True  # (Lightning 2.6 keeps no attribute)
    return meta, _skeleton.load(ckpt / "last.ckpt")


def _two_stores(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> tuple[tuple[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]:
    first = _fit_deterministic(tmp_path)
    other = tmp_path / "other-store"
    monkeypatch.setenv("REPRO_HOME", str(other))
    ArtifactManager.reset_instance().set_root(other)
    return first, _fit_deterministic(tmp_path)


def _tensors(node: Any, where: str = "") -> dict[str, Any]:
    if isinstance(node, torch.Tensor):
        return {where: node}
    if isinstance(node, dict):
        return {k: v for key, item in node.items() for k, v in _tensors(item, f"{where}/{key}")
                .items()}
    if isinstance(node, (list, tuple)):
        return {k: v for i, item in enumerate(node) for k, v in _tensors(item, f"{where}/{i}")
                .items()}
    return {}


def test_same_seed_deterministic_fits_save_equal_training_state(
        store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (_, first), (_, second) = _two_stores(store, tmp_path, monkeypatch)
    a, b = _tensors(first), _tensors(second)
    assert a.keys() == b.keys() and any("optimizer_states" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for part in ("state_dict", "optimizer_states", "lr_schedulers", "loops", "epoch",
                 "global_step", "hyper_parameters"):
        assert repr(first[part]) == repr(second[part]), part


def _final_model() -> Any:
    (model,) = [m for m in ArtifactManager().list_artifacts(f"{PROJECT}/model")
                if "latest" in m.aliases]
    return model


def test_same_seed_deterministic_fits_give_byte_identical_final_weights(
        store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The final weights (the ``model`` version logged after fit) of two same-seed
    ``deterministic=True`` fits have one digest — and in one store are one version, one blob.
    (Checkpoints carry their run — its id travels in them for resume — so theirs differ.)"""
    first_ckpt, first = _fit_deterministic(tmp_path)
    first_model = _final_model()
    assert first_model.type is ArtifactType.MODEL
    assert first_ckpt.key in first_model.parent_artifacts
    loaded = ArtifactManager().load_artifact(first_model.key)
    assert loaded.keys() == first["state_dict"].keys()
    assert all(torch.equal(loaded[k], first["state_dict"][k]) for k in loaded)
    _fit_deterministic(tmp_path)  # same store: same content, no new version
    models = ArtifactManager().list_artifacts(f"{PROJECT}/model")
    assert [m.key for m in models] == [first_model.key]
    other = tmp_path / "other-store"
    monkeypatch.setenv("REPRO_HOME", str(other))
    ArtifactManager.reset_instance().set_root(other)
    _fit_deterministic(tmp_path)
    assert _final_model().hash == first_model.hash
