"""Ranks: who writes, how other ranks get rank 0's answers, and that nothing hangs.

Process tests run real 2-process ``torch.distributed`` jobs on gloo (``tests/dist_workers/
worker.py``); each rank writes what it observed to ``rank<r>.json`` and the assertions here
read those files and the registry. Rank 1 always gets its own ``REPRO_HOME`` and working
directory so that any write it wrongly makes lands somewhere we can see.

The rank-rule and no-process-group tests at the bottom run in this process.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from repro_core import (
    AmbiguousRankError,
    ArtifactManager,
    ArtifactType,
    ReproError,
    RunState,
    constants,
)
from repro_core import distributed as rdist
from repro_core.distributed import Call
from repro_core.distributed._ledger import Ledger
from repro_core.hashing import hash_bytes
from repro_core.registry import Registry
from repro_core.serialize import canonical_json

WORKER = Path(__file__).parent / "dist_workers" / "worker.py"
SHORT_TIMEOUT = 5.0  # REPRO_BARRIER_TIMEOUT where a test expects a timeout
LONG_TIMEOUT = 60.0  # REPRO_BARRIER_TIMEOUT where none is expected
JOB_TIMEOUT = 90.0  # a job still running after this is a hang: kill it and fail
TIMEOUT_SLACK = 15.0  # scheduling slack on a loaded 2-core machine
BIG_FILE_SIZE = 4 * 1024 * 1024  # > worker.BIG_FILE_LIMIT (1 MiB)
_RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "SLURM_PROCID",
              "MASTER_ADDR", "MASTER_PORT", "REPRO_RUN_ID")


# -- launching jobs --------------------------------------------------------------------------


@dataclass
class Job:
    """A finished 2-rank job: exit codes, each rank's observations, and its log."""

    out: Path
    returncodes: dict[int, int]
    obs: dict[int, dict[str, Any]]
    log: str

    def explain(self) -> str:
        return f"returncodes={self.returncodes}\nobs={json.dumps(self.obs, indent=1)}\n{self.log}"


@dataclass
class Layout:
    """Where each rank is pointed: rank 0 at ``store``, rank 1 at its own home and cwd."""

    root: Path

    @property
    def out(self) -> Path:
        return self.root / "out"

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def rank1_home(self) -> Path:
        return self.root / "rank1_home"

    @property
    def rank1_cwd(self) -> Path:
        return self.root / "rank1_cwd"

    def rank_env(self, timeouts: tuple[float, float]) -> dict[str, dict[str, str]]:
        self.out.mkdir(parents=True, exist_ok=True)
        self.rank1_cwd.mkdir(parents=True, exist_ok=True)
        (self.root / "rank0_cwd").mkdir(parents=True, exist_ok=True)
        return {
            "0": {"REPRO_HOME": str(self.store), "cwd": str(self.root / "rank0_cwd"),
                  "REPRO_BARRIER_TIMEOUT": str(timeouts[0])},
            "1": {"REPRO_HOME": str(self.rank1_home), "cwd": str(self.rank1_cwd),
                  "REPRO_BARRIER_TIMEOUT": str(timeouts[1])},
        }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(rank_env: dict[str, dict[str, str]]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _RANK_VARS and not k.startswith("REPRO_")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               REPRO_TEST_RANK_ENV=json.dumps(rank_env))
    return env


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> bool:
    """Wait for every process; on timeout kill their process groups and return False."""
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return False
    return True


def _collect(layout: Layout, procs: dict[int, subprocess.Popen[bytes]], logs: list[Path],
             finished: bool) -> Job:
    obs = {}
    for rank in (0, 1):
        path = layout.out / f"rank{rank}.json"
        obs[rank] = json.loads(path.read_text()) if path.exists() else {}
    job = Job(layout.out, {r: p.returncode for r, p in procs.items()}, obs,
              "\n".join(p.read_text(errors="replace") for p in logs))
    if not finished:
        pytest.fail(f"job hung for {JOB_TIMEOUT}s and was killed\n{job.explain()}")
    return job


def launch_tcp(scenario: str, layout: Layout, timeouts: tuple[float, float]) -> Job:
    """Start both ranks ourselves (``tcp://`` init): a dying rank kills nobody else."""
    env, port = _env(layout.rank_env(timeouts)), _free_port()
    procs, logs = {}, []
    for rank in (0, 1):
        log = layout.root / f"rank{rank}.log"
        logs.append(log)
        with log.open("wb") as sink:
            procs[rank] = subprocess.Popen(
                [sys.executable, str(WORKER), scenario, str(layout.out), "--rank", str(rank),
                 "--world-size", "2", "--port", str(port)],
                env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
            )
    finished = _wait_all(list(procs.values()), JOB_TIMEOUT)
    return _collect(layout, procs, logs, finished)


def launch_torchrun(scenario: str, layout: Layout, timeouts: tuple[float, float]) -> Job:
    """Start the job the way users do: ``torchrun --nproc_per_node 2`` (``env://`` init)."""
    env, port = _env(layout.rank_env(timeouts)), _free_port()
    log = layout.root / "torchrun.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
             "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
             str(WORKER), scenario, str(layout.out)],
            env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
        )
    finished = _wait_all([proc], JOB_TIMEOUT)
    job = _collect(layout, {0: proc}, [log], finished)
    job.returncodes = {0: proc.returncode, 1: proc.returncode}
    return job


# -- reading the store -----------------------------------------------------------------------


@dataclass
class StoreView:
    """What is in rank 0's store after a job, read through the registry API."""

    runs: list[Any]
    versions: dict[str, Any]  # key -> VersionRow
    history: dict[str, list[tuple[str, str, str | None]]]
    blob_refs: set[str]
    blob_files: set[str]
    tmp_files: list[str]


