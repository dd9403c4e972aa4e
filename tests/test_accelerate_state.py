"""``repro_lightning.save_state`` / ``load_state`` / ``state_path`` / ``save_model`` with a real
``Accelerator`` on CPU in one process: versions and lineage, exact restore, automatic naming
across a relaunch (accelerate #1601 / #3306), ``prune="mirror"``, bad input, and resuming the
run that saved a state (or, with ``resume="never"``, a new run that used it)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from accelerate_support import (  # noqa: F401 (fresh_accelerate: an autouse fixture)
    PROJECT,
    fresh_accelerate,
    make_tracker,
    reset_accelerate,
)

import repro_lightning
from repro_core import ArtifactManager, ArtifactType, RunState
from repro_core.errors import ArtifactNotFoundError
from repro_core.registry import Registry
from repro_lightning import ReproTracker


class Launch:
    """One "process": an Accelerator with a tracker, a prepared model and optimizer."""

    def __init__(self, tracker: ReproTracker | None, *, seed: int = 0,
                 config: dict[str, Any] | None = None, **project: Any) -> None:
        self.tracker = tracker
        self.accelerator = Accelerator(
            cpu=True, log_with=[tracker] if tracker is not None else None,
            project_config=ProjectConfiguration(**project) if project else None)
        if tracker is not None:
            self.accelerator.init_trackers(PROJECT, config=config or {"lr": 0.1})
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)

    def train(self, steps: int = 1) -> None:
        for _ in range(steps):
            x = torch.randn(8, 4)
            loss = (self.model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad()

    def snapshot(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        params = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return params, copy.deepcopy(self.optimizer.state_dict())

    def save(self, output_dir: Path | None = None, **kwargs: Any) -> str:
        return repro_lightning.save_state(self.accelerator, output_dir, **kwargs)

    def end(self) -> None:
        self.accelerator.end_training()


def _same_state(launch: Launch, snapshot: tuple[dict[str, torch.Tensor], dict[str, Any]]
                ) -> bool:
    params, optim = snapshot
    now = launch.model.state_dict()
    if set(now) != set(params) or not all(torch.equal(now[k], params[k]) for k in params):
        return False
    state = launch.optimizer.state_dict()["state"]
    if set(state) != set(optim["state"]):
        return False
    return all(torch.equal(state[i]["momentum_buffer"], optim["state"][i]["momentum_buffer"])
               for i in optim["state"])


def _states(project: str = PROJECT) -> list[Any]:
    return sorted(ArtifactManager().list_artifacts(f"{project}/state"),
                  key=lambda m: int(m.version[1:]))


def _registry(store: Path) -> Registry:
    return Registry(store / "registry.sqlite", readonly=True)


def _dataset(manager: ArtifactManager) -> str:
    manager.init_run("prepare", project=PROJECT)
    key = manager.log_artifact("train-data", ArtifactType.DATASET, data={"rows": [1, 2, 3]}).key
    manager.finalize_run()
    return key


# -- save_state: versions and lineage ------------------------------------------------------------


def test_each_save_state_is_a_state_version_descending_from_config_datasets_and_previous(
        store_home: Path, tmp_path: Path, manager: ArtifactManager) -> None:
    dataset = _dataset(manager)
    tracker = make_tracker(datasets={"train": dataset})
    launch = Launch(tracker, config={"lr": 0.1, "epochs": 3})
    written = []
    for step in (2, 5, 9):
        launch.train()
        written.append(launch.save(tmp_path / f"state-{step}", step=step))
    run_id = tracker.run_id
    assert tracker.last_state is not None and tracker.last_state.key == f"{PROJECT}/state:v3"
    launch.end()

    assert written == [str(tmp_path / f"state-{s}") for s in (2, 5, 9)]
    assert all((Path(d) / "model.safetensors").is_file() for d in written)
    logged = _states()
    assert [m.version for m in logged] == ["v1", "v2", "v3"]
    config_key = f"{PROJECT}/config:v1"
    assert manager.load_artifact(config_key) == {"lr": 0.1, "epochs": 3}
    previous = None
    for meta, step, iteration in zip(logged, (2, 5, 9), (1, 2, 3), strict=True):
        assert meta.type is ArtifactType.CHECKPOINT and meta.format == "directory"
        assert meta.run_id == run_id
        assert {k: meta.metadata[k] for k in ("run_id", "project", "step", "iteration",
                                              "num_processes", "distributed_type")} == {
            "run_id": run_id, "project": PROJECT, "step": step, "iteration": iteration,
            "num_processes": 1, "distributed_type": "NO"}
        expected = {config_key, dataset} | ({previous} if previous else set())
        assert set(meta.parent_artifacts) == expected
        previous = meta.key
    assert logged[-1].aliases == ["latest"]
    run = manager.get_run(run_id)
    assert run["inputs"] == [dataset]
    assert {m.key for m in logged} <= set(run["outputs"])
    ancestors = manager.get_lineage(logged[-1].key)["ancestors"]
    assert {dataset, config_key, logged[0].key, logged[1].key} <= set(ancestors)


def test_save_state_keeps_aliases_and_metadata(store_home: Path, tmp_path: Path) -> None:
    tracker = make_tracker()
    launch = Launch(tracker)
    launch.save(tmp_path / "s", step=3, aliases=["best", "epoch-1"],
                metadata={"val_loss": 0.25, "note": "first"})
    launch.end()
    (meta,) = _states()
    assert set(meta.aliases) == {"latest", "best", "epoch-1"}
    assert meta.metadata["val_loss"] == 0.25 and meta.metadata["note"] == "first"
    assert ArtifactManager().artifact_metadata(f"{PROJECT}/state:best").key == meta.key


def test_save_state_before_init_trackers_or_without_a_tracker_only_saves(
        store_home: Path, tmp_path: Path) -> None:
    plain = Launch(None)
    out = plain.save(tmp_path / "plain")
    assert (Path(out) / "model.safetensors").is_file()
    assert not store_home.exists()  # no tracker: Accelerate's save, nothing else


# -- load_state: exact restore -------------------------------------------------------------------


def test_load_state_restores_model_and_optimizer_exactly(store_home: Path,
                                                         tmp_path: Path) -> None:
    first = Launch(make_tracker())
    first.train(3)
    first.save(tmp_path / "a", step=3)
    saved = first.snapshot()
    first.train(2)
    first.save(tmp_path / "b", step=5)
    later = first.snapshot()
    # in the same process, right after the save (logged in the background): that version
    meta = repro_lightning.load_state(first.accelerator, "state:latest")
    assert meta is not None and meta.version == "v2" and meta.metadata["step"] == 5
    assert _same_state(first, later)
    first.end()
    assert not all(torch.equal(saved[0][k], later[0][k]) for k in saved[0])
    reset_accelerate()

    second = Launch(make_tracker(), seed=123)  # fresh weights, empty optimizer state
    assert not _same_state(second, saved)
    meta = repro_lightning.load_state(second.accelerator, "state:v1")
    assert meta is not None and meta.key == f"{PROJECT}/state:v1"
    assert meta.metadata["step"] == 3
    assert _same_state(second, saved)
    meta = repro_lightning.load_state(second.accelerator, f"{PROJECT}/state:latest")
    assert meta is not None and meta.version == "v2" and _same_state(second, later)
    second.end()


def test_state_path_is_a_directory_accelerate_loads(store_home: Path, tmp_path: Path) -> None:
    first = Launch(make_tracker())
    first.train(2)
    first.save(tmp_path / "a", step=1)
    saved = first.snapshot()
    first.end()
    reset_accelerate()

    path = repro_lightning.state_path(f"{PROJECT}/state:latest")
    assert os.path.isdir(path) and Path(path, "model.safetensors").is_file()
    assert Path(path).resolve() != (tmp_path / "a").resolve()  # the store's copy
    runs_before = len(_registry(store_home).list_runs())
    plain = Launch(None, seed=7)
    plain.accelerator.load_state(path)
    assert _same_state(plain, saved)
    assert len(_registry(store_home).list_runs()) == runs_before  # records nothing
    with pytest.raises(ArtifactNotFoundError):
        repro_lightning.state_path(f"{PROJECT}/state:v9")


# -- automatic checkpoint naming across a relaunch -----------------------------------------------


def test_relaunch_with_automatic_naming_continues_the_save_counter(
        store_home: Path, tmp_path: Path) -> None:
    project_dir = tmp_path / "project"
    first = Launch(make_tracker(), project_dir=str(project_dir), automatic_checkpoint_naming=True)
    first.train()
    first.save(step=1)
    first.train()
    last = first.save(step=2)
    assert Path(last) == project_dir / "checkpoints" / "checkpoint_1"
    first.end()
    reset_accelerate()

    # A new process: a new Accelerator (its counter starts at 0) loads the logged state.
    second = Launch(make_tracker(), project_dir=str(project_dir), automatic_checkpoint_naming=True)
    meta = repro_lightning.load_state(second.accelerator, "state:latest")
    assert meta is not None and meta.metadata["iteration"] == 2
    assert second.accelerator.save_iteration == 2  # past the loaded state
    second.train()
    written = second.save(step=3)  # accelerate alone: "checkpoint_0 ... already exists"
    assert Path(written) == project_dir / "checkpoints" / "checkpoint_2"
    second.end()
    assert [m.metadata["iteration"] for m in _states()] == [1, 2, 3]


def test_loaded_state_sets_the_counter_even_where_its_folders_are_gone(
        store_home: Path, tmp_path: Path) -> None:
    """The relaunch runs in a fresh directory (another machine): only the loaded version
    says where the counter stands."""
    first = Launch(make_tracker(), project_dir=str(tmp_path / "one"),
                   automatic_checkpoint_naming=True)
    for step in range(3):
        first.train()
        first.save(step=step)
    first.end()
    reset_accelerate()

    second = Launch(make_tracker(), project_dir=str(tmp_path / "two"),
                    automatic_checkpoint_naming=True)
    repro_lightning.load_state(second.accelerator, "state:latest")
    written = second.save(step=3)
    assert Path(written) == tmp_path / "two" / "checkpoints" / "checkpoint_3"
    second.end()


def test_plain_accelerate_fails_the_same_relaunch(tmp_path: Path) -> None:
    """What the two tests above guard against, in this Accelerate version: after a plain
    ``load_state(dir)`` the counter restarts at 0 and ``save_state`` refuses the folder."""
    project_dir = tmp_path / "project"
    first = Launch(None, project_dir=str(project_dir), automatic_checkpoint_naming=True)
    first.accelerator.save_state()
    first.accelerator.save_state()
    reset_accelerate()
    second = Launch(None, project_dir=str(project_dir), automatic_checkpoint_naming=True)
    second.accelerator.load_state(str(project_dir / "checkpoints" / "checkpoint_1"))
    assert second.accelerator.save_iteration == 0
    with pytest.raises(ValueError, match="already exists"):
        second.accelerator.save_state()


# -- save_model, prune ---------------------------------------------------------------------------


def test_save_model_logs_a_model_version(store_home: Path, tmp_path: Path) -> None:
    tracker = make_tracker(model_name="policy")
    launch = Launch(tracker)
    launch.train()
    launch.save(tmp_path / "s", step=1)
    meta = repro_lightning.save_model(launch.accelerator, launch.model, tmp_path / "final",
                                      aliases=["release"], metadata={"score": 0.9})
    run_id = tracker.run_id
    launch.end()
    assert meta is not None
    assert meta.key == f"{PROJECT}/policy:v1" and meta.type is ArtifactType.MODEL
    assert meta.format == "directory" and set(meta.aliases) == {"latest", "release"}
    assert meta.metadata["run_id"] == run_id and meta.metadata["score"] == 0.9
    assert set(meta.parent_artifacts) == {f"{PROJECT}/config:v1", f"{PROJECT}/state:v1"}
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert meta.key in ArtifactManager().get_run(run_id)["outputs"]


@pytest.mark.parametrize("prune", ["mirror", "keep"])
def test_prune_mirror_follows_total_limit(store_home: Path, tmp_path: Path, prune: str) -> None:
    tracker = make_tracker(prune=prune)
    launch = Launch(tracker, project_dir=str(tmp_path / "p"), automatic_checkpoint_naming=True,
                    total_limit=2)
    for step in range(4):
        launch.train()
        launch.save(step=step)
    launch.end()
    folders = sorted(p.name for p in (tmp_path / "p" / "checkpoints").iterdir())
    assert folders == ["checkpoint_2", "checkpoint_3"]
    listed = [m.version for m in _states()]
    assert listed == (["v3", "v4"] if prune == "mirror" else ["v1", "v2", "v3", "v4"])
    assert ArtifactManager().artifact_metadata(f"{PROJECT}/state:latest").version == "v4"


# -- bad input -----------------------------------------------------------------------------------


def _versions(store: Path) -> list[str]:
    """Every version but the environment's, which the run captures in a background thread
    and may land at any moment after the run opened."""
    if not store.exists():
        return []
    return sorted(m.key for m in ArtifactManager().list_artifacts()
                  if m.name != "environment")


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"step": -1}, ValueError), ({"step": 1.5}, ValueError), ({"step": True}, ValueError),
    ({"aliases": "best"}, TypeError), ({"aliases": ["bad alias!"]}, ValueError),
    ({"metadata": [1]}, TypeError), ({"metadata": {1: "x"}}, TypeError),
    ({"metadata": {"val_loss": float("nan")}}, TypeError),  # not JSON: refused up front
    ({"metadata": {"run_id": "forged"}}, ValueError),  # repro's own key
    ({"step": np.int64(-3)}, ValueError),
    ({"aliases": ["latest"]}, ValueError),  # moved by repro: refused up front, not in logging
])
def test_bad_save_arguments_fail_before_anything_is_written(
        store_home: Path, tmp_path: Path, kwargs: dict[str, Any], error: type) -> None:
    tracker = make_tracker()
    launch = Launch(tracker)
    launch.save(tmp_path / "good", step=0)
    assert tracker.last_state is not None  # (waits for it to be logged)
    before = _versions(store_home)
    with pytest.raises(error):
        launch.save(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
    if "step" not in kwargs:  # save_model checks aliases and metadata the same way
        with pytest.raises(error):
            repro_lightning.save_model(launch.accelerator, launch.model, tmp_path / "model",
                                       **kwargs)
        assert not (tmp_path / "model").exists()
    assert _versions(store_home) == before
    launch.end()


def test_load_state_of_a_missing_or_wrong_key_is_a_typed_error(
        store_home: Path, tmp_path: Path, manager: ArtifactManager) -> None:
    manager.init_run("other", project=PROJECT)
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"w" * 64)
    file_key = manager.log_artifact("weights", ArtifactType.CHECKPOINT, file_path=weights).key
    manager.finalize_run()

    tracker = make_tracker()
    launch = Launch(tracker)
    launch.save(tmp_path / "s", step=0)
    assert tracker.last_state is not None  # (waits for it to be logged)
    before_params = launch.snapshot()
    before = _versions(store_home)
    with pytest.raises(ArtifactNotFoundError):
        repro_lightning.load_state(launch.accelerator, "nope:v1")
    with pytest.raises(ArtifactNotFoundError):
        repro_lightning.load_state(launch.accelerator, "state:v7")
    with pytest.raises(ArtifactNotFoundError):  # a config is not a checkpoint
        repro_lightning.load_state(launch.accelerator, "config:v1")
    with pytest.raises(ValueError, match="not a saved Accelerate state"):
        repro_lightning.load_state(launch.accelerator, file_key)  # a file, not a directory
    with pytest.raises(ValueError, match="not a saved Accelerate state"):
        repro_lightning.state_path(file_key)
    assert _same_state(launch, before_params)  # nothing was loaded
    assert _versions(store_home) == before
    launch.end()


def test_bare_names_resolve_in_the_trackers_project(store_home: Path, tmp_path: Path) -> None:
    first = Launch(make_tracker())
    first.save(tmp_path / "s", step=0)
    first.end()
    reset_accelerate()
    other = Launch(make_tracker(project="elsewhere"))
    with pytest.raises(ArtifactNotFoundError):
        repro_lightning.load_state(other.accelerator, "state:latest")  # not acc's
    meta = repro_lightning.load_state(other.accelerator, f"{PROJECT}/state:latest")
    assert meta is not None and meta.project == PROJECT
    other.end()


# -- resuming the run that saved a state ---------------------------------------------------------


def _run_a(tmp_path: Path) -> tuple[str, Any]:
    tracker = make_tracker()
    launch = Launch(tracker, project_dir=str(tmp_path / "p"), automatic_checkpoint_naming=True)
    for step in range(3):
        launch.train()
        launch.accelerator.log({"loss": float(step)}, step=step)
    launch.save(step=2)
    run_id = tracker.run_id
    assert run_id is not None
    launch.end()
    reset_accelerate()
    return run_id, _states()[-1]


def test_load_state_before_the_first_log_continues_the_run_that_saved_it(
        store_home: Path, tmp_path: Path) -> None:
    run_a, state = _run_a(tmp_path)
    tracker = make_tracker()
    launch = Launch(tracker, project_dir=str(tmp_path / "p"), automatic_checkpoint_naming=True)
    meta = repro_lightning.load_state(launch.accelerator, "state:latest")
    assert meta is not None and meta.key == state.key
    launch.accelerator.log({"loss": 10.0}, step=meta.metadata["step"] + 1)
    assert tracker.run_id == run_a  # the run opened (at the first log) as run A
    launch.accelerator.log({"loss": 11.0})  # automatic steps continue after it
    launch.train()
    launch.save(step=4)
    launch.end()

    registry = _registry(store_home)
    assert [r.id for r in registry.list_runs()] == [run_a]
    history = [s for s, _, _ in registry.run_state_history(run_a)]
    assert history == ["running", "completed", "running", "completed"]
    points = ArtifactManager().get_metrics(run_a)["loss"]
    assert [(s, v) for s, v, _ in points] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 10.0),
                                              (4, 11.0)]
    newest = _states()[-1]
    assert newest.version == "v2" and newest.run_id == run_a
    assert state.key in newest.parent_artifacts  # descends from the state it resumed
    assert newest.metadata["iteration"] == 2


def test_resume_never_opens_a_new_run_that_used_the_state(store_home: Path,
                                                          tmp_path: Path) -> None:
    run_a, state = _run_a(tmp_path)
    tracker = make_tracker(resume="never")
    launch = Launch(tracker, project_dir=str(tmp_path / "p"), automatic_checkpoint_naming=True)
    repro_lightning.load_state(launch.accelerator, "state:latest")
    launch.accelerator.log({"loss": 5.0}, step=3)
    run_b = tracker.run_id
    launch.train()
    launch.save(step=3)
    launch.end()

    assert run_b is not None and run_b != run_a
    manager = ArtifactManager()
    assert state.key in manager.get_run(run_b)["inputs"]
    assert f"run:{run_b}" in manager.get_lineage(state.key)["descendants"]
    assert run_b in manager.get_lineage(state.key)["used_by"]
    run_a_record = manager.get_run(run_a)
    assert [s[0] for s in run_a_record["states"]] == ["running", "completed"]
    assert [s for s, _, _ in manager.get_metrics(run_a)["loss"]] == [0, 1, 2]
    assert [s for s, _, _ in manager.get_metrics(run_b)["loss"]] == [3]
    newest = _states()[-1]
    assert newest.run_id == run_b and state.key in newest.parent_artifacts


def test_load_state_after_the_run_opened_records_it_as_used(store_home: Path,
                                                           tmp_path: Path) -> None:
    run_a, state = _run_a(tmp_path)
    tracker = make_tracker()
    launch = Launch(tracker)
    launch.accelerator.log({"loss": 1.0})  # the run is open: a new one
    run_b = tracker.run_id
    repro_lightning.load_state(launch.accelerator, state.key)
    assert tracker.run_id == run_b != run_a
    launch.end()
    assert state.key in ArtifactManager().get_run(run_b)["inputs"]


# -- a crash after save_state, then a relaunch (subprocess + this process) -----------------------


@pytest.mark.slow
def test_relaunch_after_a_crash_continues_the_run_with_the_metrics_before_the_save(
        store_home: Path, tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent / "accelerate_scripts" / "single_exit.py"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                        "MASTER_PORT", "REPRO_RUN_ID") and not k.startswith("ACCELERATE_")}
    env.update(REPRO_HOME=str(store_home), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(script), "crash", str(tmp_path / "marker")],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 9, done.stdout[-3000:] + done.stderr[-3000:]
    registry = _registry(store_home)
    (crashed,) = registry.list_runs()
    assert crashed.state == RunState.CRASHED.value  # its process is gone, never finished
    registry.close()

    tracker = make_tracker(project="exits")
    relaunch = Accelerator(cpu=True, log_with=[tracker])
    relaunch.init_trackers("exits")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    relaunch.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
    meta = repro_lightning.load_state(relaunch, "state:latest")
    assert meta is not None and meta.metadata["step"] == 5 and meta.run_id == crashed.id
    relaunch.log({"loss": 6.0}, step=6)
    assert tracker.run_id == crashed.id
    relaunch.end_training()

    points = ArtifactManager().get_metrics(crashed.id)["loss"]
    steps = [s for s, _, _ in points]
    assert steps[:6] == [0, 1, 2, 3, 4, 5]  # everything logged before the save was kept
    assert steps[-1] == 6 and points[-1][1] == 6.0
    history = [s for s, _, _ in _registry(store_home).run_state_history(crashed.id)]
    assert history[0] == "running" and history[-2:] == ["running", "completed"]


def test_load_state_of_a_missing_directory_says_so(store_home: Path, tmp_path: Path) -> None:
    launch = Launch(make_tracker())
    for missing in (str(tmp_path / "nope"), "./missing_rel", "out/checkpoints/checkpoint_3"):
        with pytest.raises(ValueError, match="no directory"):
            repro_lightning.load_state(launch.accelerator, missing)
    launch.end()


def test_automatic_naming_numbers_past_an_earlier_launchs_newest_folder(
        store_home: Path, tmp_path: Path) -> None:
    """Folders 2, 4 and 5 left by earlier launches, the counter at 3: the new state is
    ``checkpoint_6`` (not 3, which total_limit would delete before the older 4 and 5)."""
    checkpoints = tmp_path / "p" / "checkpoints"
    for number in (2, 4, 5):
        (checkpoints / f"checkpoint_{number}").mkdir(parents=True)
    launch = Launch(make_tracker(), project_dir=str(tmp_path / "p"),
                    automatic_checkpoint_naming=True, iteration=3)
    location = repro_lightning.save_state(launch.accelerator, step=0)
    assert os.path.basename(location) == "checkpoint_6"
    assert launch.accelerator.save_iteration == 7
    launch.end()
