"""``init_run(run_id=..., resume=...)``: continuing a run in a new process (W&B semantics).

Real SQLite, real files, real processes: a run is resumed by a second Python process, and a
run whose process was SIGKILLed while RUNNING is resumed after the fact. Also the schema v5
migration (and read-only opens of v4 stores), metric segments and their spill files.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repro_core import (
    ArtifactManager,
    ArtifactNotFoundError,
    InvalidArgumentError,
    RunStateError,
)
from repro_core._metrics_batch import Batch
from repro_core._metrics_spill import import_spills, write_spill
from repro_core.metrics import read_metrics
from repro_core.recover import recover_store
from repro_core.registry import SCHEMA_VERSION, Registry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "REPRO_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    ArtifactManager.reset_instance()
    yield
    ArtifactManager.reset_instance()


def _manager(root: Path) -> ArtifactManager:
    """A new process, as far as the manager is concerned: a fresh singleton on ``root``."""
    manager = ArtifactManager.reset_instance()
    manager.set_root(root)
    return manager


def _states(manager: ArtifactManager, run_id: str) -> list[str]:
    return [s[0] for s in manager.get_run(run_id)["states"]]


def _registry(root: Path) -> Registry:
    return Registry(root / "registry.sqlite", readonly=True)


def _python(code: str, *args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "REPRO_RUN_ID"):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120, **kwargs)  # type: ignore[call-overload, no-any-return]


# -- arguments ------------------------------------------------------------------------------


@pytest.mark.parametrize(("run_id", "resume"), [
    (None, "yes"), (None, True), (None, None), ("abcd1234", "Allow"), ("abcd1234", ""),
    (None, "must"),  # must needs an id
    ("abc", "allow"), ("", "allow"), ("a" * 65, "allow"), ("-abcd", "allow"),
    ("../etc", "allow"), ("ab/cd", "allow"), ("abcd\n", "allow"), ("abcd\x00", "allow"),
    (1234, "allow"), (b"abcd", "allow"), ("ab cd", "allow"), ("abcé", "allow"),
])
def test_bad_run_id_or_resume_is_refused_before_any_io(fresh: None, tmp_path: Path,
                                                       run_id: object, resume: object) -> None:
    manager = _manager(tmp_path / "s")
    with pytest.raises(InvalidArgumentError):
        manager.init_run("r", run_id=run_id, resume=resume)  # type: ignore[arg-type]
    assert not (tmp_path / "s").exists()
    assert manager.run is None


def test_must_with_an_unknown_id_is_not_found_and_makes_no_store(fresh: None,
                                                                  tmp_path: Path) -> None:
    manager = _manager(tmp_path / "s")
    with pytest.raises(ArtifactNotFoundError, match="resume"):
        manager.init_run("r", run_id="nosuchrun", resume="must")
    assert not (tmp_path / "s" / "registry.sqlite").exists()  # a typo'd root stays empty
    assert not (tmp_path / "s" / "registry.url").exists()  # (not bound to a server either)
    assert manager.run is None
    manager.init_run("other")  # a store now exists
    manager.finalize_run()
    with pytest.raises(ArtifactNotFoundError, match="nosuchrun"):
        manager.init_run("r", run_id="nosuchrun", resume="must")
    assert manager.run is None
    assert [r.id for r in _registry(tmp_path / "s").list_runs()] != ["nosuchrun"]


def test_never_allow_must_with_new_and_existing_ids(fresh: None, tmp_path: Path) -> None:
    manager = _manager(tmp_path / "s")
    run = manager.init_run("first", run_id="exp-01_a")  # never + a free id: a new run
    assert run.id == "exp-01_a" and run.segment == 0 and not run.resumed
    manager.finalize_run()
    with pytest.raises(RunStateError, match="already exists"):
        manager.init_run("again", run_id="exp-01_a")
    assert _states(manager, "exp-01_a") == ["running", "completed"]
    fresh_run = manager.init_run("second", run_id="exp-02", resume="allow")  # allow, new id
    assert fresh_run.id == "exp-02" and not fresh_run.resumed
    manager.finalize_run()
    assert _states(manager, "exp-02") == ["running", "completed"]
    again = manager.init_run("ignored", run_id="exp-02", resume="allow")
    assert again.id == "exp-02" and again.resumed and again.name == "second"
    manager.finalize_run()


def test_an_id_that_is_a_prefix_of_another_run_is_its_own_run(fresh: None,
                                                                tmp_path: Path) -> None:
    manager = _manager(tmp_path / "s")
    long = manager.init_run("long", run_id="abcd1234ef")
    manager.finalize_run()
    short = manager.init_run("short", run_id="abcd", resume="allow")  # not a resume of long
    assert short.id == "abcd" and not short.resumed
    manager.finalize_run()
    resumed = manager.init_run("x", run_id="abcd", resume="must")
    assert resumed.name == "short"
    manager.finalize_run()
    assert _states(manager, "abcd1234ef") == ["running", "completed"]
    assert long.id == "abcd1234ef"


# -- what a resume keeps and records --------------------------------------------------------


@pytest.mark.parametrize("end", ["completed", "failed", "interrupted"])
def test_resume_keeps_identity_and_records_the_previous_end(fresh: None, tmp_path: Path,
                                                            end: str) -> None:
    manager = _manager(tmp_path / "s")
    run = manager.init_run("orig", config={"lr": 0.1}, project="proj", tags=["a", "b"])
    manager.log_artifact("data", "dataset", data=b"abc")
    if end != "completed":
        manager.set_run_state(end, reason="preempted")
    manager.finalize_run()
    assert run.id is not None

    manager = _manager(tmp_path / "s")
    again = manager.init_run("other name", project="proj", tags=["c"], run_id=run.id,
                             resume="must")
    assert (again.id, again.name, again.tags, again.created_at) == (run.id, "orig",
                                                                    ["a", "b"], run.created_at)
    assert again.config == {"lr": 0.1}  # no config given: the stored one stays
    assert again.segment == 1 and again.resumed
    record = manager.get_run(run.id)
    assert record["segment"] == 1 and record["state"] == "running" and record["ended_at"] is None
    assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
    states = record["states"]
    assert [s[0] for s in states] == ["running", end, "running"]
    assert states[-1][2] == f"resumed in process {os.getpid()} on {socket.gethostname()} " \
                            f"after {end}"
    assert record["outputs"] == ["proj/data:v1"]  # its artifacts are still its own
    assert manager.use_artifact("data").key == "proj/data:v1"
    manager.finalize_run()
    assert _states(manager, run.id) == ["running", end, "running", "completed"]
    exported = json.loads((tmp_path / "s" / "runs" / run.id / "run.json").read_text())
    assert exported["run"]["segment"] == 1 and exported["run"]["state"] == "completed"


def test_a_changed_config_replaces_the_stored_one(fresh: None, tmp_path: Path) -> None:
    manager = _manager(tmp_path / "s")
    run = manager.init_run("r", config={"lr": 0.1, "epochs": 3})
    manager.finalize_run()
    assert run.id is not None
    manager = _manager(tmp_path / "s")
    manager.init_run("r", config={"lr": 0.1, "epochs": 3}, run_id=run.id, resume="allow")
    manager.finalize_run()
    assert "config updated" not in manager.get_run(run.id)["states"][2][2]
    manager = _manager(tmp_path / "s")
    again = manager.init_run("r", config={"lr": 0.01, "epochs": 6, "api_key": "sk-" + "x" * 40},
                             run_id=run.id, resume="allow")
    assert again.config["lr"] == 0.01
    record = manager.get_run(run.id)
    assert record["config"]["epochs"] == 6 and record["states"][-1][2].endswith("config updated")
    assert "x" * 40 not in json.dumps(record["config"])  # scrubbed like any config
    written = json.loads((tmp_path / "s" / "runs" / run.id / "config.json").read_text())
    assert written["lr"] == 0.01 and "x" * 40 not in json.dumps(written)
    manager.finalize_run()
    assert record["segment"] == 2


def test_project_mismatch_is_refused_and_changes_nothing(fresh: None, tmp_path: Path) -> None:
    manager = _manager(tmp_path / "s")
    run = manager.init_run("r", project="vision")
    manager.finalize_run()
    assert run.id is not None
    manager = _manager(tmp_path / "s")
    with pytest.raises(InvalidArgumentError, match="vision"):
        manager.init_run("r", run_id=run.id, resume="must")  # project "default"
    assert manager.run is None
    record = manager.get_run(run.id)
    assert record["segment"] == 0 and [s[0] for s in record["states"]] == ["running",
                                                                          "completed"]


def test_a_run_held_by_a_live_process_here_is_refused(fresh: None, tmp_path: Path) -> None:
    """This very process still holds it (abandoned, never finalized): not resumable."""
    manager = _manager(tmp_path / "s")
    run = manager.init_run("live")
    assert run.id is not None
    manager = _manager(tmp_path / "s")  # abandons the run; our pid still runs it
    with pytest.raises(RunStateError, match="still running"):
        manager.init_run("live", run_id=run.id, resume="allow")
    assert manager.run is None
    record = manager.get_run(run.id)
    assert record["segment"] == 0 and [s[0] for s in record["states"]] == ["running"]


def test_a_run_recorded_on_another_host_may_be_resumed(fresh: None, tmp_path: Path) -> None:
    """A preempted job resumes on another node: its old host cannot be asked, so the resume
    goes ahead and the history says the old process crashed."""
    manager = _manager(tmp_path / "s")
    run = manager.init_run("moved")
    assert run.id is not None
    manager.log_metrics({"loss": 1.0})
    manager = _manager(tmp_path / "s")  # abandon it, then pretend it ran elsewhere
    registry = Registry(tmp_path / "s" / "registry.sqlite")  # or REPRO_REGISTRY's server
    with registry._write() as conn:
        conn.execute("UPDATE runs SET host = 'node-17', pid = 1 WHERE id = ?", (run.id,))
    registry.close()
    again = manager.init_run("moved", run_id=run.id, resume="must")
    assert again.segment == 1
    states = manager.get_run(run.id)["states"]
    assert [s[0] for s in states] == ["running", "crashed", "running"]
    assert "node-17" in states[1][2] and states[2][2].endswith("after running")
    manager.finalize_run()


# -- metrics --------------------------------------------------------------------------------


def test_metric_segments_later_wins_and_each_stays_queryable(fresh: None,
                                                             tmp_path: Path) -> None:
    manager = _manager(tmp_path / "s")
    run = manager.init_run("m")
    assert run.id is not None
    for i in range(10):
        assert manager.log_metrics({"loss": float(i), "acc": i / 10}) == i
    manager.log_metrics({"lr": 1.0}, step=20)  # highest step so far: 20
    manager.set_run_state("interrupted")
    manager.finalize_run()

    manager = _manager(tmp_path / "s")
    manager.init_run("m", run_id=run.id, resume="must")
    assert manager.log_metrics({"loss": 60.0}, step=6) == 6  # replayed from a checkpoint
    assert manager.log_metrics({"loss": 70.0}, step=7) == 7
    assert manager.log_metrics({"loss": 210.0, "new": 1.0}) == 21  # after the highest step
    manager.finalize_run()

    merged = manager.get_metrics(run.id)
    assert [(s, v) for s, v, _ in merged["loss"]] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 60.0), (7, 70.0),
        (21, 210.0)]
    assert [s for s, _, _ in merged["acc"]] == list(range(10))  # not re-logged: untouched
    assert [s for s, _, _ in merged["new"]] == [21] and [s for s, _, _ in merged["lr"]] == [20]
    first = manager.get_metrics(run.id, segment=0)
    assert [v for _, v, _ in first["loss"]] == [float(i) for i in range(10)]
    assert "new" not in first
    second = manager.get_metrics(run.id, ["loss"], segment=1)
    assert [(s, v) for s, v, _ in second["loss"]] == [(6, 60.0), (7, 70.0), (21, 210.0)]
    assert manager.get_metrics(run.id, segment=2) == {}
    with pytest.raises(InvalidArgumentError):
        manager.get_metrics(run.id, segment=-1)
    registry = _registry(tmp_path / "s")
    assert read_metrics(registry, run.id, ["acc"], segment=1) == {}
    assert read_metrics(registry, run.id, ["loss"]) == {"loss": merged["loss"]}
    for bad in (-1, True, 1.0, "1"):
        with pytest.raises(InvalidArgumentError):
            read_metrics(registry, run.id, segment=bad)  # type: ignore[arg-type]
    registry.close()


def test_three_segments_each_hides_only_what_it_relogged(fresh: None, tmp_path: Path) -> None:
    manager = _manager(tmp_path / "s")
    run = manager.init_run("m", run_id="three-seg")
    for step in range(10):
        manager.log_metrics({"x": 0.0}, step=step)
    manager.finalize_run()
    for segment, start in ((1, 8), (2, 4)):
        manager = _manager(tmp_path / "s")
        manager.init_run("m", run_id="three-seg", resume="must")
        for step in range(start, start + 3):
            manager.log_metrics({"x": float(segment)}, step=step)
        manager.finalize_run()
    got = [(s, v) for s, v, _ in manager.get_metrics(run.id)["x"]]
    # segment 2 (steps 4-6) hides segment 0 from step 4 and all of segment 1 (steps 8-10)
    assert got == [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0), (4, 2.0), (5, 2.0), (6, 2.0)]


def test_resume_in_a_new_process(fresh: None, tmp_path: Path) -> None:
    """The real thing: another interpreter continues the run, its steps after ours."""
    root = tmp_path / "s"
    manager = _manager(root)
    run = manager.init_run("job", config={"lr": 0.1}, tags=["t"])
    assert run.id is not None
    for i in range(5):
        manager.log_metrics({"loss": float(i)})
    manager.log_artifact("ckpt", "checkpoint", data=b"epoch-1")
    manager.set_run_state("interrupted", reason="SIGUSR1 from the scheduler")
    manager.finalize_run()
    ArtifactManager.reset_instance()

    child = _python(
        "import json, sys\n"
        "from repro_core import ArtifactManager\n"
        "m = ArtifactManager()\n"
        "r = m.init_run('ignored', root=sys.argv[1], run_id=sys.argv[2], resume='must')\n"
        "ckpt = m.load_artifact('ckpt')\n"
        "steps = [m.log_metrics({'loss': 10.0 + i}) for i in range(3)]\n"
        "m.log_artifact('ckpt', 'checkpoint', data=ckpt + b'+epoch-2')\n"
        "m.finalize_run()\n"
        "print(json.dumps({'id': r.id, 'name': r.name, 'tags': r.tags, 'segment': r.segment,"
        " 'steps': steps, 'ckpt': ckpt.decode()}))\n",
        str(root), run.id)
    assert child.returncode == 0, child.stderr
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out == {"id": run.id, "name": "job", "tags": ["t"], "segment": 1,
                   "steps": [5, 6, 7], "ckpt": "epoch-1"}

    manager = _manager(root)
    record = manager.get_run(run.id)
    assert [s[0] for s in record["states"]] == ["running", "interrupted", "running",
                                                "completed"]
    assert record["states"][2][2].startswith("resumed in process ") \
        and f"process {os.getpid()} " not in record["states"][2][2]
    assert record["outputs"] == ["default/ckpt:v1", "default/ckpt:v2"]
    assert [(s, v) for s, v, _ in manager.get_metrics(run.id)["loss"]] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 10.0), (6, 11.0), (7, 12.0)]
    assert manager.load_artifact("ckpt") == b"epoch-1+epoch-2"


_HOLD = (
    "import sys\n"
    "from repro_core import ArtifactManager\n"
    "m = ArtifactManager()\n"
    "kw = {'run_id': sys.argv[2], 'resume': 'allow'} if len(sys.argv) > 2 else {}\n"
    "r = m.init_run('victim', root=sys.argv[1], **kw)\n"
    "for i in range(4):\n"
    "    m.log_metrics({'loss': float(i)})\n"
    "m.metrics_writer().flush()\n"
    "m.log_artifact('weights', 'model', data=b'w' * 100)\n"
    "print(r.id, flush=True)\n"
    "sys.stdin.read()\n"  # hold the run until killed
)


def _start_holder(root: Path, *args: str) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "REPRO_RUN_ID"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(root), *args], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        raise AssertionError(proc.communicate()[1])
    return proc, line


def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)  # reaped: no zombie keeps its pid "alive"
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkilled_run_is_resumed_after_one_crashed_row(fresh: None, tmp_path: Path) -> None:
    root = tmp_path / "s"
    proc, run_id = _start_holder(root)
    try:
        manager = _manager(root)
        # While the holder lives, nobody else may continue its run.
        with pytest.raises(RunStateError, match=f"process {proc.pid}"):
            manager.init_run("victim", run_id=run_id, resume="must")
        assert _states(manager, run_id) == ["running"]
    finally:
        _kill(proc)

    manager = _manager(root)
    run = manager.init_run("victim", run_id=run_id, resume="must")
    assert run.segment == 1
    assert manager.log_metrics({"loss": 100.0}) == 4
    manager.finalize_run()
    record = manager.get_run(run_id)
    states = [s[0] for s in record["states"]]
    assert states == ["running", "crashed", "running", "completed"]  # exactly one CRASHED
    assert f"process {proc.pid} " in record["states"][1][2]
    assert record["states"][2][2].endswith("after crashed")
    assert [(s, v) for s, v, _ in manager.get_metrics(run_id)["loss"]] == [
        (0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 100.0)]
    assert manager.load_artifact("weights") == b"w" * 100


@pytest.mark.slow
def test_a_resumed_run_killed_again_is_resumed_again(fresh: None, tmp_path: Path) -> None:
    """Two preemptions: the second holder resumes in a process, is killed, and a third
    resumes; the history tells each story once, in order."""
    root = tmp_path / "s"
    proc, run_id = _start_holder(root)
    _kill(proc)
    proc2, same = _start_holder(root, run_id)
    assert same == run_id
    _kill(proc2)
    manager = _manager(root)
    run = manager.init_run("x", run_id=run_id, resume="allow")
    assert run.segment == 2
    manager.finalize_run()
    assert _states(manager, run_id) == ["running", "crashed", "running", "crashed", "running",
                                        "completed"]
    # the second holder replayed steps 0-3 (its steps start after the highest: 4-7)
    assert [s for s, _, _ in manager.get_metrics(run_id, segment=1)["loss"]] == [4, 5, 6, 7]
    assert [s for s, _, _ in manager.get_metrics(run_id)["loss"]] == list(range(8))
    assert [m.version for m in manager.list_artifacts("weights")] == ["v1"]  # same content


def test_hardware_samples_do_not_push_the_step_counter(fresh: None, tmp_path: Path) -> None:
    """Side series (``advance=False``: hardware samples, indexed by sample number) do not
    decide where a resumed run's training steps continue."""
    manager = _manager(tmp_path / "s")
    run = manager.init_run("hw")
    assert run.id is not None
    for _ in range(3):
        manager.log_metrics({"loss": 1.0})
    writer = manager.metrics_writer()
    assert writer is not None
    for index in range(500):
        writer.log({"hardware/cpu_percent": 5.0}, step=index, advance=False)
    manager.finalize_run()
    manager = _manager(tmp_path / "s")
    manager.init_run("hw", run_id=run.id, resume="must")
    assert manager.log_metrics({"loss": 2.0}) == 3
    manager.finalize_run()