def read_store(store: Path) -> StoreView:
    assert (store / "registry.sqlite").is_file(), f"rank 0 wrote no registry in {store}"
    registry = Registry(store / "registry.sqlite")
    try:
        runs = registry.list_runs()
        view = StoreView(
            runs=runs,
            versions={row.key: row for row in registry.list_versions()},
            history={run.id: registry.run_state_history(run.id) for run in runs},
            blob_refs={digest for digest, _ in registry.blob_references()},
            blob_files={f"{p.parent.parent.name}:{p.parent.name}{p.name}"
                        for p in (store / "blobs").glob("*/??/*")},
            tmp_files=sorted(p.name for p in (store / "tmp").iterdir()),
        )
    finally:
        registry.close()
    return view


def _error_of(attempt: dict[str, Any]) -> dict[str, Any]:
    assert not attempt["ok"], f"expected an error, got {attempt}"
    error: dict[str, Any] = attempt["error"]
    return error


def _value_of(attempt: dict[str, Any]) -> Any:
    assert attempt["ok"], f"expected success, got {attempt}"
    return attempt["value"]


# -- 1 + 4a: a healthy job, then rank 0 alone ------------------------------------------------


@pytest.fixture(scope="module")
def happy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, Job]:
    """One torchrun job shared by several tests (gloo start-up costs seconds per job)."""
    layout = Layout(tmp_path_factory.mktemp("happy"))
    layout.out.mkdir(parents=True)
    (layout.out / "input.bin").write_bytes(bytes(range(256)) * 64)
    job = launch_torchrun("happy", layout, (LONG_TIMEOUT, LONG_TIMEOUT))
    assert job.returncodes == {0: 0, 1: 0}, job.explain()
    assert job.obs[0].get("done") and job.obs[1].get("done"), job.explain()
    return layout, job


@pytest.mark.timeout(150)
@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_share_one_run_and_identical_answers(happy: tuple[Layout, Job]) -> None:
    """init_run, log_artifact and use_artifact give every rank the same answer (rank 0's)."""
    _, job = happy
    r0, r1 = job.obs[0], job.obs[1]
    assert r0["process_group"] == {"rank": 0, "world_size": 2}
    assert r1["process_group"] == {"rank": 1, "world_size": 2}
    assert r0["init"]["id"] and r0["init"]["id"] == r1["init"]["id"]
    assert (r0["init"]["is_rank_zero"], r1["init"]["is_rank_zero"]) == (True, False)

    assert r1["log"] == r0["log"]  # full to_dict: version, hash, size, path, run_id, aliases…
    assert [(d["name"], d["version"]) for d in r1["log"]] == [
        ("weights", "v1"), ("dataset", "v1"), ("weights", "v2")]
    assert all(d["hash"].startswith("blake3:") and d["path"] for d in r1["log"])
    assert {d["run_id"] for d in r1["log"]} == {r0["init"]["id"]}
    assert r1["log"][2]["parent_artifacts"] == ["default/dataset:v1"]
    assert "best" in r1["log"][2]["aliases"]

    assert r1["use"] == r0["use"]
    assert r1["use"][0]["hash"] == r0["log"][1]["hash"]
    assert (r1["use"][1]["name"], r1["use"][1]["version"]) == ("weights", "v2")
    assert r0["loaded"] == r1["loaded"] == {"w": [1, 2, 3]}

    # Read APIs called by every rank: rank 1 gets rank 0's answer, not its own empty store's.
    assert r1["reads"] == r0["reads"]
    reads = r1["reads"]
    assert sorted((d["name"], d["version"]) for d in reads["list_artifacts"]) == [
        ("dataset", "v1"), ("weights", "v1"), ("weights", "v2")]
    assert reads["list_weights"] == ["default/weights:v1", "default/weights:v2"]
    assert reads["get_lineage"]["parents"] == ["default/dataset:v1"]
    assert reads["get_lineage"]["produced_by"]["id"] == r0["init"]["id"]
    assert reads["get_run"]["id"] == r0["init"]["id"]
    assert reads["get_run"]["world_size"] == 2
    assert reads["get_run"]["outputs"] == ["default/weights:v1", "default/dataset:v1",
                                           "default/weights:v2"]

    assert _value_of(r0["finalize"]) is None and _value_of(r1["finalize"]) is None
    # Rank 1's Run is a do-nothing handle: its .state is not kept in sync, so only rank 0's.
    assert r0["final_state"] == RunState.COMPLETED.value


@pytest.mark.timeout(150)
@pytest.mark.slow
@pytest.mark.distributed
def test_only_rank_zero_writes(happy: tuple[Layout, Job]) -> None:
    """One job = one run, and the store holds exactly what rank 0 logged; rank 1 wrote nothing
    (not in its own REPRO_HOME, not in its working directory)."""
    layout, job = happy
    r0 = job.obs[0]
    view = read_store(layout.store)
    assert [run.id for run in view.runs] == [r0["init"]["id"]]
    run = view.runs[0]
    assert (run.state, run.world_size) == (RunState.COMPLETED.value, 2)
    assert run.ended_at is not None

    rank0_logged = [*r0["log"], _value_of(r0["solo"]["log_artifact"]),
                    _value_of(r0["after_solo"])]
    assert set(view.versions) == {f"{d['project']}/{d['name']}:{d['version']}"
                                  for d in rank0_logged}
    for meta in rank0_logged:
        row = view.versions[f"{meta['project']}/{meta['name']}:{meta['version']}"]
        assert (row.digest, row.size, row.run_id) == (meta["hash"], meta["size_bytes"], run.id)
    assert view.blob_files == view.blob_refs
    assert {d["hash"] for d in rank0_logged} <= view.blob_files
    assert view.tmp_files == []
    assert sorted(p.name for p in (layout.store / "runs").iterdir()) == [run.id]
    exported = json.loads((layout.store / "runs" / run.id / "run.json").read_text())
    assert exported["run"]["state"] == RunState.COMPLETED.value

    assert not layout.rank1_home.exists()
    assert list(layout.rank1_cwd.iterdir()) == []
    assert list((layout.root / "rank0_cwd").iterdir()) == []


