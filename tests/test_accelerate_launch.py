"""Hugging Face Accelerate + repro under real launches: 2 CPU processes on gloo, no mocks.

Each launch is ``torchrun --standalone --nproc_per_node 2`` (its own rendezvous on a free
port) or ``accelerate launch --multi_gpu``, in a session of its own, with ``REPRO_HOME`` in a
temporary directory; a launch that outlives ``JOB_TIMEOUT`` is killed with every process it
started, and its tests fail. A launch costs ~10 s of CPU on a 2-core box, so one module
fixture runs them all, ``PARALLEL`` at a time, and every test reads what one launch left:

- ``finished``: the example (40 steps), the example with ``--ttrl``, the example under
  ``accelerate launch``, and ``accelerate_scripts/launch_train.py`` (it dumps the model and
  optimizer right after every ``save_state``), then a second launch that loads those states;
- ``failures``: a process raising mid-training, right before ``save_state`` (the other one
  waits in its barrier) or skipping ``save_state`` (the barrier times out);
- ``preempted``: SIGTERM / SIGKILL once a state is logged, then a relaunch with ``--resume``.

``accelerate_scripts/launch_jobs.py`` starts, polls, signals and reads them."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest
from accelerate_scripts import launch_jobs as jobs
from accelerate_scripts.launch_jobs import EXAMPLE, TRAIN, Job, Plan

from repro_core import RunState
from repro_core.errors import ReproError
from repro_core.registry import Registry
from repro_core.ttrl import updates_producing

# pytest's timeout covers a test's fixtures: the first test waits for every launch
pytestmark = [pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]

BARRIER_TIMEOUT = 20  # REPRO_BARRIER_TIMEOUT of every launch but one
SHORT_BARRIER = 5  # of the launch where a process skips save_state (the barrier must time out)
PARALLEL = 4  # launches at once (2 processes and a launcher each; CPU-bound on 2 cores)
# A launch still running after this is a hang (killed, its tests fail). Normal: 10-40 s.
# Worst case without a hang: startup under load + a barrier timeout + torchrun's 30 s grace.
JOB_TIMEOUT = 150
PROJECT = "acc"  # launch_train.py's
DEMO = "accelerate-demo"  # the example's


def _states(manager: Any, project: str) -> list[Any]:
    return sorted(manager.list_artifacts(f"{project}/state"), key=lambda m: m.version_number)


def _only_run(store: Path) -> Any:
    found = jobs.runs(store)
    assert len(found) == 1, [(r.id, r.state) for r in found]
    return found[0]


# -- the launches -----------------------------------------------------------------------------


@dataclass
class Launches:
    jobs: dict[str, Job]
    flows: dict[str, Preemption]


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launches]:
    """Every launch of this module, at most ``PARALLEL`` at once (the longest chains first):
    the whole file costs little more than its CPU time."""
    root = tmp_path_factory.mktemp("launches")
    flows = {"sigterm": Preemption(signal.SIGTERM), "sigkill": Preemption(signal.SIGKILL)}
    plans = {**_preemption_plans(root, flows), **_finished_plans(root), **_failure_plans(root)}

    def step(running: dict[str, Job]) -> None:
        for name, flow in flows.items():
            if name in running:
                _preempt(flow, running[name])

    done = jobs.run_plans(plans, parallel=PARALLEL, step=step)
    for name, flow in flows.items():
        flow.first, flow.resumed = done[name], done[f"{name}-resume"]
    try:
        yield Launches(done, flows)
    finally:
        jobs.cleanup(list(done.values()))


def _launch(home: Path, command: list[str], *, tag: str = "out", after: str | None = None,
            barrier_timeout: float = BARRIER_TIMEOUT) -> Plan:
    return Plan(lambda: jobs.start(home, command, barrier_timeout=barrier_timeout,
                                   timeout=JOB_TIMEOUT, tag=tag), after)


# -- finished launches ----------------------------------------------------------------------


@dataclass
class Finished:
    example: Job  # torchrun examples/accelerate_train.py --steps 40 --save-every 10
    train: Job  # torchrun launch_train.py --steps 20 --save-every 10 (references dumped)
    restore: Job  # torchrun launch_train.py --load state:v1=path --load state:v2=repro
    accelerate: Job  # accelerate launch --multi_gpu examples/accelerate_train.py --steps 20
    ttrl: Job  # torchrun examples/accelerate_train.py --ttrl --steps 20 --save-every 10


def _finished_plans(root: Path) -> dict[str, Plan]:
    return {
        "train": _launch(root / "train", jobs.torchrun(
            TRAIN, "--out", "out", "--steps", "20", "--save-every", "10")),
        "restore": _launch(root / "train", jobs.torchrun(
            TRAIN, "--out", "restore", "--steps", "0", "--no-tracker",
            "--load", f"{PROJECT}/state:v1=path", "--load", f"{PROJECT}/state:v2=repro"),
            tag="restore", after="train"),
        "example": _launch(root / "example", jobs.torchrun(
            EXAMPLE, "--steps", "40", "--save-every", "10")),
        "ttrl": _launch(root / "ttrl", jobs.torchrun(
            EXAMPLE, "--steps", "20", "--save-every", "10", "--ttrl")),
        "accelerate": _launch(root / "accelerate", jobs.accelerate_launch(
            EXAMPLE, "--steps", "20", "--save-every", "10")),
    }


@pytest.fixture(scope="module")
def finished(launches: Launches) -> Finished:
    return Finished(**{name: launches.jobs[name] for name in (
        "example", "train", "restore", "accelerate", "ttrl")})


def test_torchrun_example_is_one_completed_run_logged_once_per_step(finished: Finished
                                                                    ) -> None:
    """Only the main process logs: each step once, in one run, finished COMPLETED."""
    job = finished.example.check()
    run = _only_run(job.store)
    assert (run.state, run.project, run.world_size) == (RunState.COMPLETED.value, DEMO, 2)
    assert jobs.state_history(job.store, run.id) == ["running", "completed"]
    with jobs.opened(job.store) as manager:
        logged = manager.get_metrics(run.id, ["train/loss", "lr"], segment=0)
        assert {k: jobs.steps(v) for k, v in logged.items()} == {
            "train/loss": list(range(40)), "lr": list(range(40))}
        assert {m.run_id for m in manager.list_artifacts()} == {run.id}
    assert job.log.count(f"repro run {run.id} of project '{DEMO}': COMPLETED") == 1


def test_torchrun_example_logs_every_state_and_the_model_with_lineage(finished: Finished
                                                                      ) -> None:
    job = finished.example.check()
    run = _only_run(job.store)
    with jobs.opened(job.store) as manager:
        states = _states(manager, DEMO)
        [config] = manager.list_artifacts(f"{DEMO}/config")
        [model] = manager.list_artifacts(f"{DEMO}/model")
        assert [m.metadata["step"] for m in states] == [9, 19, 29, 39]
        assert [m.metadata["iteration"] for m in states] == [1, 2, 3, 4]
        for meta in states:
            assert (meta.run_id, meta.metadata["run_id"], meta.metadata["project"]) == \
                (run.id, run.id, DEMO)
            assert meta.metadata["num_processes"] == 2
            assert meta.metadata["distributed_type"] == "MULTI_CPU"
        previous = None
        for meta in states:  # config + the previous state: a chain
            parents = set(manager.get_lineage(meta.key)["parents"])
            assert parents == {config.key} | ({previous} if previous else set()), meta.key
            previous = meta.key
        assert {config.key, states[-1].key} <= set(manager.get_lineage(model.key)["parents"])
        assert model.run_id == run.id
        for meta in states:  # every process's files were there before the main logged it
            files = set(os.listdir(manager.artifact_path(meta.key)))
            assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors",
                    "optimizer.bin", "scheduler.bin"} <= files, (meta.key, files)


def test_torchrun_example_environment_describes_the_launch(finished: Finished) -> None:
    with jobs.opened(finished.example.check().store) as manager:
        launch = manager.load_artifact(f"{DEMO}/environment")["accelerate"]
    assert launch["initialized"] is True
    assert (launch["distributed_type"], launch["world_size"], launch["num_machines"]) == \
        ("MULTI_CPU", 2, 1)
    assert launch["backend"] == "gloo"
    assert [(d["process_index"], d["machine"]) for d in launch["devices"]] == [(0, 0), (1, 0)]
    assert launch["env"]["WORLD_SIZE"] == "2" and launch["env"]["LOCAL_WORLD_SIZE"] == "2"
    # launches ran side by side, each torchrun --standalone on a port of its own
    ports = {}
    for job, project in ((finished.example, DEMO), (finished.train.check(), PROJECT),
                         (finished.ttrl.check(), DEMO), (finished.accelerate.check(), DEMO)):
        with jobs.opened(job.store) as manager:
            ports[job.name] = manager.load_artifact(
                f"{project}/environment")["accelerate"]["env"]["MASTER_PORT"]
    assert len(set(ports.values())) == 4, ports


def test_only_the_main_process_writes_the_store(finished: Finished) -> None:
    job = finished.train.check()
    run = _only_run(job.store)
    assert run.state == RunState.COMPLETED.value
    assert job.result(0)["run_id"] == run.id and job.result(1)["run_id"] is None
    assert [c for c in job.result(1)["registry_connections"] if not c["readonly"]] == []
    assert any(not c["readonly"] for c in job.result(0)["registry_connections"])
    with jobs.opened(job.store) as manager:
        assert [m.metadata["step"] for m in _states(manager, PROJECT)] == [9, 19]


def test_environment_names_the_devices_the_processes_use(finished: Finished) -> None:
    """The environment's per-process devices are what each process's ``accelerator.device``
    is. On CPU every process uses the CPU, which Accelerate names ``cpu:0`` on each (process
    ``i`` goes to ``local_index % device_count``, and ``torch.cpu.device_count()`` is 1): the
    environment records it as ``cpu``, not as two different devices."""
    job = finished.train.check()
    with jobs.opened(job.store) as manager:
        devices = manager.load_artifact(f"{PROJECT}/environment")["accelerate"]["devices"]
    used = [job.result(rank)["device"] for rank in (0, 1)]
    assert all(d.startswith("cpu") for d in used)
    assert [d["device"] for d in devices] == ["cpu", "cpu"]
    assert [d["process_index"] for d in devices] == [0, 1]


def test_a_second_launch_restores_exactly_what_was_saved(finished: Finished) -> None:
    """``accelerator.load_state(state_path(key))`` and ``repro_lightning.load_state`` in a
    new 2-process launch: on both processes the model parameters, the Adam moments and step
    and the scheduler equal (``torch.equal``) what the saving launch had right after
    ``save_state``. Two processes, not one: each reads the store itself (no collective) and
    loads its own ``random_states_<rank>.pkl``, as a relaunch does."""
    train, restore = finished.train.check(), finished.restore.check()
    loaded = restore.result(0)["loaded"]
    assert loaded == restore.result(1)["loaded"]
    assert [(x["key"], x["api"]) for x in loaded] == [
        (f"{PROJECT}/state:v1", "path"), (f"{PROJECT}/state:v2", "repro")]
    assert (loaded[1]["loaded"], loaded[1]["step"]) == (f"{PROJECT}/state:v2", 19)
    for i, step in ((0, 9), (1, 19)):
        reference = train.tensors(f"ref{step}.pt")
        assert reference["optimizer"]["state"], "Adam has per-parameter state to compare"
        for rank in (0, 1):
            got = restore.tensors(f"loaded{i}.rank{rank}.pt")
            assert jobs.tensors_equal(got, reference) == [], (i, rank)
    # without a tracker the restoring launch recorded nothing: still the one run
    assert _only_run(train.store).id == train.result(0)["run_id"]


def test_accelerate_launch_multi_gpu_runs_on_cpu_as_one_run(finished: Finished) -> None:
    job = finished.accelerate.check()
    run = _only_run(job.store)
    assert run.state == RunState.COMPLETED.value and run.world_size == 2
    with jobs.opened(job.store) as manager:
        launch = manager.load_artifact(f"{DEMO}/environment")["accelerate"]
        assert (launch["world_size"], launch["distributed_type"]) == (2, "MULTI_CPU")
        assert launch["mixed_precision"] == "no"
        assert launch["env"]["ACCELERATE_MIXED_PRECISION"] == "no"
        assert jobs.steps(manager.get_metrics(run.id, ["train/loss"], segment=0)[
            "train/loss"]) == list(range(20))
        assert [m.metadata["step"] for m in _states(manager, DEMO)] == [9, 19]


def _ttrl(job: Job) -> tuple[Any, list[dict[str, Any]], list[Any], list[list[int]]]:
    """The run, its online updates, its states and, per state, the steps of the updates that
    produced it (``updates_producing``)."""
    run = _only_run(job.store)

    def read(registry: Registry) -> tuple[list[dict[str, Any]], list[Any], list[list[int]]]:
        rows = registry.run_online_updates(run.id)
        states = sorted(registry.list_versions("state", DEMO), key=lambda v: v.version)
        produced = [[u["metadata"]["step"] for u in updates_producing(registry, v.id)]
                    for v in states]
        return rows, states, produced

    return (run, *jobs.read_registry(job.store, read))


def test_ttrl_logs_one_online_update_per_step(finished: Finished) -> None:
    job = finished.ttrl.check()
    run, rows, states, _ = _ttrl(job)
    assert run.state == RunState.COMPLETED.value
    assert [u["metadata"]["step"] for u in rows] == list(range(20))
    assert [u["update_id"] for u in rows] == [f"{run.id}-u{i}" for i in range(1, 21)]
    assert [v.metadata["step"] for v in states] == [9, 19]
    with jobs.opened(job.store) as manager:
        metrics = manager.get_metrics(run.id, ["online/reward", "reward"], segment=0)
    assert jobs.steps(metrics["reward"]) == list(range(20))
    assert [v for _, v, _ in metrics["online/reward"]] == [u["reward"] for u in rows]


def test_ttrl_updates_after_a_save_link_to_that_state(finished: Finished) -> None:
    """Program order decides: the updates of steps 10-19 come after ``save_state`` of step 9
    returned, so state:v1 is their model version (and they are what produced state:v2), on
    every run of the same program — whenever the state's background logging finishes."""
    _, rows, states, produced = _ttrl(finished.ttrl.check())
    assert [u["model_version_id"] for u in rows] == [None] * 10 + [states[0].id] * 10
    assert produced == [list(range(10)), list(range(10, 20))]


