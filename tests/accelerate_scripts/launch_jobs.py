"""The test side of multi-process Accelerate launches: start ``torchrun`` / ``accelerate
launch`` jobs in sessions of their own, wait for them with a deadline (a hang fails the test
and the whole job is killed), signal them, and read what they left in the store.

Imported by ``tests/test_accelerate_launch.py`` (``tests/`` is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from repro_core import ArtifactManager
from repro_core.registry import Registry, RunRow

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "launch_train.py"
EXAMPLE = HERE.parent.parent / "examples" / "accelerate_train.py"
# What a parent process may carry that would change what a launch does.
_INHERITED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
              "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
              "REPRO_RUN_ID", "REPRO_BARRIER_TIMEOUT", "PL_GLOBAL_SEED", "HF_HOME")
_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_", "PET_", "WANDB_")


def torchrun(script: Path, *args: str, nproc: int = 2) -> list[str]:
    """``torchrun --standalone``: its own rendezvous on ``localhost:0`` (a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(nproc), str(script), *args]


def accelerate_launch(script: Path, *args: str) -> list[str]:
    """``accelerate launch --multi_gpu`` (no GPU here: the script asks for CPU itself); port
    0 lets the rendezvous store pick a free port."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", "0", str(script), *args]


def job_env(home: Path, barrier_timeout: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _INHERITED and not k.startswith(_PREFIXES)}
    env.update(REPRO_HOME=str(home / "store"), REPRO_BARRIER_TIMEOUT=str(barrier_timeout),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HOME=str(home / "hf"))
    return env


@dataclass
class Job:
    """One launch. ``home``: its working directory, shared by relaunches (store, checkpoints);
    ``tag``: this launch's own ``home/<tag>/`` (the script's ``--out``) and ``<tag>.log``."""

    tag: str
    home: Path
    proc: subprocess.Popen[bytes]
    started: float  # time.time()
    timeout: float  # seconds: past them it is a hang, killed with everything it started
    ended: float | None = None
    hung: bool = False
    seen: dict[int, psutil.Process] = field(default_factory=dict)  # every process it ran

    @property
    def name(self) -> str:
        return f"{self.home.name}/{self.tag}"

    @property
    def store(self) -> Path:
        return self.home / "store"

    @property
    def out(self) -> Path:
        return self.home / self.tag

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def seconds(self) -> float:
        assert self.ended is not None, f"{self.name} still running"
        return self.ended - self.started

    @property
    def log(self) -> str:
        return (self.home / f"{self.tag}.log").read_text(errors="replace")

    def tail(self) -> str:
        return f"--- {self.name} (exit {self.returncode}) ---\n{self.log[-6000:]}"

    def poll(self) -> bool:
        """Whether it has ended (its end time is recorded when first seen); one running past
        its timeout is killed, with every process it started, and marked ``hung``."""
        self.note_processes()
        if self.ended is None and self.proc.poll() is None \
                and time.time() - self.started > self.timeout:
            self.hung = True
            self.kill_all()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self.ended is None and self.proc.poll() is not None:
            self.ended = time.time()
        return self.ended is not None

    def note_processes(self) -> None:
        """Remember the launcher's descendants (the ranks live in sessions of their own, so a
        signal to the launcher's group does not reach them)."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)

    def ranks(self) -> list[psutil.Process]:
        self.note_processes()
        return [p for p in self.seen.values() if _running(p)]

    def signal(self, sig: int) -> None:
        """``sig`` to the launcher's process group (what a scheduler sends the job step)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill_all(self) -> None:
        """SIGKILL the launcher and every process it started (a hung or leftover job)."""
        self.note_processes()
        self.signal(signal.SIGKILL)
        for process in self.seen.values():
            if _running(process):
                with contextlib.suppress(psutil.Error, ProcessLookupError):
                    process.kill()

    def text(self, name: str) -> str:
        return (self.out / name).read_text()

    def result(self, rank: int) -> dict[str, Any]:
        path = self.out / f"rank{rank}.json"
        assert path.exists(), f"{path} missing\n{self.tail()}"
        return json.loads(path.read_text())  # type: ignore[no-any-return]

    def tensors(self, name: str) -> dict[str, Any]:
        return torch.load(self.out / name, weights_only=False)  # type: ignore[no-any-return]

    def ended_by_itself(self) -> Job:
        assert self.ended is not None and not self.hung, \
            f"still running after {self.timeout:.0f}s (a hang)\n{self.tail()}"
        return self

    def check(self) -> Job:
        assert self.ended_by_itself().returncode == 0, self.tail()
        return self


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def start(home: Path, command: list[str], *, barrier_timeout: float, timeout: float,
          tag: str = "out") -> Job:
    """Start ``command`` in ``home`` (created; relaunches reuse it) with the store
    ``home/store``; output goes to ``home/<tag>.log``."""
    (home / tag).mkdir(parents=True, exist_ok=True)
    with open(home / f"{tag}.log", "wb") as log:
        proc = subprocess.Popen(command, cwd=home, env=job_env(home, barrier_timeout),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return Job(tag, home, proc, time.time(), timeout)


def cleanup(jobs: list[Job]) -> None:
    """Nothing a test started outlives it."""
    for job in jobs:
        job.kill_all()
        with contextlib.suppress(subprocess.TimeoutExpired):
            job.proc.wait(10)


def gone(pids: list[int], timeout: float) -> bool:
    """Whether these processes are gone (reaped, not even zombies) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while any(psutil.pid_exists(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# -- reading a store -------------------------------------------------------------------------


def runs(store: Path) -> list[RunRow]:
    registry = Registry(store / "registry.sqlite", readonly=True)
    try:
        return registry.list_runs()
    finally:
        registry.close()


def state_history(store: Path, run_id: str) -> list[str]:
    registry = Registry(store / "registry.sqlite", readonly=True)
    try:
        return [state for state, _, _ in registry.run_state_history(run_id)]
    finally:
        registry.close()


def read_registry(store: Path, read: Callable[[Registry], Any]) -> Any:
    registry = Registry(store / "registry.sqlite", readonly=True)
    try:
        return read(registry)
    finally:
        registry.close()


@contextlib.contextmanager
def opened(store: Path) -> Iterator[ArtifactManager]:
    """The process's ``ArtifactManager`` pointed at ``store`` (read-only use), reset after."""
    manager = ArtifactManager.reset_instance()
    manager.set_root(store)
    try:
        yield manager
    finally:
        ArtifactManager.reset_instance()


def steps(points: list[tuple[int, float, float]]) -> list[int]:
    return [step for step, _, _ in points]


def tensors_equal(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two nested state dicts differ (tensors with ``torch.equal``); [] if nowhere."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        return [d for k in a for d in tensors_equal(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in tensors_equal(x, y,
                                                                                f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


# -- running several launches at once -------------------------------------------------------


@dataclass
class Plan:
    """A launch to start (``begin``) once the launch named ``after`` has ended."""

    begin: Callable[[], Job]
    after: str | None = None


def run_plans(plans: dict[str, Plan], *, parallel: int,
              step: Callable[[dict[str, Job]], None] | None = None) -> dict[str, Job]:
    """Run every plan, at most ``parallel`` at a time, calling ``step`` between polls (to
    signal a job when it reaches a point). A job past its own timeout is killed and marked
    ``hung`` (its tests fail, the others go on): a hang never blocks the suite."""
    jobs: dict[str, Job] = {}
    try:
        while True:
            _begin_ready(plans, jobs, parallel)
            if step is not None:
                step(jobs)
            if all(job.poll() for job in jobs.values()) and not _startable(plans, jobs):
                return jobs
            time.sleep(0.05)
    except BaseException:
        cleanup(list(jobs.values()))
        raise


def _startable(plans: dict[str, Plan], jobs: dict[str, Job]) -> list[str]:
    return [name for name, plan in plans.items() if name not in jobs and (
        plan.after is None or (plan.after in jobs and jobs[plan.after].poll()))]


def _begin_ready(plans: dict[str, Plan], jobs: dict[str, Job], parallel: int) -> None:
    running = sum(1 for job in jobs.values() if not job.poll())
    for name in _startable(plans, jobs)[:max(0, parallel - running)]:
        jobs[name] = plans[name].begin()