@pytest.mark.timeout(150)
@pytest.mark.slow
@pytest.mark.distributed
def test_public_api_on_rank_zero_alone_does_not_block(happy: tuple[Layout, Job]) -> None:
    """log/use/set_run_state (unmarked) and list/lineage/get_run (in ``rank_zero_only()``)
    inside ``if rank == 0`` return while rank 1 makes no repro call at all (it waits for rank
    0's marker): no hidden collective."""
    layout, job = happy
    r0, r1 = job.obs[0], job.obs[1]
    assert r1["waited_for_rank0_solo"] is True
    solo = r0["solo"]
    for name, attempt in solo.items():
        assert attempt["ok"], (name, attempt)
        assert attempt["elapsed"] < TIMEOUT_SLACK, (name, attempt)
    assert _value_of(solo["log_artifact"])["version"] == "v1"
    assert _value_of(solo["use_artifact"])["hash"] == r0["log"][0]["hash"]
    assert "default/solo:v1" in _value_of(solo["list_artifacts"])
    assert _value_of(solo["get_lineage"])["parents"] == ["default/dataset:v1"]
    history = read_store(layout.store).history[r0["init"]["id"]]
    assert ("running", "rank 0 alone") in [(state, reason) for state, _, reason in history]


@pytest.mark.timeout(150)
@pytest.mark.slow
@pytest.mark.distributed
def test_shared_call_after_rank_zero_solo_call_gets_its_own_answer(
    happy: tuple[Layout, Job],
) -> None:
    """Rank 1 must receive the answer to its own call, not to one rank 0 made alone."""
    _, job = happy
    expected = _value_of(job.obs[0]["after_solo"])
    assert _value_of(job.obs[1]["after_solo"]) == expected
    assert (expected["name"], expected["version"]) == ("after-solo", "v1")


# -- 2: a rank dies --------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.slow
@pytest.mark.distributed
def test_dead_rank_makes_finalize_fail_fast_and_run_failed(tmp_path: Path) -> None:
    """Rank 1 exits before finalize_run: rank 0's finalize raises DistributedTimeoutError
    after REPRO_BARRIER_TIMEOUT (not a hang) and the run is FAILED in the registry."""
    layout = Layout(tmp_path)
    job = launch_tcp("dies", layout, (SHORT_TIMEOUT, SHORT_TIMEOUT))
    assert job.returncodes == {0: 0, 1: 1}, job.explain()
    r0 = job.obs[0]
    assert job.obs[1]["log"] == r0["log"]
    error = _error_of(r0["finalize"])
    assert error["type"] == "DistributedTimeoutError"
    assert {"ReproError", "TimeoutError"} <= set(error["mro"])
    assert SHORT_TIMEOUT - 0.5 <= error["elapsed"] <= SHORT_TIMEOUT + TIMEOUT_SLACK
    assert _value_of(r0["finalize_again"]) is None
    assert r0["current_run_after"] is True

    view = read_store(layout.store)
    assert [run.id for run in view.runs] == [r0["init"]["id"]]
    run = view.runs[0]
    assert run.state == RunState.FAILED.value and run.ended_at is not None
    assert view.history[run.id][-1][0] == RunState.FAILED.value
    assert "default/before-death:v1" in view.versions
    assert not layout.rank1_home.exists()


# -- 3 + 4b: rank 0 fails during a save; rank 1 asks alone ----------------------------------


@pytest.fixture(scope="module")
def diskfull(tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, Job]:
    """Rank 0 under a 1 MiB RLIMIT_FSIZE logs a 4 MiB file; later rank 1 makes a call alone.
    Rank 0 waits long at finalize's barrier while rank 1 sits out that lonely fetch."""
    layout = Layout(tmp_path_factory.mktemp("diskfull"))
    layout.out.mkdir(parents=True)
    (layout.out / "big.bin").write_bytes(os.urandom(BIG_FILE_SIZE))
    job = launch_tcp("diskfull", layout, (LONG_TIMEOUT, SHORT_TIMEOUT))
    assert job.returncodes == {0: 0, 1: 0}, job.explain()
    assert job.obs[0].get("done") and job.obs[1].get("done"), job.explain()
    return layout, job


@pytest.mark.timeout(120)
@pytest.mark.slow
@pytest.mark.distributed
def test_rank_zero_storage_error_reaches_every_rank(diskfull: tuple[Layout, Job]) -> None:
    """A full disk on rank 0 makes that log_artifact raise StorageError on both ranks (rank 1
    promptly, with rank 0's message); both carry on, and nothing partial stays in the store."""
    layout, job = diskfull
    r0, r1 = job.obs[0], job.obs[1]
    e0, e1 = _error_of(r0["big"]), _error_of(r1["big"])
    assert e0["type"] == e1["type"] == "StorageError"
    assert {"ReproError", "OSError"} <= set(e1["mro"])
    assert e0["errno"] == errno.EFBIG
    assert e0["message"] in e1["message"]  # rank 1 is told what went wrong on rank 0
    assert e1["elapsed"] < SHORT_TIMEOUT  # answered, not timed out

    assert _value_of(r0["small"]) == _value_of(r1["small"])
    assert _value_of(r0["finalize"]) is None and _value_of(r1["finalize"]) is None

    view = read_store(layout.store)
    assert [(run.id, run.state) for run in view.runs] == [
        (r0["init"]["id"], RunState.COMPLETED.value)]
    assert set(view.versions) == {"default/small:v1"}
    assert view.blob_files == view.blob_refs  # the partial big blob was not kept
    assert view.tmp_files == []
    assert not layout.rank1_home.exists()