def test_ttrl_online_updates_name_experiences_that_were_logged(finished: Finished) -> None:
    """Each online-update row names its experience; the example logs one experience per
    update (``log_experience``), so every name must be found among the run's experiences."""
    job = finished.ttrl.check()
    run = _only_run(job.store)
    rows, experiences = jobs.read_registry(job.store, lambda r: (
        r.run_online_updates(run.id), r.experiences(run.id)))
    assert len(experiences) == len(rows) == 20
    logged = {e["experience_id"] for e in experiences}
    assert [u["experience_id"] for u in rows if u["experience_id"] not in logged] == []


# -- a process failing ----------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    args: tuple[str, ...]
    states: frozenset[str]  # what the run may end as
    message: str  # in the launch's output
    marker: str = "failed_at"  # written by the process at fault when it fails
    barrier_timeout: float = BARRIER_TIMEOUT
    # the launch ends this soon after the fault: before a barrier could even time out, or
    # (a skipped save_state) once the barrier timed out, with time to tear down on a busy box
    within: float = BARRIER_TIMEOUT


_FAILED = frozenset({RunState.FAILED.value})
# rank 1 failing: rank 0 either sees the gloo connection close (FAILED) or gets torchrun's
# SIGTERM first (INTERRUPTED); FAILED is what this box shows.
_EITHER = frozenset({RunState.FAILED.value, RunState.INTERRUPTED.value})
FAILURES = {
    "rank0-mid-step": Failure(("--fail-at-step", "5", "--fail-rank", "0"), _FAILED,
                              "boom at step 5 on rank 0"),
    "rank1-mid-step": Failure(("--fail-at-step", "5", "--fail-rank", "1"), _EITHER,
                              "boom at step 5 on rank 1"),
    # explicit directories: Accelerate's save_state then has no collective of its own, so
    # the process left waits in repro's save_state barrier (with automatic naming it would
    # wait in Accelerate's wait_for_everyone first)
    "rank1-before-save": Failure(("--fail-at-step", "9", "--fail-rank", "1", "--fail-where",
                                  "save", "--explicit-dirs"), _EITHER,
                                 "boom before save_state at step 9 on rank 1"),
    "rank1-skips-save": Failure(("--skip-save-rank", "1", "--explicit-dirs"), _FAILED,
                                "must be called on every process", "skipped_at",
                                SHORT_BARRIER, SHORT_BARRIER + BARRIER_TIMEOUT),
}


