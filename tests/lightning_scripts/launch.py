"""The test side of ``train.py``: start it in a fresh interpreter and read what it wrote."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TRAIN = Path(__file__).resolve().parent / "train.py"
# Variables a parent process may carry that would change what the child does.
_INHERITED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK",
              "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS", "REPRO_RUN_ID",
              "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "CUBLAS_WORKSPACE_CONFIG")


def script_env(store: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _INHERITED and not k.startswith(("WANDB_", "PL_"))}
    env.update(REPRO_HOME=str(store), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class Fit:
    """One finished ``train.py`` process."""

    out: Path
    tag: str
    returncode: int
    log: str
    seconds: float

    def result(self, rank: int = 0) -> dict[str, Any]:
        path = self.out / f"{self.tag}.rank{rank}.json"
        assert path.exists(), f"{path} missing (exit {self.returncode}):\n{self.log[-6000:]}"
        return json.loads(path.read_text())  # type: ignore[no-any-return]

    def tensors(self, what: str, rank: int = 0) -> Any:
        return torch.load(self.out / f"{self.tag}.rank{rank}.{what}.pt", weights_only=True)

    def check(self) -> Fit:
        assert self.returncode == 0, self.log[-6000:]
        return self


def start(out: Path, store: Path, tag: str, *args: str, **env: str) -> subprocess.Popen[str]:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(TRAIN), "--out", str(out), "--tag", tag, *args]
    # A session of its own: a hung job is killed with every rank Lightning started for it.
    return subprocess.Popen(command, env=script_env(store, **env), cwd=out,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen[str], out: Path, tag: str, timeout: float,
           started: float | None = None) -> Fit:
    """Wait for ``proc``; a process still running after ``timeout`` is killed (a hang)."""
    started = time.monotonic() if started is None else started
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        log, _ = proc.communicate()
        raise AssertionError(f"train.py {tag} still running after {timeout}s:\n"
                             f"{log[-6000:]}") from None
    return Fit(out, tag, proc.returncode, log, time.monotonic() - started)


def run(out: Path, store: Path, tag: str, *args: str, timeout: float = 180.0,
        **env: str) -> Fit:
    started = time.monotonic()
    return finish(start(out, store, tag, *args, **env), out, tag, timeout, started)


def run_together(jobs: list[tuple[Path, Path, str, list[str]]], timeout: float = 180.0
                 ) -> list[Fit]:
    """Several ``train.py`` processes at once (independent stores or tags)."""
    started = time.monotonic()
    procs = [(start(out, store, tag, *args), out, tag) for out, store, tag, args in jobs]
    try:
        return [finish(proc, out, tag, timeout, started) for proc, out, tag in procs]
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                kill_group(proc)
                proc.communicate()


def kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the job's process group (its leader ``proc`` and the ranks it launched)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def pid_of(out: Path, tag: str, rank: int) -> int:
    return int((out / f"{tag}.rank{rank}.pid").read_text())


def alive(pid: int) -> bool:
    """Whether ``pid`` is still running (a zombie waiting to be reaped is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