# -- spills ---------------------------------------------------------------------------------


def _spill(root: Path, run_id: str, segment: int | None, steps: list[int],
           value: float) -> Path:
    batch = Batch()
    from array import array

    batch.columns["loss"] = (array("q", steps), array("d", [value] * len(steps)),
                             array("d", [time.time()] * len(steps)))
    path = write_spill(root, run_id, batch, 0, segment=segment or 0)
    if segment is None:  # a file written before v5: no segment in its header
        lines = path.read_text().split("\n")
        header = json.loads(lines[0])
        del header["segment"]
        lines[0] = json.dumps(header)
        path.write_text("\n".join(lines))
    return path


def test_spill_files_carry_their_segment(fresh: None, tmp_path: Path) -> None:
    root = tmp_path / "s"
    manager = _manager(root)
    run = manager.init_run("sp", run_id="spill-run")
    manager.finalize_run()
    ArtifactManager.reset_instance()
    assert run.id == "spill-run"
    old = _spill(root, run.id, None, [0, 1, 2, 3], 1.0)
    new = _spill(root, run.id, 1, [2, 3], 2.0)
    assert "segment" not in json.loads(old.read_text().split("\n")[0])
    registry = Registry(root / "registry.sqlite")
    report = import_spills(registry)
    assert len(report.files) == 2 and not report.invalid
    assert not old.exists() and not new.exists()
    assert [(s, v) for s, v, _ in read_metrics(registry, run.id)["loss"]] == [
        (0, 1.0), (1, 1.0), (2, 2.0), (3, 2.0)]
    assert [s for s, _, _ in read_metrics(registry, run.id, segment=0)["loss"]] == [0, 1, 2, 3]
    registry.close()