def _failure_plans(root: Path) -> dict[str, Plan]:
    return {case: _launch(root / case, jobs.torchrun(TRAIN, "--out", "out", "--steps", "20",
                                                      *failure.args),
                          barrier_timeout=failure.barrier_timeout)
            for case, failure in FAILURES.items()}


@pytest.fixture(scope="module")
def failures(launches: Launches) -> dict[str, Job]:
    return {case: launches.jobs[case] for case in FAILURES}


@pytest.mark.parametrize("case", list(FAILURES))
def test_a_failing_process_ends_the_launch_and_the_run(failures: dict[str, Job],
                                                       case: str) -> None:
    job, failure = failures[case].ended_by_itself(), FAILURES[case]
    assert job.returncode not in (0, None), job.tail()
    assert failure.message in job.log, job.tail()
    # no hang: the launch ended soon after the fault (a barrier never waits out gloo's 30 min)
    since = job.seconds - (float(job.text(failure.marker)) - job.started)
    assert since < failure.within, (since, job.tail())
    assert len(job.seen) >= 2 and jobs.gone(list(job.seen), 5.0), "a process outlived it"
    run = _only_run(job.store)
    assert run.state in failure.states, (run.state, job.tail())
    with jobs.opened(job.store) as manager:
        assert _states(manager, PROJECT) == []  # no save_state completed anywhere
        metrics = manager.get_metrics(run.id, ["train/loss"])["train/loss"]
        traces = manager.list_artifacts(f"{PROJECT}/error_trace")
        trace = manager.load_artifact(f"{PROJECT}/error_trace") if traces else ""
    last = 4 if "mid-step" in case else 9
    assert jobs.steps(metrics) == list(range(last + 1))  # flushed when the run ended
    if run.state == RunState.FAILED.value:
        assert [m.run_id for m in traces] == [run.id]
    if case.startswith("rank0"):
        assert failure.message in trace
    if case == "rank1-skips-save":  # the barrier itself ended it, after its timeout
        assert f"did not arrive within {SHORT_BARRIER}s" in trace and failure.message in trace
        assert since > SHORT_BARRIER - 1.0, since