@pytest.mark.timeout(120)
@pytest.mark.slow
@pytest.mark.distributed
def test_fetch_that_rank_zero_never_answers_times_out(diskfull: tuple[Layout, Job]) -> None:
    """use_artifact on rank 1 alone, while rank 0 is held back before finalize_run (as in a
    collective), waits REPRO_BARRIER_TIMEOUT, then raises DistributedTimeoutError naming the
    call and what rank 0 did instead; rank 1 can still finalize afterwards."""
    _, job = diskfull
    r1 = job.obs[1]
    assert job.obs[0]["waited_for_lonely"] is True
    lonely = _error_of(r1["lonely_fetch"])
    assert lonely["type"] == "DistributedTimeoutError"
    assert {"ReproError", "TimeoutError"} <= set(lonely["mro"])
    assert SHORT_TIMEOUT - 0.5 <= lonely["elapsed"] <= SHORT_TIMEOUT + TIMEOUT_SLACK
    assert "use_artifact('small')" in lonely["message"]
    assert "rank 0 made no use_artifact('small') call" in lonely["message"]
    assert r1["steps"].index("lonely_fetch") < r1["steps"].index("finalize")
    assert _value_of(r1["finalize"]) is None


# -- switching stores inside one process group -----------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.slow
@pytest.mark.distributed
def test_second_run_after_reset_instance_gets_new_id_on_every_rank(tmp_path: Path) -> None:
    """reset_instance() is documented for programs that switch stores; a second run in the
    same job must still give every rank the new run id."""
    layout = Layout(tmp_path)
    # Rank 1 waits long for rank 0's answers; rank 0's timeout is short because, with the bug,
    # its second finalize barrier waits for a rank 1 that used the old run id.
    job = launch_tcp("reset", layout, (SHORT_TIMEOUT, LONG_TIMEOUT))
    assert job.returncodes == {0: 0, 1: 0}, job.explain()
    r0, r1 = job.obs[0], job.obs[1]
    assert r0["rank1_entered_first"] is True  # else the ordering under test never happened
    assert r0["first"] == r1["first"]
    assert r0["second_init"]["id"] != r0["first"]["id"]
    assert r1["second_init"]["id"] == r0["second_init"]["id"]
    assert _value_of(r1["second_log"]) == _value_of(r0["second_log"])
    assert _value_of(r0["second_finalize"]) is None


# -- issue 8 item 13: rank-0-only calls never shift the pairing of shared calls ------------


def _v(meta: dict[str, Any]) -> int:
    """A version's number (``v3`` → 3); assertions are relative, whatever the first number."""
    return int(meta["version"].removeprefix("v"))


def _same_answer(job: Job, step: str) -> Any:
    """Rank 1's answer to a shared call is rank 0's, exactly (version, digest, path, …)."""
    expected = _value_of(job.obs[0][step])
    assert _value_of(job.obs[1][step]) == expected, step
    return expected


@pytest.mark.timeout(150)
@pytest.mark.slow
@pytest.mark.distributed
def test_rank_zero_solo_calls_never_shift_shared_ones(tmp_path: Path) -> None:
    """torchrun, gloo: ``if rank == 0:`` calls of the same name, kind and key as the shared
    calls around them (writes and reads), without any marking: each shared call gets its own
    answer on rank 1 — the issue's ``solo``/``shared`` pair first."""
    layout = Layout(tmp_path)
    job = launch_torchrun("interleaved", layout, (LONG_TIMEOUT, LONG_TIMEOUT))
    assert job.returncodes == {0: 0, 1: 0}, job.explain()
    r0, r1 = job.obs[0], job.obs[1]
    first = _v(r0["solo_model"])  # the first version number of any name
    assert r0["solo_model"]["hash"] == hash_bytes(b"solo")
    shared = _same_answer(job, "shared_model")
    assert (_v(shared), shared["hash"]) == (first + 1, hash_bytes(b"shared"))

    for step, (a0, a1) in enumerate(zip(r0["same_name"], r1["same_name"], strict=True)):
        expected = _value_of(a0)
        assert _value_of(a1) == expected
        assert expected["hash"] == hash_bytes(canonical_json({"step": step}))
        assert _v(expected) == first + 2 * step + 1  # the solo calls took the others
    other = [_value_of(a) for a in r0["other_names"]]
    assert [_value_of(a) for a in r1["other_names"]] == other
    assert [(d["name"], _v(d)) for d in other] == [("other", first + 1), ("third", first)]

    write = _same_answer(job, "write")
    assert _v(write) == first + 2
    reads = {name: _value_of(attempt) for name, attempt in r0["reads"].items()}
    assert {name: _value_of(attempt) for name, attempt in r1["reads"].items()} == reads
    assert reads["use_artifact"] == {**write, "path": reads["use_artifact"]["path"]}
    assert [_v(d) for d in reads["list_artifacts"]] == [first, first + 1, first + 2]
    assert any(key.endswith(f"model:{write['version']}") for key in reads["get_run"]["outputs"])
    assert [row[0] for row in reads["get_metrics"]["loss"]] == [0, 1]
    assert reads["get_lineage"]["artifact"]["version"] == write["version"]
    assert _value_of(r0["finalize"]) is None and _value_of(r1["finalize"]) is None
    assert [run.state for run in read_store(layout.store).runs] == [RunState.COMPLETED.value]


