"""How a Lightning run ends when it does not finish: an exception in the user's code (FAILED,
traceback kept, the exception unchanged), Ctrl-C (INTERRUPTED; Lightning then exits 1) and
SIGTERM sent to a training process (INTERRUPTED, in a subprocess: Lightning's own SIGTERM
handler raises at the next step)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_scripts import launch
from lightning_scripts.common import TinyModel, trainer_kwargs

import repro_lightning
from repro_core import ArtifactManager, RunState
from repro_core.registry import Registry

PROJECT = "lit"


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in ``tmp_path``: a Trainer's default directories must never land in the checkout."""
    monkeypatch.chdir(tmp_path)


class Boom(Exception):
    """The user's own exception type (Lightning must not wrap it, nor repro replace it)."""


class Failing(TinyModel):
    error: BaseException = RuntimeError("set me")  # (an attribute, not an hparam)

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.global_step == 2:
            raise self.error
        return super().training_step(batch, batch_idx)


@pytest.fixture
def store(manager: ArtifactManager, store_root: Path, monkeypatch: pytest.MonkeyPatch
          ) -> Iterator[Path]:
    monkeypatch.setenv("REPRO_HOME", str(store_root))
    yield store_root


def _failing(error: BaseException) -> Failing:
    model = Failing()
    model.error = error
    return model


def _fit(model: pl.LightningModule, tmp_path: Path, callback: Any) -> None:
    pl.seed_everything(0)
    trainer = pl.Trainer(callbacks=[callback, ModelCheckpoint(
        dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)], **trainer_kwargs(
        max_steps=5, limit_train_batches=5, limit_val_batches=0))
    trainer.fit(model)


def _repro() -> repro_lightning.ReproCallback:
    return repro_lightning.ReproCallback(project=PROJECT, monitor_hardware=False)


def test_an_exception_fails_the_run_keeps_the_traceback_and_propagates_unchanged(
        store: Path, tmp_path: Path) -> None:
    error = Boom("the data loader ran dry")
    callback = _repro()
    with pytest.raises(Boom) as raised:
        _fit(_failing(error), tmp_path, callback)
    assert raised.value is error
    run_id = callback.run_id
    manager = ArtifactManager()
    run = manager.get_run(run_id)
    assert run["state"] == RunState.FAILED.value
    assert "Boom: the data loader ran dry" in run["states"][-1][2]
    trace = manager.load_artifact(f"{PROJECT}/error_trace:latest")
    assert "Traceback (most recent call last)" in trace
    assert "in training_step" in trace and "Boom: the data loader ran dry" in trace
    assert f"{PROJECT}/error_trace:v1" in run["outputs"]
    # what was saved before the failure stays
    logged = manager.list_artifacts(f"{PROJECT}/checkpoint")
    assert sorted(m.metadata["global_step"] for m in logged) == [1, 2]
    assert manager.current_run is None  # the run was let go: a next one can start


def test_ctrl_c_interrupts_the_run(store: Path, tmp_path: Path) -> None:
    sigint = signal.getsignal(signal.SIGINT)
    callback = _repro()
    try:
        with pytest.raises(SystemExit) as raised:  # Lightning's graceful shutdown: exit(1)
            _fit(_failing(KeyboardInterrupt()), tmp_path, callback)
    finally:
        signal.signal(signal.SIGINT, sigint)  # (Lightning ignores SIGINT from then on)
    assert raised.value.code == 1
    run = ArtifactManager().get_run(callback.run_id)
    assert run["state"] == RunState.INTERRUPTED.value
    assert ArtifactManager().list_artifacts(f"{PROJECT}/error_trace") == []


@pytest.mark.slow
def test_sigterm_mid_fit_interrupts_the_run(tmp_path: Path) -> None:
    out, store, marker = tmp_path / "out", tmp_path / "store", tmp_path / "training"
    proc = launch.start(out, store, "sigterm", "--ckpt-dir", str(tmp_path / "ckpt"),
                        "--max-steps", "100000", "--every", "1", "--step-sleep", "0.05",
                        "--marker", str(marker))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0][-6000:]
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.1)
        time.sleep(0.5)  # a few steps (and checkpoints) in
        os.kill(proc.pid, signal.SIGTERM)
        fit = launch.finish(proc, out, "sigterm", timeout=60)
    finally:
        if proc.poll() is None:
            launch.kill_group(proc)
            proc.communicate()
    # (Lightning raises SIGTERMException, a SystemExit without a code: the exit status is 0)
    assert "Received SIGTERM" in fit.log
    assert not (out / "sigterm.rank0.json").exists(), "fit returned normally"
    registry = Registry(store / "registry.sqlite", readonly=True)
    try:
        runs = registry.list_runs()
        assert len(runs) == 1
        assert runs[0].state == RunState.INTERRUPTED.value, fit.log[-6000:]
        history = registry.run_state_history(runs[0].id)
    finally:
        registry.close()
    assert [state for state, _, _ in history] == ["running", "interrupted"]
    assert "SIGTERM" in (history[-1][2] or "")
