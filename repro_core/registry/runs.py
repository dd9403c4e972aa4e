"""Runs in the registry: create, state changes with history, lookups by id or unique prefix,
and telling a run whose process died (``kill -9``, OOM killer) from one still running.

A run records its host, pid and the pid's start time. When a store is opened on the same host
and that process is gone (or the pid now belongs to a younger process), the run cannot finish
any more: it is CRASHED, as W&B shows such runs. Writers record the transition once (with the
time it was noticed in the state history); read-only openers show it without writing.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ..capture.scrub import scrub_text
from ..errors import ArtifactNotFoundError, InvalidArgumentError, RunStateError
from ..types import RunState, utc_now
from .connection import Connection
from .records import RUN_COLUMNS, RunRow, dumps, run_row

__all__ = ["RunQueries", "is_alive_here", "is_crashed", "process_namespace",
           "process_start_time"]

_MIN_PREFIX = 4
# Process start times are read from /proc in clock ticks: allow for the rounding.
_START_TOLERANCE = 1.0


def process_start_time(pid: int) -> float | None:
    """Start time (unix seconds) of a live process, None when there is none with that pid."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None  # dead, not yet reaped (a parent that never waits: no init in a
            # container, an orphaned rank): its run is over, and may be resumed
        return float(process.create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except (psutil.AccessDenied, OSError, ValueError):
        return -1.0  # alive but unreadable: never call it crashed


def process_namespace() -> str | None:
    """``"<boot id>/<pid namespace inode>"`` of this process: a pid means something only in
    the same boot and pid namespace (two containers on one host share a host name, not pids)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def is_crashed(run: RunRow, host: str | None = None, namespace: str | None = None) -> bool:
    """A RUNNING run of this host whose process is gone or was replaced by another. A run
    from another pid namespace of this host (a container) cannot be judged: its pid means
    nothing here. One from an earlier boot is gone for sure."""
    if run.state != RunState.RUNNING.value or not run.pid or run.host != (
            host or socket.gethostname()):
        return False
    here = namespace or process_namespace()
    if run.process_ns is not None and here is not None and run.process_ns != here:
        return run.process_ns.split("/")[0] != here.split("/")[0]  # rebooted since: gone
    started = process_start_time(int(run.pid))
    if started is None:
        return True
    if started < 0 or run.pid_started is None:
        return False  # cannot tell (no start time recorded before schema v4)
    return abs(started - run.pid_started) > _START_TOLERANCE


def is_alive_here(run: RunRow) -> bool:
    """A RUNNING run whose process provably still runs (this host, this pid namespace, same
    pid with the same start time). A run of another host cannot be proven alive: a preempted
    job that resumes on another node must not be locked out by its own dead process."""
    if run.state != RunState.RUNNING.value or not run.pid or run.host != socket.gethostname():
        return False
    here = process_namespace()
    if run.process_ns is not None and here is not None and run.process_ns != here:
        return False
    started = process_start_time(int(run.pid))
    if started is None:
        return False
    if started < 0 or run.pid_started is None:
        return True
    return abs(started - run.pid_started) <= _START_TOLERANCE


class RunQueries(Connection):
    """Run rows. Run ids are 12 hex digits; any unique prefix of 4+ digits names a run."""

    def create_run(self, run: RunRow) -> None:
        with self._write() as conn:
            conn.execute(
                f"INSERT INTO runs ({RUN_COLUMNS}) VALUES ({', '.join('?' * 14)})",
                (run.id, run.name, run.project, run.state, dumps(run.tags), dumps(run.config),
                 run.created_at, run.ended_at, run.host, run.pid, run.world_size,
                 run.pid_started, run.process_ns, run.segment),
            )
            conn.execute(
                "INSERT INTO run_states (run_id, state, at, reason) VALUES (?, ?, ?, NULL)",
                (run.id, run.state, run.created_at),
            )

    def set_run_state(self, run_id: str, state: str, *, reason: str | None = None,
                      ended: bool = False) -> None:
        """Record a state change. ``reason`` is free text (often an exception message, which
        may quote a URL with credentials), so it is scrubbed here, where every path meets."""
        reason = scrub_text(reason) if reason else reason
        now = utc_now()
        with self._write() as conn:
            conn.execute(
                "UPDATE runs SET state = ?, ended_at = CASE WHEN ? = 1 THEN ? ELSE ended_at END "
                "WHERE id = ?",
                (state, 1 if ended else 0, now, run_id),
            )
            conn.execute(
                "INSERT INTO run_states (run_id, state, at, reason) VALUES (?, ?, ?, ?)",
                (run_id, state, now, reason),
            )

    def resume_run(self, run_id: str, owner: RunRow, *, reason: str,
                   config: dict[str, object] | None = None) -> RunRow:
        """Reattach run ``run_id`` (exact id) to the process described by ``owner`` (its host,
        pid, pid start time, namespace, world size): RUNNING again, one more metrics segment,
        the resume recorded in the state history after whatever ended it (INTERRUPTED, FAILED,
        CRASHED, COMPLETED), ``config`` (if given) replacing the stored one — all in one
        transaction. Refused while a live process on this host still runs it."""
        with self._write() as conn:
            found = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?",
                                 (run_id,)).fetchone()
            if found is None:
                raise ArtifactNotFoundError(f"no run with id {run_id!r} to resume", key=run_id)
            run = run_row(found)
            if is_alive_here(run):
                raise RunStateError(
                    f"run {run_id} is still running in process {run.pid} on {run.host}; "
                    "stop it before resuming the run elsewhere")
            now = utc_now()
            if run.state == RunState.RUNNING.value:  # its process died unnoticed: say so
                conn.execute("INSERT INTO run_states (run_id, state, at, reason) VALUES"
                             " (?, ?, ?, ?)", (run_id, RunState.CRASHED.value, now,
                                               _crash_reason(run)))
            conn.execute(
                "UPDATE runs SET state = ?, ended_at = NULL, host = ?, pid = ?, pid_started = ?,"
                " process_ns = ?, world_size = ?, segment = segment + 1,"
                " config = COALESCE(?, config) WHERE id = ?",
                (RunState.RUNNING.value, owner.host, owner.pid, owner.pid_started,
                 owner.process_ns, owner.world_size, None if config is None else dumps(config),
                 run_id))
            conn.execute("INSERT INTO run_states (run_id, state, at, reason) VALUES"
                         " (?, ?, ?, ?)", (run_id, RunState.RUNNING.value, now,
                                           scrub_text(reason)))
        return self.get_run(run_id)

    def has_run(self, run_id: str) -> bool:
        """Whether a run with exactly this id exists (no prefix matching)."""
        return bool(self._read("SELECT 1 FROM runs WHERE id = ?", (run_id,)))

    def next_metric_step(self, run_id: str, *, hardware: bool = False) -> int:
        """One past the highest step the run logged: where a resumed run's automatic steps
        continue. The ``hardware/…`` series ``ExperimentContext`` stores are indexed by sample
        number, not by step (``advance=False``): they do not count — ``hardware=True`` asks
        for the next sample number instead (a resumed run's samples continue after it)."""
        test = "=" if hardware else "!="
        row = self._read("SELECT MAX(c.last_step) FROM metric_chunks c JOIN metric_series s"
                         " ON s.id = c.series_id WHERE s.run_id = ? AND"
                         f" substr(s.key, 1, 9) {test} 'hardware/'", (run_id,))
        last = row[0][0] if row else None
        return int(last) + 1 if isinstance(last, int) and last >= 0 else 0

    def get_run(self, run_id: str) -> RunRow:
        """The run with this id (or unique id prefix); CRASHED when its process is gone."""
        full = self.resolve_run_id(run_id)
        rows = self._read(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (full,))
        if not rows:
            raise ArtifactNotFoundError(f"no run with id {run_id!r}", key=run_id)
        return self._effective(run_row(rows[0]))

    def list_runs(self) -> list[RunRow]:
        rows = self._read(f"SELECT {RUN_COLUMNS} FROM runs ORDER BY created_at")
        host = socket.gethostname()
        return [self._effective(run_row(r), host) for r in rows]

    def resolve_run_id(self, text: str) -> str:
        """The full id of the run ``text`` names: the id itself or a unique prefix of it."""
        if not isinstance(text, str) or not text or "\x00" in text or len(text) > 64:
            raise InvalidArgumentError(f"invalid run id {text!r}", argument="run_id")
        if self._read("SELECT 1 FROM runs WHERE id = ?", (text,)):
            return text
        if len(text) < _MIN_PREFIX:
            raise ArtifactNotFoundError(
                f"no run with id {text!r} (a run-id prefix needs at least {_MIN_PREFIX} "
                "characters)", key=text)
        pattern = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        matches = [r[0] for r in self._read(
            "SELECT id FROM runs WHERE id LIKE ? ESCAPE '\\' ORDER BY id LIMIT 6", (pattern,))]
        if len(matches) == 1:
            return str(matches[0])
        if not matches:
            raise ArtifactNotFoundError(f"no run with id {text!r}", key=text)
        raise ArtifactNotFoundError(
            f"run id prefix {text!r} is ambiguous ({', '.join(matches[:5])}"
            f"{', …' if len(matches) > 5 else ''}); give more characters", key=text)

    def run_state_history(self, run_id: str) -> list[tuple[str, str, str | None]]:
        full = self.resolve_run_id(run_id)
        history = [(r[0], r[1], r[2]) for r in self._read(
            "SELECT state, at, reason FROM run_states WHERE run_id = ? ORDER BY rowid", (full,))]
        if self.readonly and history and history[-1][0] == RunState.RUNNING.value:
            run = self.get_run(full)
            if run.state == RunState.CRASHED.value:
                history.append((run.state, utc_now(), _crash_reason(run)))
        return history

    def mark_crashed_runs(self) -> list[str]:
        """Record CRASHED for every RUNNING run of this host whose process is gone (writers
        call this when they open a store). Returns the ids marked."""
        host = socket.gethostname()
        rows = self._read(f"SELECT {RUN_COLUMNS} FROM runs WHERE state = ? AND host = ?",
                          (RunState.RUNNING.value, host))
        marked = []
        for run in (run_row(r) for r in rows):
            if is_crashed(run, host):
                with self._write() as conn:  # only if still RUNNING: no lost update
                    changed = conn.execute(
                        "UPDATE runs SET state = ?, ended_at = ? WHERE id = ? AND state = ?",
                        (RunState.CRASHED.value, utc_now(), run.id, RunState.RUNNING.value),
                    ).rowcount
                    if changed:
                        conn.execute("INSERT INTO run_states (run_id, state, at, reason) VALUES"
                                     " (?, ?, ?, ?)", (run.id, RunState.CRASHED.value,
                                                       utc_now(), _crash_reason(run)))
                        marked.append(run.id)
        return marked

    def _effective(self, run: RunRow, host: str | None = None) -> RunRow:
        """What to show: a dead process's RUNNING run is CRASHED even before it is recorded."""
        if is_crashed(run, host):
            return RunRow(**{**run.__dict__, "state": RunState.CRASHED.value})
        return run


def _crash_reason(run: RunRow) -> str:
    return (f"process {run.pid} on {run.host} is gone without finishing the run "
            f"(noticed at {utc_now()})")