@pytest.mark.timeout(150)
@pytest.mark.slow
@pytest.mark.distributed
def test_rank_zero_only_scope_publishes_nothing(tmp_path: Path) -> None:
    """Inside ``rank_zero_only()`` rank 0's calls work and publish nothing; rank 1's return
    None (empty for lists/dicts) at once; the decorator skips the function on rank 1. The
    scoped reads are identical to the shared reads that follow, with other answers: had they
    been published, rank 1 would have taken them."""
    layout = Layout(tmp_path)
    job = launch_tcp("scope", layout, (LONG_TIMEOUT, LONG_TIMEOUT))
    assert job.returncodes == {0: 0, 1: 0}, job.explain()
    r0, r1 = job.obs[0], job.obs[1]
    first = _v(_same_answer(job, "first"))
    scoped0 = {name: _value_of(attempt) for name, attempt in r0["scoped_reads"].items()}
    assert _v(scoped0["use_artifact"]) == first
    assert _v(_value_of(r0["scoped_write"])) == first + 1
    assert {name: _value_of(a) for name, a in r1["scoped_reads"].items()} == {
        "use_artifact": None, "list_artifacts": [], "get_run": {}, "get_metrics": {},
        "get_lineage": {}}
    assert _value_of(r1["scoped_write"]) is None
    assert all(a["elapsed"] < TIMEOUT_SLACK for a in r1["scoped_reads"].values())
    assert _v(_value_of(r0["decorated"]["result"])) == first + 2
    assert r0["decorated"]["ran"] == ["decorated"]
    assert (_value_of(r1["decorated"]["result"]), r1["decorated"]["ran"]) == (None, [])
    assert r0["published_in_scope"] == 0

    reads = {name: _value_of(attempt) for name, attempt in r0["reads"].items()}
    assert {name: _value_of(attempt) for name, attempt in r1["reads"].items()} == reads
    assert _v(reads["use_artifact"]) == first + 2
    assert [row[0] for row in reads["get_metrics"]["loss"]] == [0, 1]
    for rank in (0, 1):  # finalize_run synchronises every rank: refused in the scope
        error = _error_of(job.obs[rank]["finalize_in_scope"])
        assert error["type"] == "RankMismatchError", error
        assert {"ReproError", "RuntimeError"} <= set(error["mro"])
        assert job.obs[rank]["run_still_active"] is True
        assert _value_of(job.obs[rank]["finalize"]) is None
    assert [run.state for run in read_store(layout.store).runs] == [RunState.COMPLETED.value]


@pytest.mark.timeout(150)
@pytest.mark.slow
@pytest.mark.distributed
def test_ambiguous_pairing_fails_finalize_on_every_rank(tmp_path: Path) -> None:
    """Rank 0 alone reads ``data`` (v0), writes v1, then every rank reads ``data``: the
    unmarked solo read is identical to the shared one, so rank 1 cannot tell them apart and
    takes v0. That is detected: finalize_run raises RankMismatchError on both ranks, naming
    the call and the fix, and the run is FAILED."""
    layout = Layout(tmp_path)
    job = launch_tcp("ambiguous", layout, (LONG_TIMEOUT, LONG_TIMEOUT))
    assert job.returncodes == {0: 0, 1: 0}, job.explain()
    r0, r1 = job.obs[0], job.obs[1]
    first = _v(_value_of(r0["shared_write"]))
    assert _v(_value_of(r0["shared_read"])) == first + 1
    assert _v(_value_of(r1["shared_read"])) == first  # the guess repro cannot avoid…
    for rank in (0, 1):  # …and never leaves unreported
        error = _error_of(job.obs[rank]["finalize"])
        assert error["type"] == "RankMismatchError", error
        assert "rank 1's use_artifact('data') may hold the answer" in error["message"]
        assert "rank_zero_only()" in error["message"]
        assert job.obs[rank]["run_closed"] is True
    view = read_store(layout.store)
    run = view.runs[0]
    assert run.state == RunState.FAILED.value
    assert "use_artifact('data')" in (view.history[run.id][-1][2] or "")


@pytest.mark.timeout(150)
@pytest.mark.slow
@pytest.mark.distributed
def test_calls_rank_zero_never_answers_fail_fast(tmp_path: Path) -> None:
    """A shared log_artifact whose data differs between ranks, and a rank-1-only call: rank 0
    never makes them, so rank 1 gets RankMismatchError as soon as rank 0 reaches finalize_run
    (its REPRO_BARRIER_TIMEOUT is 60 s), saying what differs. Per-rank metadata is fine."""
    layout = Layout(tmp_path)
    job = launch_tcp("mismatch", layout, (LONG_TIMEOUT, LONG_TIMEOUT))
    assert job.returncodes == {0: 0, 1: 0}, job.explain()
    r0, r1 = job.obs[0], job.obs[1]
    first = _v(_same_answer(job, "per_rank_metadata"))
    assert r0["rank1_waiting"] is True
    assert _v(_value_of(r0["per_rank_data"])) == first + 1
    differing = _error_of(r1["per_rank_data"])
    assert differing["type"] == "RankMismatchError", differing
    assert "log_artifact('weights')" in differing["message"]
    assert "differed from this rank's in: data" in differing["message"]
    assert differing["elapsed"] < TIMEOUT_SLACK < LONG_TIMEOUT
    lonely = _error_of(r1["rank1_only"])
    assert lonely["type"] == "RankMismatchError", lonely
    assert "rank 0 made no use_artifact('weights') call" in lonely["message"]
    assert lonely["elapsed"] < SHORT_TIMEOUT  # rank 0 had already ended: no wait at all
    assert _value_of(r0["finalize"]) is None and _value_of(r1["finalize"]) is None