# -- preemption and the relaunch ------------------------------------------------------------


@dataclass
class Preemption:
    sig: signal.Signals
    sent_at: float | None = None
    pids: list[int] = field(default_factory=list)  # the ranks (SIGKILL)
    reaped: bool = False  # the SIGKILLed ranks were gone before the relaunch
    polled: float = 0.0
    runs: list[tuple[str, str]] = field(default_factory=list)  # after the kill, before resume
    history: list[tuple[str, str, str | None]] = field(default_factory=list)
    states: list[tuple[str, int]] = field(default_factory=list)  # (key, step)
    first: Job | None = None
    resumed: Job | None = None


KILL_AFTER_STEP = 12  # a few steps past the first state (step 9): logged twice, shown once
STEPS = 30


def _progress(job: Job) -> int:
    try:
        return int(job.text("progress"))
    except (OSError, ValueError):
        return -1


def _logged_states(store: Path) -> int:
    """State versions in the store, read-only (a state is logged in the background, after
    ``save_state`` returned: the marker file of the script is not enough)."""
    try:
        return len(jobs.read_registry(store, lambda r: r.list_versions("state", PROJECT)))
    except (ReproError, sqlite3.Error):
        return 0  # no store yet


def _preempt(preemption: Preemption, job: Job) -> None:
    """Once the first state is logged and a few more steps are done: SIGTERM to torchrun's
    process group (it passes it on to the ranks), or SIGKILL to the training processes
    (the OOM killer, a lost node); torchrun, left alone, then ends itself."""
    if preemption.sent_at is not None or job.poll() or _progress(job) < KILL_AFTER_STEP \
            or time.monotonic() - preemption.polled < 0.2:
        return
    preemption.polled = time.monotonic()
    if not _logged_states(job.store):
        return
    if preemption.sig == signal.SIGTERM:
        job.signal(signal.SIGTERM)
    else:
        ranks = job.ranks()
        preemption.pids = [p.pid for p in ranks]
        for process in ranks:
            process.kill()
    preemption.sent_at = time.time()