@pytest.mark.parametrize("bad", [-1, True, "1", 1.5, 10**6, None])
def test_a_spill_with_a_forged_segment_is_not_imported(fresh: None, tmp_path: Path,
                                                       bad: object) -> None:
    root = tmp_path / "s"
    manager = _manager(root)
    manager.init_run("sp", run_id="spill-run")
    manager.finalize_run()
    ArtifactManager.reset_instance()
    path = _spill(root, "spill-run", 0, [0], 1.0)
    lines = path.read_text().split("\n")
    header = json.loads(lines[0])
    header["segment"] = bad
    lines[0] = json.dumps(header)
    path.write_text("\n".join(lines))
    registry = Registry(root / "registry.sqlite")
    with pytest.warns(RuntimeWarning, match="bad segment"):
        report = import_spills(registry)
    assert report.invalid and not report.files
    assert read_metrics(registry, "spill-run") == {}
    registry.close()


def test_a_resumed_run_spills_into_its_own_segment(fresh: None, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry refuses every write at the resumed run's finalize: the points spill, and
    the next open imports them into segment 1, not 0."""
    root = tmp_path / "s"
    manager = _manager(root)
    run = manager.init_run("sp")
    assert run.id is not None
    for i in range(4):
        manager.log_metrics({"loss": float(i)})
    manager.finalize_run()
    manager = _manager(root)
    manager.init_run("sp", run_id=run.id, resume="must")
    writer = manager.metrics_writer()
    assert writer is not None

    def refuse(conn: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr("repro_core.metrics.CLOSE_RETRY_S", 0.2, raising=False)
    monkeypatch.setattr(writer._registry, "_commit", refuse)
    manager.log_metrics({"loss": 20.0}, step=2)
    with pytest.warns(RuntimeWarning):
        manager.finalize_run()
    assert list((root / "spill").iterdir())
    manager = _manager(root)
    manager.init_run("other")  # a writer's open imports the spill
    manager.finalize_run()
    assert [(s, v) for s, v, _ in manager.get_metrics(run.id)["loss"]] == [
        (0, 0.0), (1, 1.0), (2, 20.0)]
    assert [s for s, _, _ in manager.get_metrics(run.id, segment=1)["loss"]] == [2]


# -- schema ---------------------------------------------------------------------------------


def _downgrade_to_v4(path: Path) -> None:
    """Make a current registry look like one a v4 release wrote."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("ALTER TABLE runs DROP COLUMN segment")
    conn.execute("ALTER TABLE metric_chunks DROP COLUMN segment")
    conn.execute("ALTER TABLE versions DROP COLUMN pruned_at")
    conn.execute("ALTER TABLE versions DROP COLUMN manifest")
    conn.execute("UPDATE schema_version SET version = 4")
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _v4_store(root: Path) -> str:
    manager = _manager(root)
    run = manager.init_run("old", config={"lr": 1})
    assert run.id is not None
    manager.log_artifact("data", "dataset", data=b"v1")
    manager.log_artifact("data", "dataset", data=b"v2")
    for i in range(3):
        manager.log_metrics({"loss": float(i)})
    manager.set_run_state("interrupted")
    manager.finalize_run()
    ArtifactManager.reset_instance()
    _downgrade_to_v4(root / "registry.sqlite")
    return run.id


@pytest.mark.sqlite_only("a v4 store was a SQLite file (a PostgreSQL registry starts at v6)")
def test_a_v4_store_opens_read_only_without_being_migrated(fresh: None, tmp_path: Path) -> None:
    root = tmp_path / "s"
    run_id = _v4_store(root)
    registry = _registry(root)
    assert registry.get_run(run_id).segment == 0
    assert [v.pruned_at for v in registry.list_versions()] == [None, None]
    assert [s for s, _, _ in read_metrics(registry, run_id)["loss"]] == [0, 1, 2]
    assert registry.next_metric_step(run_id) == 3
    registry.close()
    manager = _manager(root)  # no run: reads go through a read-only open
    assert [m.version for m in manager.list_artifacts("data")] == ["v1", "v2"]
    assert manager.get_run(run_id)["segment"] == 0
    assert [v for _, v, _ in manager.get_metrics(run_id)["loss"]] == [0.0, 1.0, 2.0]
    assert manager.use_artifact("data").version == "v2"
    ArtifactManager.reset_instance()
    conn = sqlite3.connect(root / "registry.sqlite")
    assert conn.execute("SELECT version FROM schema_version").fetchone() == (4,)
    conn.close()


@pytest.mark.sqlite_only("a v4 store was a SQLite file (a PostgreSQL registry starts at v6)")
def test_a_v4_store_is_migrated_and_its_runs_resume(fresh: None, tmp_path: Path) -> None:
    root = tmp_path / "s"
    run_id = _v4_store(root)
    manager = _manager(root)
    run = manager.init_run("x", run_id=run_id, resume="must")
    assert run.segment == 1 and run.config == {"lr": 1}
    manager.log_metrics({"loss": 10.0}, step=1)
    manager.finalize_run()
    assert [(s, v) for s, v, _ in manager.get_metrics(run_id)["loss"]] == [(0, 0.0),
                                                                          (1, 10.0)]
    manager.prune_version("data:v2")
    assert manager.use_artifact("data").version == "v1"
    conn = sqlite3.connect(root / "registry.sqlite")
    assert conn.execute("SELECT version FROM schema_version").fetchone() == (SCHEMA_VERSION,)
    assert conn.execute("SELECT segment FROM metric_chunks ORDER BY id").fetchall() == [(0,),
                                                                                       (1,)]
    conn.close()


# -- recovery -------------------------------------------------------------------------------


@pytest.mark.sqlite_only("repro recover rebuilds a lost registry.sqlite file")
def test_recover_rebuilds_a_resumed_run_with_a_chosen_id(fresh: None, tmp_path: Path) -> None:
    root = tmp_path / "s"
    manager = _manager(root)
    manager.init_run("chosen", run_id="My_Run-01")
    manager.log_artifact("data", "dataset", data=b"x")
    manager.set_run_state("interrupted")
    manager.finalize_run()
    manager = _manager(root)
    manager.init_run("chosen", run_id="My_Run-01", resume="must")
    manager.log_artifact("data", "dataset", data=b"y")
    manager.finalize_run()
    before = manager.get_run("My_Run-01")
    ArtifactManager.reset_instance()
    (root / "registry.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{root / 'registry.sqlite'}{suffix}").unlink(missing_ok=True)
    (root / "runs" / "Empty-Dir").mkdir()  # a valid id, but no run.json and no journal
    report = recover_store(root)
    assert report.runs == 1 and report.versions == 2, report.problems
    assert report.problems == ["skipped runs/'Empty-Dir': not a run (no run.json, no journal)"]
    manager = _manager(root)
    after = manager.get_run("My_Run-01")
    assert after["segment"] == 1 and after["states"] == before["states"]
    assert after["outputs"] == ["default/data:v1", "default/data:v2"]
    again = manager.init_run("chosen", run_id="My_Run-01", resume="must")
    assert again.segment == 2
    manager.finalize_run()



def test_a_resume_whose_export_fails_does_not_leave_the_run_held(
        fresh: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As for a new run: the row is committed, so a failing ``run.json`` export marks it
    FAILED rather than leaving it RUNNING in a process that holds no run."""
    from repro_core import StorageError

    manager = _manager(tmp_path / "s")
    run = manager.init_run("r")
    manager.finalize_run()
    assert run.id is not None
    manager = _manager(tmp_path / "s")

    def refuse(path: Path, value: object) -> None:
        raise StorageError(f"cannot write {path}", path=path)

    with monkeypatch.context() as patch:
        patch.setattr("repro_core.manager._write_json_atomic", refuse)
        with pytest.raises(StorageError):
            manager.init_run("r", run_id=run.id, resume="must")
    assert manager.run is None
    assert _states(manager, run.id) == ["running", "completed", "running", "failed"]
    again = manager.init_run("r", run_id=run.id, resume="must")  # not refused as "alive"
    assert again.segment == 2
    manager.finalize_run()


# -- review follow-ups -------------------------------------------------------------------------


def test_a_context_resumed_without_config_keeps_the_runs_config(
        fresh: None, tmp_path: Path) -> None:
    """``ExperimentContext`` adds its bookkeeping (``_repro``) to every config: that alone is
    not a config of the resume's own, so the run's stored config stays."""
    from repro_core import ExperimentContext

    with ExperimentContext({"lr": 0.1}, name="ctx", root=tmp_path / "s",
                           monitor_hardware=False) as first:
        assert first.run is not None
        run_id = first.run.id
    _manager(tmp_path / "s")
    with ExperimentContext(name="ctx", root=tmp_path / "s", monitor_hardware=False,
                           run_id=run_id, resume="must") as again:
        assert again.run is not None and again.run.config["lr"] == 0.1
    record = ArtifactManager().get_run(run_id)
    assert record["config"]["lr"] == 0.1
    assert "config updated" not in (record["states"][-2][2] or "")


@pytest.mark.parametrize("resume", ["allow", "never"])
def test_an_id_taken_between_check_and_insert_is_a_resume_or_a_clear_clash(
        fresh: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, resume: str) -> None:
    """Two jobs starting one new id at once: the loser of the insert sees the id taken. With
    ``allow`` it continues that run; with ``never`` it gets a RunStateError (not the SQL
    UNIQUE error as a StorageError)."""
    manager = _manager(tmp_path / "s")
    manager.init_run("winner", run_id="shared-id", resume="never")
    manager.finalize_run()
    manager = _manager(tmp_path / "s")
    real, calls = Registry.has_run, []

    def raced(self: Registry, run_id: str) -> bool:  # the first check runs before the insert
        calls.append(run_id)
        return False if len(calls) == 1 else real(self, run_id)

    monkeypatch.setattr(Registry, "has_run", raced)
    if resume == "never":
        with pytest.raises(RunStateError, match="another process"):
            manager.init_run("loser", run_id="shared-id", resume="never")
        return
    run = manager.init_run("loser", run_id="shared-id", resume="allow")
    assert run.id == "shared-id" and run.segment == 1 and run.name == "winner"
    manager.finalize_run()


def test_hardware_samples_of_a_resumed_run_continue_the_numbering(
        fresh: None, tmp_path: Path) -> None:
    """Hardware series are indexed by sample number; a resumed segment continues after the
    earlier samples, so the merged view keeps both segments' samples."""
    from repro_core import ExperimentContext

    def one_segment(**resume: str) -> str:
        with ExperimentContext({"lr": 1}, name="hw", root=tmp_path / "s",
                               monitor_interval=0.05, **resume) as ctx:
            time.sleep(0.3)
            assert ctx.run is not None and ctx.run.id is not None
            return ctx.run.id

    run_id = one_segment()
    _manager(tmp_path / "s")
    one_segment(run_id=run_id, resume="must")
    manager = ArtifactManager()
    first = manager.get_metrics(run_id, ["hardware/t"], segment=0)["hardware/t"]
    second = manager.get_metrics(run_id, ["hardware/t"], segment=1)["hardware/t"]
    merged = manager.get_metrics(run_id, ["hardware/t"])["hardware/t"]
    assert first and second
    assert second[0][0] == first[-1][0] + 1
    assert len(merged) == len(first) + len(second)
