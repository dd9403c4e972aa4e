"""``ReproTracker`` with a real ``Accelerator`` on CPU, in one process (no launcher): the
contract Accelerate's own tracker tests expect, a second tracker beside it, TTRL rows, the
``accelerate`` section of the environment artifact, and how a program that never calls
``end_training`` ends its run (subprocesses: an exception, ``sys.exit(0)``, SIGTERM)."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate_support import (  # noqa: F401 (fresh_accelerate: an autouse fixture)
    PROJECT,
    fresh_accelerate,
    make_tracker,
    reset_accelerate,
)
from click.testing import CliRunner

import repro_lightning
from repro_core import ArtifactManager, ArtifactType, RunState
from repro_core.cli import main as repro_cli
from repro_core.context import ExperimentContext
from repro_core.errors import ArtifactNotFoundError, RunStateError
from repro_core.registry import Registry
from repro_core.ttrl import TTRLContext
from repro_lightning import ReproTracker

SCRIPTS = Path(__file__).resolve().parent / "accelerate_scripts"


def _accelerator(tracker: ReproTracker | None = None, **kwargs: Any) -> Accelerator:
    return Accelerator(cpu=True, log_with=[tracker if tracker is not None else make_tracker()],
                       **kwargs)


def _registry(store: Path) -> Registry:
    return Registry(store / "registry.sqlite", readonly=True)


def _store_files(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("*")) if store.exists() else []


# -- the GeneralTracker contract -----------------------------------------------------------------


def test_tracker_attributes_match_accelerates_contract() -> None:
    tracker = make_tracker()
    assert tracker.name == "repro"
    assert tracker.requires_logging_directory is False
    assert tracker.main_process_only is True
    assert tracker.tracker is None and tracker.run is None and tracker.run_id is None
    assert tracker.project == PROJECT


def test_nothing_is_written_before_init_trackers_and_the_run_opens_at_first_use(
        store_home: Path, tmp_path: Path) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    tracker = make_tracker()
    accelerator = _accelerator(tracker)
    assert not store_home.exists()  # ReproTracker() + Accelerator(): no store, no run
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with pytest.raises(RunStateError, match="init_trackers"):
        tracker.log({"loss": 1.0})  # before init_trackers: told what to call, nothing written
    assert not store_home.exists()

    accelerator.init_trackers(PROJECT, config={"lr": 0.1})
    assert not store_home.exists()  # lazily: the run opens at first use, not in start()
    assert tracker.run_id is None

    context = tracker.tracker  # first use
    assert isinstance(context, TTRLContext)  # default ttrl_keys
    assert tracker.run_id is not None and context.run is not None
    assert context.run.id == tracker.run_id
    registry = _registry(store_home)
    assert [r.id for r in registry.list_runs()] == [tracker.run_id]
    assert registry.get_run(tracker.run_id).state == RunState.RUNNING.value
    accelerator.end_training()


def test_store_init_configuration_copies_the_config(store_home: Path) -> None:
    config = {"lr": 0.1, "batch_size": 8, "optim": {"name": "sgd", "momentum": 0.9}}
    given = copy.deepcopy(config)
    tracker = make_tracker()
    accelerator = _accelerator(tracker)
    accelerator.init_trackers(PROJECT, config=config)
    assert config == given  # the caller's dict untouched
    config["lr"] = 99.0  # the caller changes its dict before the (lazily opened) run starts
    config["extra"] = True
    accelerator.log({"loss": 1.0})
    accelerator.end_training()
    manager = ArtifactManager()
    stored = manager.load_artifact(f"{PROJECT}/config:v1")
    assert stored == given  # what init_trackers was given, not what the dict became
    assert manager.get_run(tracker.run_id)["config"]["lr"] == 0.1
    assert f"{PROJECT}/config:v1" in manager.get_run(tracker.run_id)["outputs"]


def test_config_is_snapshotted_deeply_at_init_trackers(store_home: Path) -> None:
    """The run opens lazily, after init_trackers returned: a nested value the caller changes
    in between must not reach the stored config (Accelerate's other trackers record the
    config inside init_trackers)."""
    config = {"optim": {"name": "sgd", "momentum": 0.9}}
    tracker = make_tracker()
    accelerator = _accelerator(tracker)
    accelerator.init_trackers(PROJECT, config=config)
    config["optim"]["momentum"] = 0.0
    # (the run opens at the first log: the config must have been captured before, deeply)
    accelerator.log({"loss": 1.0})
    accelerator.end_training()
    stored = ArtifactManager().load_artifact(f"{PROJECT}/config:v1")
    assert stored == {"optim": {"name": "sgd", "momentum": 0.9}}


def test_log_counts_steps_without_step_and_continues_after_an_explicit_one(
        store_home: Path) -> None:
    tracker = make_tracker()
    accelerator = _accelerator(tracker)
    accelerator.init_trackers(PROJECT)
    accelerator.log({"a": 1.0})
    accelerator.log({"a": 2.0})
    accelerator.log({"a": 3.0})
    accelerator.log({"a": 4.0}, step=10)
    accelerator.log({"a": 5.0})
    # another tracker's options are passed through log_kwargs and ignored by this one
    accelerator.log({"a": 6.0}, log_kwargs={"repro": {"commit": True, "anything": 1}})
    tracker.log({"a": 7.0}, step=None, commit=False)
    with pytest.raises(ValueError, match="non-negative"):
        tracker.log({"a": 0.0}, step=-1)
    with pytest.raises(ValueError, match="non-negative"):
        tracker.log({"a": 0.0}, step=True)  # type: ignore[arg-type]
    accelerator.end_training()
    points = ArtifactManager().get_metrics(tracker.run_id)["a"]
    assert [(step, value) for step, value, _ in points] == [
        (0, 1.0), (1, 2.0), (2, 3.0), (10, 4.0), (11, 5.0), (12, 6.0), (13, 7.0)]


def test_numbers_are_logged_and_strings_skipped_with_one_warning(store_home: Path) -> None:
    tracker = make_tracker()
    accelerator = _accelerator(tracker)
    accelerator.init_trackers(PROJECT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            accelerator.log({"int": step, "float": 0.5 * step, "tensor": torch.tensor(step + 1.0),
                             "np": np.float32(step + 0.25), "np_int": np.int64(step),
                             "flag": step % 2 == 1, "text": f"epoch {step}",
                             "vector": torch.ones(3)}, step=step)
    accelerator.end_training()
    skipped = [str(w.message) for w in caught if "repro records numbers only" in str(w.message)]
    assert len([m for m in skipped if "'text'" in m]) == 1  # once per name, not per call
    assert len([m for m in skipped if "'vector'" in m]) == 1
    assert len(skipped) == 2
    metrics = ArtifactManager().get_metrics(tracker.run_id)
    assert set(metrics) == {"int", "float", "tensor", "np", "np_int", "flag"}

    def values(key: str) -> list[float]:
        return [value for _, value, _ in metrics[key]]

    assert values("int") == [0.0, 1.0, 2.0]
    assert values("tensor") == [1.0, 2.0, 3.0]
    assert values("np") == [0.25, 1.25, 2.25]
    assert values("np_int") == [0.0, 1.0, 2.0]
    assert values("flag") == [0.0, 1.0, 0.0]
    assert [step for step, _, _ in metrics["float"]] == [0, 1, 2]


def test_get_tracker_returns_the_tracker_and_unwrap_the_runs_context(store_home: Path) -> None:
    tracker = make_tracker()
    accelerator = _accelerator(tracker)
    accelerator.init_trackers(PROJECT)
    assert accelerator.get_tracker("repro") is tracker
    context = accelerator.get_tracker("repro", unwrap=True)
    assert isinstance(context, ExperimentContext)
    assert context is tracker.tracker
    assert context.run.id == tracker.run_id == tracker.run.id
    assert ArtifactManager().get_run(context.run.id)["project"] == PROJECT
    accelerator.end_training()


def test_end_training_completes_the_run_with_its_metrics_and_config(store_home: Path) -> None:
    sigterm = signal.getsignal(signal.SIGTERM)
    config = {"lr": 0.05, "epochs": 2, "model": "mlp"}
    tracker = make_tracker(name="my-run", tags=["smoke"])
    accelerator = _accelerator(tracker)
    accelerator.init_trackers(PROJECT, config=config)
    for step in range(4):
        accelerator.log({"train/loss": 1.0 / (step + 1)}, step=step)
    run_id = tracker.run_id
    assert signal.getsignal(signal.SIGTERM) is not sigterm  # the run handles SIGTERM ...
    accelerator.end_training()
    assert signal.getsignal(signal.SIGTERM) is sigterm  # ... until it ends
    assert tracker.tracker is None  # finished
    with pytest.raises(RunStateError, match="finished"):
        tracker.log({"train/loss": 0.0})
    manager = ArtifactManager()
    run = manager.get_run(run_id)
    assert run["state"] == RunState.COMPLETED.value
    assert run["name"] == "my-run" and run["tags"] == ["smoke"] and run["project"] == PROJECT
    assert [s[0] for s in run["states"]] == ["running", "completed"]
    assert manager.load_artifact(f"{PROJECT}/config:latest") == config
    points = manager.get_metrics(run_id)["train/loss"]
    assert [(s, v) for s, v, _ in points] == [(0, 1.0), (1, 0.5), (2, 1 / 3), (3, 0.25)]
    registry = _registry(store_home)
    assert registry.next_metric_step(run_id) == 4
    assert registry.get_run(run_id).state == RunState.COMPLETED.value


def test_init_trackers_again_after_the_run_opened_logs_a_new_config_version(
        store_home: Path) -> None:
    tracker = make_tracker()
    accelerator = _accelerator(tracker)
    accelerator.init_trackers(PROJECT, config={"lr": 0.1})
    accelerator.log({"loss": 1.0})
    tracker.store_init_configuration({"lr": 0.2})
    accelerator.end_training()
    manager = ArtifactManager()
    assert manager.load_artifact(f"{PROJECT}/config:v1") == {"lr": 0.1}
    assert manager.load_artifact(f"{PROJECT}/config:v2") == {"lr": 0.2}


def test_invalid_arguments_are_rejected_before_anything_is_written(store_home: Path) -> None:
    with pytest.raises(ValueError, match="resume"):
        ReproTracker(project=PROJECT, resume="sometimes")
    with pytest.raises(ValueError, match="prune"):
        ReproTracker(project=PROJECT, prune="all")
    with pytest.raises(ValueError, match="three distinct"):
        ReproTracker(project=PROJECT, ttrl_keys=("r", "r", "kl"))
    with pytest.raises(ValueError):
        ReproTracker(project="bad project/name")
    with pytest.raises(TypeError):
        ReproTracker(project=PROJECT, datasets=["mnist:v1"])  # type: ignore[arg-type]
    # (these once passed construction and failed at the first log, mid-training)
    with pytest.raises(ValueError, match="name"):
        ReproTracker(project=PROJECT, name=123)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="level"):
        ReproTracker(project=PROJECT, capture_level=99)
    with pytest.raises(TypeError, match="monitor_hardware"):
        ReproTracker(project=PROJECT, monitor_hardware="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="state_name"):
        ReproTracker(project=PROJECT, state_name="a:b")
    assert not store_home.exists()


def test_a_launch_accelerate_does_not_distribute_is_warned(
        store_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun set WORLD_SIZE=2 but Accelerate runs the process alone (a CPU-only machine
    without ``cpu=True``): every process would act as the main one, so it is said."""
    accelerator = Accelerator(cpu=True, log_with=[make_tracker()])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(RuntimeWarning, match="WORLD_SIZE=2.*cpu=True"):
        accelerator.init_trackers(PROJECT)
    accelerator.end_training()