def _snapshot(preemption: Preemption, store: Path) -> None:
    """The store between the kill and the relaunch (the relaunch changes the run's state)."""
    preemption.reaped = jobs.gone(preemption.pids, 15.0)
    preemption.runs = [(r.id, r.state) for r in jobs.runs(store)]
    if len(preemption.runs) == 1:
        preemption.history = jobs.read_registry(
            store, lambda r: r.run_state_history(preemption.runs[0][0]))
    with jobs.opened(store) as manager:
        preemption.states = [(m.key, m.metadata["step"]) for m in _states(manager, PROJECT)]


def _preemption_plans(root: Path, flows: dict[str, Preemption]) -> dict[str, Plan]:
    plans = {}
    for name, flow in flows.items():
        home = root / name
        plans[name] = _launch(home, jobs.torchrun(TRAIN, "--out", "out", "--steps", str(STEPS),
                                                  "--sleep", "0.25"))
        relaunch = _launch(home, jobs.torchrun(TRAIN, "--out", "resume", "--steps", str(STEPS),
                                               "--resume"), tag="resume", after=name)

        def resume(flow: Preemption = flow, home: Path = home, relaunch: Plan = relaunch
                   ) -> Job:
            _snapshot(flow, home / "store")
            return relaunch.begin()

        plans[f"{name}-resume"] = Plan(resume, after=name)
    return plans


