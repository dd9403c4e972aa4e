"""Resuming a Lightning run in a new process, from a repro (safetensors) checkpoint.

The module fixture runs ``tests/lightning_scripts/train.py`` four times, two at a time:

- ``repro-a`` / ``pickle-a``: 4 steps (checkpoints at steps 2 and 4), with ``ReproCallback``
  and without it (Lightning's own pickle checkpoints), same seed, ``deterministic=True``;
- ``repro-b``: a new process, ``trainer.fit(ckpt_path=checkpoint_path(<step 2 version>))`` to
  step 8, with ``pickle.Unpickler`` and ``torch.load`` made to raise during that ``fit``;
- ``pickle-b``: the same from the pickle ``step=2.ckpt``, counting unpickling (to show the
  guard sees a pickle load when there is one).

Resuming from step 2 (not the newest) makes steps 2 and 3 be logged twice. A modified
checkpoint is tested in this process: it must be refused before training starts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_scripts import launch
from lightning_scripts.common import TinyModel, trainer_kwargs

import repro_lightning
from repro_core import ArtifactManager, IntegrityError, RunState
from repro_core.registry import Registry
from repro_lightning._skeleton import is_repro_checkpoint

pytestmark = pytest.mark.slow

PROJECT = "lit"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in ``tmp_path``: a Trainer's default directories must never land in the checkout."""
    monkeypatch.chdir(tmp_path)


@dataclass
class Resumed:
    root: Path
    store: Path
    first: launch.Fit  # repro, steps 0-4
    resumed: launch.Fit  # repro, new process, from step 2 to 8
    pickle_first: launch.Fit
    pickle_resumed: launch.Fit
    resumed_from: str  # the version key resumed from

    @property
    def repro_ckpt(self) -> Path:
        return self.root / "repro-ckpt"

    @property
    def pickle_ckpt(self) -> Path:
        return self.root / "pickle-ckpt"


def _reader(store: Path) -> ArtifactManager:
    manager = ArtifactManager.reset_instance()
    manager.set_root(store)
    return manager


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Resumed]:
    root = tmp_path_factory.mktemp("resume")
    store, out = root / "store", root / "out"
    first, pickle_first = launch.run_together([
        (out, store, "repro-a", ["--ckpt-dir", str(root / "repro-ckpt"), "--max-steps", "4"]),
        (out, root / "unused-store", "pickle-a", ["--ckpt-dir", str(root / "pickle-ckpt"),
                                                  "--max-steps", "4", "--format", "none"]),
    ])
    first.check()
    pickle_first.check()
    step2 = [m for m in _reader(store).list_artifacts(f"{PROJECT}/checkpoint")
             if m.metadata["filename"] == "step=2.ckpt"]
    ArtifactManager.reset_instance()
    assert len(step2) == 1
    resumed, pickle_resumed = launch.run_together([
        (out, store, "repro-b", ["--ckpt-dir", str(root / "repro-ckpt"), "--max-steps", "8",
                                 "--resume-key", step2[0].key, "--pickle", "forbid"]),
        (out, root / "unused-store", "pickle-b", [
            "--ckpt-dir", str(root / "pickle-ckpt"), "--max-steps", "8", "--format", "none",
            "--resume", str(root / "pickle-ckpt" / "step=2.ckpt"), "--pickle", "count"]),
    ])
    yield Resumed(root, store, first, resumed.check(), pickle_first, pickle_resumed.check(),
                  step2[0].key)


@pytest.fixture
def reader(resumed: Resumed) -> Iterator[ArtifactManager]:
    yield _reader(resumed.store)
    ArtifactManager.reset_instance()


# -- the same run, continued ---------------------------------------------------------------------


def test_a_new_process_continues_the_same_run(resumed: Resumed,
                                              reader: ArtifactManager) -> None:
    run_id = resumed.first.result()["run_id"]
    assert run_id and resumed.resumed.result()["run_id"] == run_id
    assert resumed.resumed.result()["global_step"] == 8
    run = reader.get_run(run_id)
    states = [(state, reason) for state, _, reason in run["states"]]
    assert [s for s, _ in states] == ["running", "completed", "running", "completed"]
    assert "resumed" in (states[2][1] or "")
    assert run["state"] == RunState.COMPLETED.value
    registry = Registry(resumed.store / "registry.sqlite", readonly=True)
    try:
        assert [r.id for r in registry.list_runs()] == [run_id]
    finally:
        registry.close()


def test_metrics_logged_again_after_the_resume_win_and_the_old_ones_stay(
        resumed: Resumed, reader: ArtifactManager) -> None:
    run_id = resumed.first.result()["run_id"]

    def steps(points: dict[str, Any]) -> dict[int, float]:
        return {step: value for step, value, _ in points["train_loss"]}

    before = steps(reader.get_metrics(run_id, segment=0))
    after = steps(reader.get_metrics(run_id, segment=1))
    merged = reader.get_metrics(run_id)["train_loss"]
    assert sorted(before) == [0, 1, 2, 3]
    assert sorted(after) == [2, 3, 4, 5, 6, 7]  # (resumed from the step-2 checkpoint)
    assert [s for s, _, _ in merged] == list(range(8))
    assert {s: v for s, v, _ in merged} == {**before, **after}