# -- rank 0 leaves first --------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.slow
@pytest.mark.distributed
def test_finalize_survives_rank_zero_exiting_right_after(tmp_path: Path) -> None:
    """The end of every training script: finalize_run() then exit. Rank 1, delayed 1.5 s after
    the barrier, must still finish finalize_run without error."""
    layout = Layout(tmp_path)
    job = launch_tcp("exit_race", layout, (SHORT_TIMEOUT, SHORT_TIMEOUT))
    if job.returncodes != {0: 0, 1: 0} or "finalize" not in job.obs[1]:
        # Not the bug under test (e.g. the injection hook vanished): fail for real.
        raise RuntimeError(f"exit_race job broke\n{job.explain()}")
    assert _value_of(job.obs[0]["finalize"]) is None
    view = read_store(layout.store)
    assert [run.state for run in view.runs] == [RunState.COMPLETED.value]
    assert _value_of(job.obs[1]["finalize"]) is None


# -- 5: rank rules without a process group ---------------------------------------------------


@pytest.fixture
def no_rank_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean slate: no launcher variables and no process group in this process."""
    for var in _RANK_VARS:
        monkeypatch.delenv(var, raising=False)
    assert not rdist.process_group_active()
    return monkeypatch


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 0),
        ({"RANK": "3", "SLURM_PROCID": "5", "LOCAL_RANK": "1"}, 3),
        ({"RANK": " ", "SLURM_PROCID": "5", "LOCAL_RANK": "1"}, 5),
        ({"SLURM_PROCID": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8",
          "LOCAL_WORLD_SIZE": "2"}, 5),
        ({"LOCAL_RANK": "1"}, 1),
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 1),
        ({"RANK": "0", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, 0),
    ],
    ids=["nothing-set", "rank-wins", "blank-rank-skipped", "slurm-before-local",
         "local-alone", "local-single-node", "rank-resolves-multinode"],
)
def test_global_rank_rules(no_rank_env: pytest.MonkeyPatch, env: dict[str, str],
                           expected: int) -> None:
    """RANK, then SLURM_PROCID, then LOCAL_RANK on one node, else 0 (DESIGN "Ranks")."""
    for var, value in env.items():
        no_rank_env.setenv(var, value)
    assert rdist.global_rank() == expected
    assert rdist.is_rank_zero() is (expected == 0)


@pytest.mark.parametrize(
    "env",
    [
        {"LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"},
        {"RANK": "zero"},
        {"SLURM_PROCID": "1.0"},
        {"LOCAL_RANK": "x"},
    ],
    ids=["local-rank-multinode", "rank-not-int", "slurm-not-int", "local-not-int"],
)
def test_global_rank_refuses_to_guess(no_rank_env: pytest.MonkeyPatch,
                                      env: dict[str, str]) -> None:
    """A LOCAL_RANK that could be any node's, or a non-integer rank, is refused: guessing 0
    would let two processes write as rank 0."""
    for var, value in env.items():
        no_rank_env.setenv(var, value)
    with pytest.raises(AmbiguousRankError) as info:
        rdist.global_rank()
    assert isinstance(info.value, RuntimeError)


def test_global_rank_is_read_at_every_call(no_rank_env: pytest.MonkeyPatch) -> None:
    """Not cached at import (the seed read it once, so a later RANK was ignored)."""
    assert rdist.global_rank() == 0
    no_rank_env.setenv("RANK", "1")
    assert rdist.global_rank() == 1
    no_rank_env.delenv("RANK")
    assert rdist.global_rank() == 0


@pytest.fixture
def rank_one(no_rank_env: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """This process as rank 1 without a process group; REPRO_HOME and cwd in tmp_path."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    no_rank_env.setattr(constants, "REPRO_HOME", str(home))
    no_rank_env.chdir(cwd)
    no_rank_env.setenv("RANK", "1")
    ArtifactManager.reset_instance()
    yield home, cwd
    ArtifactManager.reset_instance()


def test_rank_one_without_process_group_writes_nothing(rank_one: tuple[Path, Path],
                                                       tmp_path: Path) -> None:
    """A non-zero rank gets a do-nothing run; no store appears anywhere."""
    home, cwd = rank_one
    manager = ArtifactManager()
    source = tmp_path / "weights.bin"
    source.write_bytes(b"\x00" * 1024)
    run = manager.init_run("rank-one", config={"lr": 0.1})
    assert run is not None
    assert (run.is_rank_zero, run.rank, run.id) == (False, 1, None)
    assert manager.log_artifact("weights", "model", data={"w": [1]}) is None
    assert manager.log_artifact("file", "model", file_path=source) is None
    assert manager.use_artifact("weights") is None
    manager.set_run_state("failed", reason="rank 1 says so")
    manager.finalize_run()
    assert manager.current_run is None
    assert not home.exists()
    assert list(cwd.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "weights.bin"]