@pytest.fixture(scope="module")
def preempted(launches: Launches) -> dict[str, Preemption]:
    return launches.flows


_ENDED_AS = {"sigterm": RunState.INTERRUPTED.value, "sigkill": RunState.CRASHED.value}


@pytest.mark.parametrize("name", ["sigterm", "sigkill"])
def test_a_preempted_run_shows_how_it_ended(preempted: dict[str, Preemption],
                                            name: str) -> None:
    flow = preempted[name]
    assert flow.first is not None
    first = flow.first.ended_by_itself()
    assert flow.sent_at is not None, f"never preempted\n{first.tail()}"
    assert first.returncode != 0 and not (first.out / "rank0.json").exists()
    assert flow.reaped, f"the SIGKILLed ranks {flow.pids} were still there"
    [(_, state)] = flow.runs
    assert state == _ENDED_AS[name], (flow.runs, first.tail())
    assert [s for s, _, _ in flow.history][-1] == _ENDED_AS[name]
    assert flow.states and flow.states[0] == (f"{PROJECT}/state:v1", 9)


@pytest.mark.parametrize("name", ["sigterm", "sigkill"])
def test_the_relaunch_continues_the_preempted_run(preempted: dict[str, Preemption],
                                                  name: str) -> None:
    flow = preempted[name]
    assert flow.resumed is not None and flow.first is not None
    resumed = flow.resumed.check()
    assert "already exists" not in resumed.log and "was not logged" not in resumed.log
    [(run_id, _)] = flow.runs
    run = _only_run(resumed.store)
    assert (run.id, run.state, run.segment) == (run_id, RunState.COMPLETED.value, 1)
    history = jobs.read_registry(resumed.store, lambda r: r.run_state_history(run_id))
    assert [s for s, _, _ in history] == ["running", _ENDED_AS[name], "running", "completed"]
    assert "resumed" in (history[2][2] or "")
    loaded_key, loaded_step = flow.states[-1]  # state:latest when the relaunch started
    for rank in (0, 1):
        assert resumed.result(rank)["loaded"] == [{"key": "state:latest", "api": "repro",
                                                   "loaded": loaded_key, "step": loaded_step}]
        assert resumed.result(rank)["start"] == loaded_step + 1
        got = resumed.tensors(f"resumed.rank{rank}.pt")
        assert jobs.tensors_equal(got, flow.first.tensors(f"ref{loaded_step}.pt")) == [], rank