def test_checkpoints_after_the_resume_descend_from_the_one_resumed_from(
        resumed: Resumed, reader: ArtifactManager) -> None:
    run_id = resumed.first.result()["run_id"]
    logged = sorted(reader.list_artifacts(f"{PROJECT}/checkpoint"),
                    key=lambda m: int(m.version[1:]))
    assert {m.run_id for m in logged} == {run_id}
    assert [m.metadata["global_step"] for m in logged] == [2, 2, 4, 4, 4, 4, 6, 6, 8, 8]
    first_after = logged[4]  # (the first run saved 4: step=2, last, step=4, last)
    assert resumed.resumed_from in first_after.parent_artifacts
    assert resumed.resumed_from in reader.get_lineage(logged[-1].key)["ancestors"]


# -- loaded without pickle, to the same state as Lightning's own resume --------------------------


def test_resuming_never_unpickles(resumed: Resumed) -> None:
    result = resumed.resumed.result()
    assert result["pickle_calls"] == []
    assert is_repro_checkpoint(result["ckpt_path"])
    # the guard does see a pickle load where there is one
    assert "torch.load" in resumed.pickle_resumed.result()["pickle_calls"]


def test_the_resumed_state_equals_lightnings_pickle_resume(resumed: Resumed) -> None:
    ours, theirs = resumed.resumed, resumed.pickle_resumed
    opt, ref = ours.tensors("optimizer"), theirs.tensors("optimizer")
    assert opt["param_groups"] == ref["param_groups"]
    assert opt["state"].keys() == ref["state"].keys() and opt["state"]
    for index, state in opt["state"].items():
        assert state.keys() == ref["state"][index].keys()
        for name, value in state.items():
            assert torch.equal(value, ref["state"][index][name]), (index, name)
    assert int(opt["state"][0]["step"]) == 2  # restored at step 2, not started afresh
    weights, ref_weights = ours.tensors("weights"), theirs.tensors("weights")
    assert weights.keys() == ref_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], ref_weights[name]), name
    # ... and not by accident: the resumed run moved on from step 2
    assert not torch.equal(weights["layer.weight"], resumed.first.tensors("weights")[
        "layer.weight"])
    assert sorted(os.listdir(resumed.repro_ckpt)) == sorted(os.listdir(resumed.pickle_ckpt))


# -- a modified file -----------------------------------------------------------------------------


class Started(pl.Callback):
    def __init__(self) -> None:
        self.started = False

    def on_train_start(self, *args: Any) -> None:
        self.started = True


def _fit(callbacks: list[Any], max_steps: int, ckpt_path: Path | None = None) -> pl.Trainer:
    pl.seed_everything(1234)
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(
        max_steps=max_steps, max_epochs=-1, limit_train_batches=3, limit_val_batches=0))
    trainer.fit(TinyModel(), ckpt_path=ckpt_path)
    return trainer


def _flip_a_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header] ^= 0x01  # the first byte of the first tensor's data
    path.write_bytes(bytes(data))


def test_a_modified_checkpoint_is_refused_before_training(
        manager: ArtifactManager, store_root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPRO_HOME", str(store_root))
    first = repro_lightning.ReproCallback(project=PROJECT, monitor_hardware=False)
    _fit([first, ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2,
                                 save_top_k=-1)], max_steps=4)
    key = ArtifactManager().identify_file(tmp_path / "ckpt" / "epoch=0-step=2.ckpt",
                                          f"{PROJECT}/checkpoint").key
    blob = ArtifactManager().use_artifact(key).path
    assert blob is not None
    copy = tmp_path / "copy.ckpt"
    shutil.copyfile(blob, copy)  # a writable file holding the logged bytes
    modified = tmp_path / "modified.ckpt"
    shutil.copyfile(blob, modified)
    _flip_a_tensor_byte(modified)
    versions_before = len(ArtifactManager().list_artifacts(f"{PROJECT}/checkpoint"))

    started = Started()
    second = repro_lightning.ReproCallback(project=PROJECT, monitor_hardware=False)
    with pytest.raises(IntegrityError, match="modified"):
        _fit([second, started], max_steps=8, ckpt_path=modified)
    assert not started.started
    run = ArtifactManager().get_run(first.run_id)
    assert [s for s, _, _ in run["states"]] == ["running", "completed"]  # not resumed
    assert len(ArtifactManager().list_artifacts(f"{PROJECT}/checkpoint")) == versions_before

    # the unmodified copy resumes the same run
    third = repro_lightning.ReproCallback(project=PROJECT, monitor_hardware=False)
    trainer = _fit([third, started], max_steps=8, ckpt_path=copy)
    assert started.started and trainer.global_step == 8
    assert third.run_id == first.run_id