def test_rank_one_run_id_comes_from_environment(rank_one: tuple[Path, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a process group, a launcher may hand rank 0's id to other ranks in
    REPRO_RUN_ID; it is used verbatim and nothing is written."""
    home, _ = rank_one
    monkeypatch.setenv("REPRO_RUN_ID", "abc123")
    run = ArtifactManager().init_run("rank-one")
    assert run is not None and run.id == "abc123" and not run.is_rank_zero
    ArtifactManager().finalize_run()
    assert not home.exists()


def test_rank_one_read_apis_create_no_store(rank_one: tuple[Path, Path]) -> None:
    """DESIGN: only global rank 0 touches the store and the registry — reads included (they
    used to open, and so create, a store in rank 1's REPRO_HOME). With nobody to ask, rank 1
    gets empty answers."""
    home, cwd = rank_one
    manager = ArtifactManager()
    manager.init_run("rank-one")
    assert manager.list_artifacts() == []
    assert manager.list_artifacts("weights") == []
    assert not manager.get_lineage("weights:v1")
    assert not manager.get_run("0123456789ab")
    manager.finalize_run()
    assert not home.exists()
    assert list(cwd.iterdir()) == []


# -- fingerprints, the scope and the ledger, in this process ----------------------------------

GOLDEN_CALL = Call("log_artifact", "model", {
    "type": "model", "data": b"solo", "file_path": None, "parent_artifacts": ["data:v0"],
    "aliases": ("best",)})


def test_fingerprint_is_pinned() -> None:
    """The encoding is part of the protocol between ranks (and between repro versions on one
    job): a change must be deliberate."""
    assert GOLDEN_CALL.fingerprint == "b75501382bc3bf9cf6ba8185a55d2d9c"
    assert GOLDEN_CALL.parts["data"] == "7fe7ee658d4f8a1eb936fa005697633e"
    assert GOLDEN_CALL.label == "log_artifact('model')"


def test_fingerprint_is_the_same_in_another_process() -> None:
    """No ``hash()``, ``id()`` or dict order: another interpreter, another hash seed and
    another insertion order give the same fingerprint."""
    code = (
        "from repro_core.distributed import Call\n"
        "args = {'aliases': ('best',), 'parent_artifacts': ['data:v0'], 'file_path': None,\n"
        "        'data': b'solo', 'type': 'model'}\n"
        "print(Call('log_artifact', 'model', args).fingerprint)\n"
        "print(Call('x', '', {'d': {'b': {3, 1, 2}, 'a': 1.5}}).fingerprint)\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    here = Call("x", "", {"d": {"a": 1.5, "b": {2, 3, 1}}}).fingerprint
    assert out == [GOLDEN_CALL.fingerprint, here]


def test_fingerprint_tells_content_apart_and_ignores_spelling() -> None:
    def fp(**args: object) -> str:
        return Call("log_artifact", "model", args).fingerprint

    assert fp(data=b"solo") != fp(data=b"shared")
    assert fp(data={"step": 1}) != fp(data={"step": 2})
    assert fp(data={"a": 1, "b": 2}) == fp(data={"b": 2, "a": 1})
    assert fp(file_path="ckpt/last.ckpt") == fp(file_path=Path("ckpt/last.ckpt"))
    assert fp(file_path="a.bin") != fp(file_path="b.bin")
    assert fp(type=ArtifactType.MODEL) == fp(type="model")
    assert fp(aliases=["best"]) != fp(aliases=None)
    assert Call("use_artifact", "a").fingerprint != Call("use_artifact", "b").fingerprint
    assert Call("use_artifact", "a").fingerprint != Call("get_run", "a").fingerprint


def test_fingerprint_of_arrays_and_tensors_follows_content() -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")

    def fp(data: object) -> str:
        return Call("log_artifact", "w", {"data": data}).fingerprint

    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert fp(array) == fp(array.copy()) == fp(np.asfortranarray(array))
    assert fp(array) != fp(array.astype(np.float64)) != fp(array + 1)
    big = torch.zeros(1000, 1000)
    changed = big.clone()
    changed[999, 999] = 1.0  # the last element is always sampled
    assert fp({"w": big}) == fp({"w": big.clone()})
    assert fp({"w": big}) != fp({"w": changed})
    assert fp({"w": big}) != fp({"w": big.to(torch.float16)})
    assert fp({"w": big}) != fp({"w": big.reshape(1000000)})
    strided = torch.arange(200.0).reshape(10, 20)  # > 64 elements: sampled through strides
    assert fp({"w": strided.t()}) == fp({"w": strided.t().contiguous()})  # layout in memory
    assert fp({"w": torch.nn.Parameter(strided)}) == fp({"w": strided})


def test_fingerprint_reads_every_kind_of_tensor() -> None:
    """Odd dtypes and shapes are sampled, not crashed on (a quantized tensor's byte view once
    crashed torch.cat): the same values give the same fingerprint."""
    pytest.importorskip("torch")
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        quantized = torch.quantize_per_tensor(torch.ones(100), 0.1, 0, torch.qint8)
    tensors = {
        "bool": torch.ones(100, dtype=torch.bool), "bf16": torch.ones(100, dtype=torch.bfloat16),
        "complex": torch.ones(100, dtype=torch.complex64), "scalar": torch.tensor(3.0),
        "f8": torch.ones(100).to(torch.float8_e4m3fn), "empty": torch.empty(0, 5),
        "grad": torch.ones(100, requires_grad=True), "sliced": torch.ones(30, 40)[:, ::3],
        "quantized": quantized,
    }
    first = Call("log_artifact", "w", {"data": tensors}).fingerprint
    copies = {key: value.clone() for key, value in tensors.items()}
    assert Call("log_artifact", "w", {"data": copies}).fingerprint == first


def test_fingerprint_never_indexes_tensor_subclasses() -> None:
    """A DTensor-like subclass may run a collective when indexed; inside rank-0-only code that
    would hang the job, so only its dtype and shape are used."""
    pytest.importorskip("torch")
    import torch

    class Sharded(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            if func is torch.Tensor.__getitem__:
                raise AssertionError("indexed a tensor subclass")
            return super().__torch_function__(func, types, args, kwargs or {})

    tensor = torch.zeros(100, 100).as_subclass(Sharded)
    call = Call("log_artifact", "w", {"data": {"w": tensor}})
    assert call.fingerprint == Call("log_artifact", "w", {"data": {"w": tensor}}).fingerprint


def test_fingerprint_never_raises() -> None:
    """Validation is rank 0's job: whatever a rank passes, every rank gets the same digest."""
    cyclic: dict[str, Any] = {}
    cyclic["self"] = cyclic
    for value in (cyclic, {1: "a", "b": 2}, object(), float("nan"), {frozenset({1})},
                  [b"x", bytearray(b"y"), memoryview(b"z")]):
        first = Call("log_artifact", "x", {"data": value}).fingerprint
        assert Call("log_artifact", "x", {"data": value}).fingerprint == first
    assert (Call("use_artifact", 3).fingerprint  # type: ignore[arg-type]
            == Call("use_artifact", 3).fingerprint)  # type: ignore[arg-type]


def test_rank_zero_only_scope_is_per_thread_and_nests() -> None:
    """A contextvar: another thread of rank 0 keeps publishing while one thread is inside."""
    entered, checked = threading.Event(), threading.Event()
    seen: list[bool] = []

    def other() -> None:
        entered.wait(30)
        seen.append(rdist.in_rank_zero_only())
        checked.set()

    thread = threading.Thread(target=other)
    thread.start()
    scope = rdist.rank_zero_only()
    with scope:
        with scope:
            assert rdist.in_rank_zero_only()
        assert rdist.in_rank_zero_only()
        entered.set()
        assert checked.wait(30)
    thread.join(30)
    assert seen == [False]
    assert not rdist.in_rank_zero_only()
    with pytest.raises(KeyError), rdist.rank_zero_only():
        raise KeyError("x")
    assert not rdist.in_rank_zero_only()


def test_rank_zero_only_decorator_runs_on_rank_zero_only(no_rank_env: pytest.MonkeyPatch
                                                         ) -> None:
    calls: list[bool] = []

    @rdist.rank_zero_only
    def save(x: int) -> int:
        calls.append(rdist.in_rank_zero_only())
        return x + 1

    @rdist.rank_zero_only()
    def other() -> str:
        return "ran"

    assert (save(1), other(), calls) == (2, "ran", [True])
    no_rank_env.setenv("RANK", "1")
    assert (save(1), other(), calls) == (None, None, [True])


def test_rank_zero_only_calls_on_other_ranks_return_none(rank_one: tuple[Path, Path]) -> None:
    home, _ = rank_one
    manager = ArtifactManager()
    manager.init_run("rank-one")
    with rdist.rank_zero_only():
        assert manager.log_artifact("weights", "model", data={"w": [1]}) is None
        assert manager.list_artifacts() == []
    manager.finalize_run()
    assert not home.exists()


def test_calls_every_rank_makes_are_refused_in_scope(no_rank_env: pytest.MonkeyPatch) -> None:
    """init_run / finalize_run inside rank_zero_only() would leave rank 1 waiting at a
    barrier rank 0 never reaches: refused at once, before ``fn`` runs, on every rank."""
    ran: list[int] = []
    exchange = rdist.Exchange()
    with rdist.rank_zero_only():
        with pytest.raises(rdist.RankMismatchError) as info:
            exchange.run_on_zero(rdist.Call("init_run", every_rank=True),
                                 lambda: ran.append(1), encode=str, decode=str)
        assert info.value.calls == ("init_run()",)
        with pytest.raises(rdist.RankMismatchError):
            exchange.finalize_barrier("finalize/x")
    assert ran == []
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ReproError)


def test_exchange_without_process_group(no_rank_env: pytest.MonkeyPatch) -> None:
    """Rank 0 runs the call; another rank has nobody to ask and gets None."""
    exchange = rdist.Exchange()
    assert exchange.run_on_zero(rdist.Call("get_run", "x"), lambda: 7, str, int) == 7
    assert exchange.run_on_zero("legacy:name", lambda: 8, str, int) == 8
    no_rank_env.setenv("RANK", "1")
    assert exchange.run_on_zero(rdist.Call("get_run", "x"), lambda: 7, str, int) is None


def _ledger(*answers: tuple[str, str | None]) -> Ledger:
    """A ledger where rank 0 answered ``(fingerprint, answer)`` in this order (g = index);
    None: a call rank 0 never made, refused at finalize."""
    ledger = Ledger()
    for fp, tag in answers:
        n, _ = ledger.reserve(fp, f"call({fp})")
        if tag is not None:
            ledger.answer(fp, n, tag)
    return ledger


@pytest.mark.parametrize(
    ("answers", "flow", "suspects"),
    [
        # solo read A, solo write, shared read A (other answer): rank 1 took g0 — a guess
        ([("A", "v0"), ("W", "w"), ("A", "v1")], [("A", 0)], ["call(A)"]),
        # the same with identical answers: whichever it took, it is right
        ([("A", "v0"), ("W", "w"), ("A", "v0")], [("A", 0)], []),
        # a shared call B after rank 1's read closes the window: a later solo A is no candidate
        ([("A", "v0"), ("B", "b"), ("A", "v1")], [("A", 0), ("B", 1)], []),
        # reading again alone with the same answer between shared calls (eval on rank 0)
        ([("A", "v0"), ("A", "v0"), ("B", "b"), ("A", "v1")],
         [("A", 0), ("B", 2), ("A", 3)], []),
        # the bound comes from the *latest* possible pair of the next call, not the one taken
        ([("A", "a1"), ("W", "w"), ("B", "b"), ("A", "a2"), ("B", "b")],
         [("A", 0), ("B", 2)], ["call(A)"]),
        # an answer rank 0 never gave (refused at finalize) is not a different answer
        ([("A", "v0"), ("A", None)], [("A", 0)], []),
    ],
    ids=["solo-read-write-read", "same-answer", "closed-window", "eval-on-rank-0",
         "transitive-bound", "refused"],
)
def test_ledger_flags_exactly_the_pairings_that_may_be_wrong(
    answers: list[tuple[str, str | None]], flow: list[tuple[str, int]], suspects: list[str],
) -> None:
    assert _ledger(*answers).suspects(flow) == suspects