# -- beside another tracker ----------------------------------------------------------------------


def test_next_to_tensorboard_both_trackers_record(store_home: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboardX")
    tracker = make_tracker()
    logs = tmp_path / "logs"
    accelerator = Accelerator(cpu=True, log_with=["tensorboard", tracker], project_dir=logs)
    accelerator.init_trackers("tb_run", config={"lr": 0.1, "batch_size": 4})
    for step in range(3):
        accelerator.log({"loss": 1.0 - 0.1 * step}, step=step)
    board = accelerator.get_tracker("tensorboard")
    assert board.name == "tensorboard" and accelerator.get_tracker("repro") is tracker
    run_id = tracker.run_id
    accelerator.end_training()
    events = list((logs / "tb_run").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    points = ArtifactManager().get_metrics(run_id)["loss"]
    assert [(s, round(v, 6)) for s, v, _ in points] == [(0, 1.0), (1, 0.9), (2, 0.8)]
    assert ArtifactManager().get_run(run_id)["state"] == RunState.COMPLETED.value
    # repro needs no logging directory and wrote nothing into it
    assert not any("repro" in p.name or p.name == "registry.sqlite" for p in logs.rglob("*"))


# -- TTRL ----------------------------------------------------------------------------------------


def _updates(store: Path, run_id: str, *args: str) -> list[dict[str, Any]]:
    result = CliRunner().invoke(repro_cli, ["updates", run_id, "--root", str(store), "--json",
                                            *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def _tiny(accelerator: Accelerator) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return accelerator.prepare(model, optimizer)  # type: ignore[no-any-return]


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                accelerator: Accelerator) -> None:
    """One real optimizer step: the next saved state differs from the last."""
    loss = model(torch.randn(8, 4)).pow(2).mean()
    accelerator.backward(loss)
    optimizer.step()
    optimizer.zero_grad()


def test_reward_logs_become_online_updates_linked_to_the_latest_state(
        store_home: Path, tmp_path: Path) -> None:
    tracker = make_tracker()
    accelerator = _accelerator(tracker)
    accelerator.init_trackers(PROJECT)
    model, optimizer = _tiny(accelerator)
    accelerator.log({"reward": 0.1, "confidence": 0.5, "kl_divergence": 0.01}, step=0)
    accelerator.log({"reward": 0.2, "confidence": 0.6}, step=1)  # no KL this time
    accelerator.log({"loss": 3.0}, step=2)  # no reward: a metric, not an update
    repro_lightning.save_state(accelerator, tmp_path / "state1", step=2)
    accelerator.log({"reward": 0.3, "confidence": 0.7, "kl_divergence": 0.03}, step=3)
    _train_step(model, optimizer, accelerator)
    repro_lightning.save_state(accelerator, tmp_path / "state2", step=3)
    accelerator.log({"reward": 0.4, "confidence": 0.8, "kl_divergence": 0.04}, step=4)
    run_id = tracker.run_id
    assert run_id is not None
    assert tracker.last_state is not None and tracker.last_state.version == "v2"
    accelerator.end_training()

    rows = _updates(store_home, run_id)
    assert [r["experience_id"] for r in rows] == ["step-0", "step-1", "step-3", "step-4"]
    assert [r["reward"] for r in rows] == [0.1, 0.2, 0.3, 0.4]
    assert [r["confidence"] for r in rows] == [0.5, 0.6, 0.7, 0.8]
    assert [r["kl_divergence"] for r in rows] == [0.01, None, 0.03, 0.04]
    assert [r["model_version"] for r in rows] == [
        None, None, f"{PROJECT}/state:v1", f"{PROJECT}/state:v2"]
    producing = _updates(store_home, run_id, "--checkpoint", f"{PROJECT}/state:v2")
    assert [r["experience_id"] for r in producing] == ["step-3"]
    metrics = ArtifactManager().get_metrics(run_id)
    assert [v for _, v, _ in metrics["reward"]] == [0.1, 0.2, 0.3, 0.4]
    assert {"online/reward", "online/confidence", "online/kl_divergence"} <= metrics.keys()


def test_custom_ttrl_keys_and_none(store_home: Path) -> None:
    tracker = make_tracker(ttrl_keys=("score", "certainty", "drift"))
    accelerator = _accelerator(tracker)
    accelerator.init_trackers(PROJECT)
    accelerator.log({"score": 1.5, "certainty": 0.9, "drift": 0.2, "reward": 7.0})
    custom = tracker.run_id
    accelerator.end_training()
    AcceleratorState._reset_state(True)
    GradientState._reset_state()

    tracker = make_tracker(ttrl_keys=None)
    accelerator = _accelerator(tracker)
    accelerator.init_trackers(PROJECT)
    accelerator.log({"reward": 0.5, "confidence": 0.5, "kl_divergence": 0.1})
    assert type(tracker.tracker) is ExperimentContext  # a plain run
    with pytest.raises(RuntimeError, match="ttrl_keys"):
        tracker.log_experience("e0", {"prompt": 1}, {"answer": 2})
    plain = tracker.run_id
    assert plain is not None and custom is not None
    accelerator.end_training()

    (row,) = _updates(store_home, custom)
    assert (row["reward"], row["confidence"], row["kl_divergence"]) == (1.5, 0.9, 0.2)
    assert _updates(store_home, plain) == []  # metrics only
    assert [v for _, v, _ in ArtifactManager().get_metrics(plain)["reward"]] == [0.5]
    assert "online/reward" not in ArtifactManager().get_metrics(plain)


def test_log_experience_stores_experiences(store_home: Path) -> None:
    tracker = make_tracker()
    accelerator = _accelerator(tracker)
    with pytest.raises(RuntimeError, match="init_trackers"):
        tracker.log_experience("e0", 1, 2)  # not started
    accelerator.init_trackers(PROJECT)
    for i in range(3):
        record = tracker.log_experience(f"exp-{i}", {"prompt": f"q{i}"}, {"answer": i * 2},
                                        {"step": i})
        assert record is not None and record["experience_id"] == f"exp-{i}"
    run_id = tracker.run_id
    assert run_id is not None
    accelerator.end_training()
    stored = _registry(store_home).experiences(run_id)
    assert [e["experience_id"] for e in stored] == ["exp-0", "exp-1", "exp-2"]
    assert stored[2]["input"] == {"prompt": "q2"} and stored[2]["output"] == {"answer": 4}
    assert stored[2]["metadata"] == {"step": 2}
    counts = ArtifactManager().get_metrics(run_id)["online/experience_count"]
    assert [v for _, v, _ in counts][-1] == 3.0


# -- the environment artifact --------------------------------------------------------------------


def _environment(run_id: str) -> dict[str, Any]:
    manager = ArtifactManager()
    (key,) = [k for k in manager.get_run(run_id)["outputs"] if "/environment:" in k]
    env = manager.load_artifact(key)
    assert isinstance(env, dict)
    return env


def test_environment_has_an_accelerate_section(store_home: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_FAKE_SETTING", "kept-value")
    tracker = make_tracker()
    accelerator = _accelerator(tracker, gradient_accumulation_steps=4, mixed_precision="bf16")
    accelerator.init_trackers(PROJECT)
    accelerator.log({"loss": 1.0})
    run_id = tracker.run_id
    assert run_id is not None
    accelerator.end_training()
    section = _environment(run_id)["accelerate"]
    assert section["initialized"] is True
    assert section["distributed_type"] == "NO"
    assert section["world_size"] == 1 and section["num_machines"] == 1
    assert section["process_index"] == 0
    assert section["mixed_precision"] == "bf16"
    assert section["gradient_accumulation_steps"] == 4
    assert section["devices"] == [{"process_index": 0, "machine": 0, "device": "cpu"}]
    import accelerate

    assert section["version"] == accelerate.__version__
    assert section["env"]["ACCELERATE_FAKE_SETTING"] == "kept-value"


def test_secret_named_accelerate_variables_are_redacted(
        store_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_FAKE_TOKEN", "secret123")
    tracker = make_tracker()
    accelerator = _accelerator(tracker)
    accelerator.init_trackers(PROJECT)
    accelerator.log({"loss": 1.0})
    run_id = tracker.run_id
    assert run_id is not None
    accelerator.end_training()
    env = _environment(run_id)
    # (judged by the variable's name, as the env_vars of a COMPLETE capture)
    assert env["accelerate"]["env"].get("ACCELERATE_FAKE_TOKEN") not in (None, "secret123")
    assert "secret123" not in json.dumps(env)  # nowhere in the artifact
    blobs = [p for p in (store_home).rglob("*") if p.is_file()]
    assert not any(b"secret123" in p.read_bytes() for p in blobs)


# -- a program that never calls end_training (subprocesses) --------------------------------------


def _script_env(store: Path, **extra: str) -> dict[str, str]:
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "SLURM_PROCID", "REPRO_RUN_ID")
    env = {k: v for k, v in os.environ.items()
           if k not in drop and not k.startswith(("ACCELERATE_", "WANDB_"))}
    env.update(REPRO_HOME=str(store), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _start(tmp_path: Path, mode: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / "single_exit.py"), mode, str(tmp_path / "marker")],
        env=_script_env(tmp_path / "store"), cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> str:
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"still running after {timeout}s:\n{proc.communicate()[0]}")\
            from None


def _only_run(store: Path) -> tuple[Any, list[tuple[str, str, str | None]]]:
    registry = _registry(store)
    try:
        (run,) = registry.list_runs()
        return run, registry.run_state_history(run.id)
    finally:
        registry.close()


@pytest.mark.slow
def test_uncaught_exception_without_end_training_fails_the_run(
        tmp_path: Path, manager: ArtifactManager) -> None:
    proc = _start(tmp_path, "raise")
    log = _finish(proc)
    assert proc.returncode == 1, log
    assert "ZeroDivisionError: the loss went to pieces" in log  # the user's traceback shown
    run, history = _only_run(tmp_path / "store")
    assert run.state == RunState.FAILED.value, log[-4000:]
    assert [s for s, _, _ in history] == ["running", "failed"]
    manager.set_root(tmp_path / "store")
    assert [v for _, v, _ in manager.get_metrics(run.id)["loss"]] == [1.0, 2.0, 3.0]
    (trace_key,) = [k for k in manager.get_run(run.id)["outputs"] if "/error_trace:" in k]
    trace = manager.load_artifact(trace_key)
    assert "the loss went to pieces" in trace and "ZeroDivisionError" in trace


@pytest.mark.slow
def test_ctrl_c_without_end_training_interrupts_the_run(
        tmp_path: Path, manager: ArtifactManager) -> None:
    proc = _start(tmp_path, "interrupt")
    log = _finish(proc)
    assert proc.returncode != 0, log
    run, history = _only_run(tmp_path / "store")
    assert run.state == RunState.INTERRUPTED.value, log[-4000:]
    assert [s for s, _, _ in history] == ["running", "interrupted"]
    assert "KeyboardInterrupt" in str(history[-1][2]), history  # not SIGTERM's reason


@pytest.mark.slow
def test_sys_exit_0_without_end_training_completes_the_run(
        tmp_path: Path, manager: ArtifactManager) -> None:
    proc = _start(tmp_path, "exit0")
    log = _finish(proc)
    assert proc.returncode == 0, log
    run, history = _only_run(tmp_path / "store")
    assert run.state == RunState.COMPLETED.value, log[-4000:]
    assert [s for s, _, _ in history] == ["running", "completed"]
    manager.set_root(tmp_path / "store")
    assert [v for _, v, _ in manager.get_metrics(run.id)["loss"]] == [1.0, 2.0, 3.0]
    assert not [k for k in manager.get_run(run.id)["outputs"] if "/error_trace:" in k]


@pytest.mark.slow
def test_sigterm_without_end_training_interrupts_the_run_promptly(
        tmp_path: Path, manager: ArtifactManager) -> None:
    marker = tmp_path / "marker"
    proc = _start(tmp_path, "loop")
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the loop never started"
            time.sleep(0.05)
        time.sleep(0.3)  # a few steps in
        sent = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        log = _finish(proc, timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert took < 20, f"exited {took:.1f}s after SIGTERM"
    assert "loop finished" not in log  # it was stopped, it did not run out of steps
    run, history = _only_run(tmp_path / "store")
    assert run.state == RunState.INTERRUPTED.value, log[-4000:]
    assert [s for s, _, _ in history] == ["running", "interrupted"]
    manager.set_root(tmp_path / "store")
    assert len(manager.get_metrics(run.id)["loss"]) >= 4
    assert not [k for k in manager.get_run(run.id)["outputs"] if "/error_trace:" in k]
    # the states saved before SIGTERM are logged whole (one still being logged is joined)
    states = manager.list_artifacts("exits/state")
    assert states, log[-4000:]
    for meta in states:
        assert meta.run_id == run.id and meta.format == "directory"
        verified = manager.artifact_metadata(meta.key, verify=True)
        assert verified.path is not None and (verified.path / "model.safetensors").is_file()


def test_artifact_types_logged_by_a_plain_run(store_home: Path) -> None:
    """The run's outputs are a config and an environment artifact and nothing else."""
    tracker = make_tracker()
    accelerator = _accelerator(tracker)
    accelerator.init_trackers(PROJECT, config={"a": 1})
    accelerator.log({"loss": 1.0})
    run_id = tracker.run_id
    accelerator.end_training()
    outputs = ArtifactManager().get_run(run_id)["outputs"]
    assert sorted(k.split(":")[0] for k in outputs) == [f"{PROJECT}/config",
                                                        f"{PROJECT}/environment"]
    types = {m.name: m.type for m in ArtifactManager().list_artifacts()}
    assert types == {"config": ArtifactType.CONFIG, "environment": ArtifactType.ENVIRONMENT}


def test_devices_follow_accelerates_placement_on_accelerators() -> None:
    """Process ``i`` of a launch with ``local`` processes per machine uses local device
    ``i % local`` (``cuda:<local rank>``); CPU processes all use "cpu"."""
    from repro_lightning._accelerate_launch import _devices

    devices = _devices(torch.device("cuda", 0), world=4, local=2)
    assert [(d["machine"], d["device"]) for d in devices] == [
        (0, "cuda:0"), (0, "cuda:1"), (1, "cuda:0"), (1, "cuda:1")]
    assert [d["device"] for d in _devices(torch.device("cpu", 0), world=2, local=2)] == \
        ["cpu", "cpu"]


def test_log_takes_numpy_integer_steps(store_home: Path) -> None:
    accelerator = Accelerator(cpu=True, log_with=[ReproTracker(project=PROJECT,
                                                               monitor_hardware=False)])
    accelerator.init_trackers(PROJECT)
    accelerator.log({"loss": 1.0}, step=np.int64(7))
    run_id = accelerator.get_tracker("repro").run_id
    accelerator.end_training()
    assert [s for s, _, _ in ArtifactManager().get_metrics(run_id)["loss"]] == [7]


def test_a_run_that_cannot_start_fails_once(store_home: Path) -> None:
    """A dataset key that does not exist: the first log raises what went wrong (one FAILED
    run in the store); later logs say the run could not start instead of opening (and
    failing) a new run at every step."""
    accelerator = Accelerator(cpu=True, log_with=[make_tracker(datasets={"train": "nope:v1"})])
    accelerator.init_trackers(PROJECT)
    with pytest.raises(ArtifactNotFoundError):
        accelerator.log({"loss": 1.0}, step=0)
    for step in (1, 2):
        with pytest.raises(RunStateError, match="could not start"):
            accelerator.log({"loss": 1.0}, step=step)
    registry = _registry(store_home)
    try:
        states = [run.state for run in registry.list_runs()]
    finally:
        registry.close()
    assert states == [RunState.FAILED.value], states