@pytest.mark.parametrize("name", ["sigterm", "sigkill"])
def test_the_relaunch_logs_metrics_and_states_after_the_loaded_state(
        preempted: dict[str, Preemption], name: str) -> None:
    flow = preempted[name]
    assert flow.resumed is not None
    store = flow.resumed.check().store
    [(run_id, _)] = flow.runs
    loaded_key, loaded_step = flow.states[-1]
    with jobs.opened(store) as manager:
        before = jobs.steps(manager.get_metrics(run_id, ["train/loss"], segment=0)["train/loss"])
        after = jobs.steps(manager.get_metrics(run_id, ["train/loss"], segment=1)["train/loss"])
        merged = jobs.steps(manager.get_metrics(run_id, ["train/loss"])["train/loss"])
        states = _states(manager, PROJECT)
        [config] = manager.list_artifacts(f"{PROJECT}/config")
        new = [m for m in states if m.key not in dict(flow.states)]
        parents = set(manager.get_lineage(new[0].key)["parents"]) if new else set()
    assert after == list(range(loaded_step + 1, STEPS))
    assert before == list(range(len(before))) and before  # as logged until the kill
    # the resumed segment replaces what the first launch logged past the loaded state
    assert merged == sorted(set(before) | set(after))
    if name == "sigterm":  # SIGTERM finishes the run: everything logged is kept
        assert before[-1] >= KILL_AFTER_STEP and merged == list(range(STEPS))
    assert [m.metadata["step"] for m in new] == [s for s in (19, 29) if s > loaded_step]
    assert {m.run_id for m in states} == {run_id}
    iterations = [m.metadata["iteration"] for m in states]
    assert iterations == sorted(set(iterations))  # automatic naming moved on: no reuse
    assert {config.key, loaded_key} <= parents


# -- a SIGKILLed main process that is not reaped yet ----------------------------------------


def test_a_sigkilled_run_reads_crashed_while_its_process_is_a_zombie(tmp_path: Path) -> None:
    """torchrun starts every rank in a session of its own: a rank whose launcher is gone is
    reaped by whoever adopts it, and until then it is a zombie. A zombie can never finish
    its run, so the run must read CRASHED (and a relaunch may resume it) already then."""
    code = ("import os, signal\nfrom repro_core import ArtifactManager\n"
            "ArtifactManager().init_run('zombie', config={})\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    env = {**os.environ, "REPRO_HOME": str(tmp_path / "store")}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "REPRO_RUN_ID"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 60
        while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the child never ended"
            time.sleep(0.05)
        [run] = jobs.runs(tmp_path / "store")
        assert run.state == RunState.CRASHED.value, "a dead (zombie) process reads as RUNNING"
    finally:
        proc.wait()
    [run] = jobs.runs(tmp_path / "store")
    assert run.state == RunState.CRASHED.value  # once reaped
