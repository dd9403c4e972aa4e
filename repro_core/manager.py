"""``ArtifactManager``: the one writer. Runs, artifact versions, lineage edges, rank-aware.

The class is assembled from one mixin per concern, each in its own module:

- this module: the singleton, its read-only state, the run lifecycle (init, state, finalize,
  exports) and metrics;
- ``_store_access``: which store, opened how (written only when writing; read-only opens
  never create one; a store replaced under the process is noticed);
- ``_manager_artifacts``: ``log_artifact`` / ``use_artifact`` / ``load_artifact`` (the order
  of every write is drawn there);
- ``_manager_reads``: ``list_artifacts``, ``get_lineage``, ``get_run``, ``get_metrics``;
- ``_manager_local``: rank-local reads and links (``artifact_path``, ``identify_file``,
  ``link_version``) for code where no other rank can answer or wait.

Every rank calls the same API; only global rank 0 touches the store, and other ranks receive
rank 0's answer to the call they made (``distributed``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import threading
import warnings
from pathlib import Path
from typing import Any

from . import _exit, _fsio, constants, distributed
from ._journal import run_export
from ._manager_artifacts import ArtifactsAPI
from ._manager_local import LocalReads
from ._manager_reads import ReadQueries
from ._manager_remote import RemoteMirroring
from ._offline import detect_offline
from ._safepath import real_dirs
from ._store_access import StoreAccess
from .capture import capture_config, scrub, scrub_text
from .errors import (
    ArtifactNotFoundError,
    DistributedTimeoutError,
    InvalidArgumentError,
    RankMismatchError,
    ReproError,
    RunStateError,
    StorageError,
    StoreNotFoundError,
)
from .metrics import MetricsWriter
from .registry import RunRow, VersionRow, process_namespace, process_start_time
from .registry.dialect import check_url
from .registry.target import bind as bind_registry
from .types import (
    ParsedKey,
    Run,
    RunState,
    check_tags,
    check_text,
    parse_key,
    validate_project,
)

__all__ = ["ArtifactManager"]


# Settings a run's writes read later: parsed when the run starts, so a bad value fails
# ``init_run`` before anything is created (as a bad ``REPRO_HASH`` does).
_WRITE_SETTINGS = ("REPRO_FSYNC", "REPRO_VERIFY", "REPRO_MATERIALIZE", "REPRO_CHUNK_MIN_BYTES",
                   "REPRO_ASSEMBLED_CACHE_BYTES")


class ArtifactManager(StoreAccess, ArtifactsAPI, ReadQueries, LocalReads, RemoteMirroring):
    """Singleton manager for all artifact tracking and versioning.

    Thread-safe (an ``RLock``: public methods may call each other) and distributed-aware:
    only global rank 0 writes; other ranks receive rank 0's answers.
    """

    _instance: ArtifactManager | None = None
    _instance_lock = threading.Lock()
    _initialized: bool

    def __new__(cls) -> ArtifactManager:
        with cls._instance_lock:
            if cls._instance is None:
                instance = super().__new__(cls)
                instance._initialized = False
                cls._instance = instance
            return cls._instance

    def __init__(self) -> None:
        if self._initialized:
            return
        self._lock = threading.RLock()
        self._run: Run | None = None
        self._init_store_access()
        self._exchange = distributed.EXCHANGE
        self._metrics: MetricsWriter | None = None
        self._run_pid = os.getpid()
        self._initialized = True

    @classmethod
    def reset_instance(cls) -> ArtifactManager:
        """Drop the singleton (closing its registry) and return a fresh one. For tests and
        for programs that switch stores; an active run is abandoned, not finalized."""
        with cls._instance_lock:
            old, cls._instance = cls._instance, None
        if old is not None:
            if old._metrics is not None and old._run_pid == os.getpid():
                with contextlib.suppress(ReproError):  # write what was logged; stop its thread
                    old._metrics.close()
            old._stop_mirror(0.0)  # its queue stays for the next run with that remote
            old._close_store()
        return cls()

    # -- read-only state (the seed manager exposed these) ------------------------------------

    @property
    def run(self) -> Run | None:
        """The active run, or None."""
        return self._run

    @property
    def current_run(self) -> Run | None:
        return self._run

    @property
    def run_id(self) -> str | None:
        """The active run's id (on every rank), or None."""
        return self._run.id if self._run is not None else None

    @property
    def run_state(self) -> RunState | None:
        """The active run's state, or None when no run is active."""
        return self._run.state if self._run is not None else None

    @property
    def offline_mode(self) -> bool:
        """Whether remote trackers are off: the active run's setting (``_repro.offline`` in its
        config, as ExperimentContext records it), else what auto-detection says."""
        run = self._run
        recorded = run.config.get("_repro", {}) if run is not None else {}
        if isinstance(recorded, dict) and isinstance(recorded.get("offline"), bool):
            return bool(recorded["offline"])
        return detect_offline()

    @property
    def rank(self) -> int:
        """This process's global rank (read now, never cached)."""
        return distributed.global_rank()

    @property
    def world_size(self) -> int:
        return distributed.world_size()

    @property
    def is_distributed(self) -> bool:
        return distributed.world_size() > 1

    def version_id(self, key: str) -> int:
        """The registry id of the version ``key`` names (``name:v3``, ``name:best``, …)."""
        return self._resolve(self._read_registry(), parse_key(key)).id

    def _resolve(self, registry: Any, key: ParsedKey) -> VersionRow:
        """Resolve in the active run's project, then ``default``; without a run, a name that
        only one project holds resolves there too."""
        run = self._run
        return registry.resolve(key, project=run.project if run is not None else None,  # type: ignore[no-any-return]
                                anywhere=run is None)

    # -- runs -------------------------------------------------------------------------------

    def init_run(
        self,
        name: str,
        config: Any | None = None,
        project: str = "default",
        tags: list[str] | None = None,
        *,
        root: str | Path | None = None,
        create: bool | None = None,
        run_id: str | None = None,
        resume: str = "never",
        remote: str | None = None,
        registry: str | None = None,
    ) -> Run:
        """Initialize a new experimental run and record it immediately (a crash keeps it).

        ``config`` may be anything :func:`~repro_core.capture_config` accepts (dict,
        dataclass, Namespace, OmegaConf, …); it is stored as the same JSON
        ``ExperimentContext`` stores, secrets redacted. ``create``: True makes a registry even
        where the store already holds data (``repro init --force``), False never makes one,
        None (default) makes one only in an empty store.

        ``run_id`` + ``resume`` continue a run in a new process (after a preemption, a crash,
        or to evaluate a finished run), as W&B's ``wandb.init(id=..., resume=...)``:
        ``"never"`` (default) makes a new run (with ``run_id`` as its id, refused if taken);
        ``"allow"`` continues run ``run_id`` if it exists, else starts it; ``"must"`` continues
        it or raises ``ArtifactNotFoundError``. A continued run keeps its id, name, tags and
        artifacts, records the resume in its state history, and logs metrics in a new segment
        (``get_metrics``: points re-logged at earlier steps win, the old ones stay queryable).
        ``remote`` (default ``$REPRO_REMOTE``): a remote name or URL every logged version is
        pushed to in the background (``_manager_remote``). ``registry`` (default
        ``$REPRO_REGISTRY``, else the store's own): a ``postgresql://`` URL the store's registry
        lives in (a team's shared server; ``repro_core.registry.target``).
        """
        if create is not None and not isinstance(create, bool):
            raise InvalidArgumentError(f"create must be True, False or None, got {create!r}",
                                       argument="create")
        _check_resume(run_id, resume)
        from .remote._config import check_remote

        check_remote(constants.REPRO_REMOTE if remote is None else remote)  # before any I/O
        for setting in _WRITE_SETTINGS:  # a typo in one is an error before the store exists
            getattr(constants, setting)
        if registry is not None:
            check_url(registry)
        # Names and tags are stored and shown like any other string: scrubbed of credentials.
        name = scrub_text(check_text(name, "name"))
        validate_project(project)
        tag_list = [scrub_text(t) for t in check_tags(tags)]
        config_dict = capture_config(config)
        with self._lock:
            if self._run is not None:
                raise RunStateError(
                    f"run {self._run.id} ({self._run.name!r}) is still active; call "
                    "finalize_run() before init_run()"
                )
            if root is not None:
                self.set_root(root)
            rank = distributed.global_rank()
            if registry is not None:  # every rank: each may open the store itself
                bind_registry(self.root, registry)  # the store's registry from now on
            run = Run(id=None, name=name, project=project, tags=tag_list, config=config_dict,
                      root=self.root, rank=rank)
            answer = self._exchange.run_on_zero(
                distributed.Call("init_run", every_rank=True),
                lambda: self._create_run(run, create, run_id, resume, remote), encode=str,
                decode=str,
            )
            run.id = answer if answer is not None else os.environ.get("REPRO_RUN_ID")
            self._run = run
            self._run_pid = os.getpid()
            _exit.install(_finish_at_exit)
            _exit.reset()
            return run

    def _create_run(self, run: Run, create: bool | None, run_id: str | None,
                    resume: str, remote: str | None = None) -> str:
        self._check_store_identity()
        try:  # resume='must' never makes a store: a mistyped root stays empty
            _, registry = self._open(create=False if resume == "must" and create is None
                                     else create)
        except StoreNotFoundError as exc:
            if resume != "must":
                raise
            raise ArtifactNotFoundError(f"no run {run_id!r} to resume: {exc}",
                                        key=str(run_id)) from exc
        target = self._resolve_remote(registry, remote)  # an unknown one: before the run
        if run_id is not None and registry.has_run(run_id):
            if resume == "never":
                raise RunStateError(
                    f"run {run_id} already exists; pass resume='allow' (or 'must') to continue "
                    "it, or another run_id for a new run")
            self._resume_run(registry, run, run_id)
        elif resume == "must":
            raise ArtifactNotFoundError(
                f"no run {run_id!r} to resume in {self.root} (resume='must'); check the id "
                "and the store (REPRO_HOME / root=), or pass resume='allow' to start it",
                key=str(run_id))
        else:
            run.id = run_id or secrets.token_hex(6)
            try:
                registry.create_run(_owner_row(run))
            except StorageError:
                # Another process created this id between our check and our insert (two
                # jobs resuming one new id at once): the id is taken, so this is a resume
                # (refused while that process holds it) or, with resume='never', a clash.
                if run_id is None or not registry.has_run(run_id):
                    raise
                if resume == "never":
                    raise RunStateError(f"run {run_id} was just created by another process; "
                                        "pass another run_id") from None
                self._resume_run(registry, run, run_id)
        assert run.id is not None
        try:
            self._export_run(run.id, config=run.config)
        except ReproError as exc:
            # The row is committed; do not leave it RUNNING with nobody holding it.
            with contextlib.suppress(ReproError):
                registry.set_run_state(run.id, RunState.FAILED.value, reason=str(exc),
                                       ended=True)
            raise
        self._start_mirror(self.root, target)
        return run.id

    def _resume_run(self, registry: Any, run: Run, run_id: str) -> None:
        """Rank 0: reattach ``run_id`` to this process (``init_run(resume=...)``)."""
        stored = registry.get_run(run_id)
        if stored.project != run.project:
            raise InvalidArgumentError(
                f"run {run_id} belongs to project {stored.project!r}, not {run.project!r}; "
                f"pass project={stored.project!r} to resume it", argument="project")
        run.id = run_id
        changed = _config_changed(run.config, stored.config)
        reason = (f"resumed in process {os.getpid()} on {socket.gethostname()} after "
                  f"{stored.state}" + ("; config updated" if changed else ""))
        row = registry.resume_run(run_id, _owner_row(run), reason=reason,
                                  config=run.config if changed else None)
        run.name, run.tags, run.created_at = row.name, row.tags, row.created_at
        run.config = run.config if changed else row.config
        run.segment = row.segment

    def set_run_state(self, state: RunState | str, *, reason: str | None = None) -> None:
        """Update run state for atomic tracking (recorded with a timestamp in the history)."""
        new_state = RunState.coerce(state)
        with self._lock:
            run = self._require_run("set_run_state")
            run.state = new_state
            if run.is_rank_zero and run.id is not None:
                self._open()[1].set_run_state(run.id, new_state.value, reason=reason,
                                              ended=new_state.is_terminal)

    def finalize_run(self, *, wait_for_ranks: bool = True) -> None:
        """Finalize the current run: every rank meets at a barrier (with a timeout), then rank 0
        marks it COMPLETED (unless already FAILED/INTERRUPTED) and writes ``run.json``.
        Idempotent: a second call does nothing.

        ``wait_for_ranks=False`` is for error paths, where another rank may be dead or stuck
        in a collective: this rank finishes alone, without a barrier (rank 0 records the run's
        end; other ranks only let go of it), instead of waiting ``REPRO_BARRIER_TIMEOUT``."""
        with self._lock:
            run = self._run
            if run is None:
                return
            if not wait_for_ranks:
                self._finish_alone(run)
                return
            if distributed.in_rank_zero_only():  # refused before anything changes
                raise RankMismatchError(
                    "finalize_run() involves every rank: call it outside rank_zero_only()",
                    calls=["finalize_run()"])
            try:
                self._exchange.finalize_barrier(f"finalize/{run.id}")
            except BaseException as exc:
                if run.is_rank_zero:
                    self._finish(run, RunState.FAILED, reason=f"finalize barrier: {exc}")
                self._run = None
                raise
            try:
                final = run.state if run.state.is_terminal else RunState.COMPLETED
                state = self._exchange.run_on_zero(
                    distributed.Call("finalize_run", str(run.id), every_rank=True),
                    lambda: self._finish_paired(run, final), encode=str, decode=str,
                )
                run.state = RunState.coerce(state or final)
            finally:
                self._run = None
                self._wait_for_ranks(run)  # also after an error: rank 0 may host the store

    def _finish_alone(self, run: Run) -> None:
        try:
            if run.is_rank_zero and run.id is not None:
                self._finish(run, run.state if run.state.is_terminal else RunState.COMPLETED)
        finally:
            self._run = None

    def _finish_paired(self, run: Run, final: RunState) -> str:
        """Rank 0 after the finalize barrier: a run where another rank may hold the answer to
        a call rank 0 made alone is FAILED, and every rank gets the RankMismatchError."""
        try:
            self._exchange.verify_pairing()
        except RankMismatchError as exc:
            self._finish(run, RunState.FAILED, reason=str(exc))
            raise
        return self._finish(run, final)

    def _wait_for_ranks(self, run: Run) -> None:
        """Keep rank 0 (which may host the process group's store) alive until every rank has
        read its finalize answer; a rank that vanished meanwhile is only worth a warning."""
        try:
            distributed.barrier(f"finalized/{run.id}")
        except DistributedTimeoutError as exc:
            warnings.warn(f"run {run.id} is finalized, but {exc}", RuntimeWarning,
                          stacklevel=3)

    def _finish(self, run: Run, state: RunState, *, reason: str | None = None) -> str:
        assert run.id is not None
        writer, self._metrics = self._metrics, None
        if writer is not None:
            try:
                # Every buffered metric is durable before the run is "done": written, or (when
                # the registry keeps failing, e.g. a full disk) spilled to store/spill/ for the
                # next open to import. Only when even the spill failed does this raise; the
                # writer stays registered and retries at interpreter exit.
                spilled = writer.close()
            except BaseException as exc:
                state, reason = RunState.FAILED, f"flushing metrics failed: {exc}"
                self._open()[1].set_run_state(run.id, state.value, reason=reason, ended=True)
                raise
            if spilled:
                note = (f"{spilled.points} metric points and {spilled.rows} rows spilled to "
                        f"{', '.join(f.name for f in spilled.files)}; imported on next open")
                reason = f"{reason}; {note}" if reason else note
        run.state = state
        registry = self._open()[1]
        current = registry.get_run(run.id)
        if current.state != state.value or current.ended_at is None or reason is not None:
            # not already recorded by set_run_state(): one history row per transition
            registry.set_run_state(run.id, state.value, reason=reason, ended=True)
        self._export_run(run.id)
        self._mirror_submit("run", run.id)
        self._stop_mirror()  # bounded: what is left stays queued
        return state.value

    def _export_run(self, run_id: str, *, config: dict[str, Any] | None = None) -> None:
        """Write ``runs/<id>/run.json`` (and ``config.json``): derived, never the source."""
        store, registry = self._open()
        export = run_export(registry, run_id)
        run_dir = store.root / "runs" / run_id
        real_dirs(store.root, "runs", run_id)  # never write through a planted symlink
        _write_json_atomic(run_dir / "run.json", scrub(export))  # (clean already: in depth)
        if config is not None:
            _write_json_atomic(run_dir / "config.json", scrub(config))

    def _require_run(self, what: str) -> Run:
        if self._run is None:
            raise RunStateError(
                f"{what}() needs an active run: call ArtifactManager().init_run(name) first "
                "(or use ExperimentContext)"
            )
        return self._run

    # -- metrics ----------------------------------------------------------------------------

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> int | None:
        """Log scalars for the active run; returns the step used (None on other ranks).

        Buffered and written by a background thread at least every second, at finalize and at
        exit. Steps count up from 0 per run unless given. NaN and ±inf are kept.
        """
        writer = self.metrics_writer()
        return None if writer is None else writer.log(metrics, step)

    def metrics_writer(self) -> MetricsWriter | None:
        """The active run's batching writer (created on first use); None on other ranks."""
        with self._lock:
            run = self._require_run("log_metrics")
            if not run.is_rank_zero or run.id is None:
                return None
            if self._metrics is None:
                registry = self._open()[1]
                self._metrics = MetricsWriter(
                    registry.path, run.id, segment=run.segment,
                    next_step=registry.next_metric_step(run.id) if run.resumed else 0)
            return self._metrics

def _finish_at_exit(outcome: _exit.Outcome) -> None:
    """Called by ``_exit`` at interpreter exit: finish a run the program left open."""
    manager = ArtifactManager._instance
    run = manager.current_run if manager is not None else None
    if manager is None or run is None or not run.is_rank_zero or run.id is None:
        return
    if manager._run_pid != os.getpid():
        return  # a forked child: the run belongs to the parent
    if outcome is not None:
        state, reason = outcome
    else:
        state = run.state if run.state.is_terminal else RunState.COMPLETED
        reason = "finalized at interpreter exit (finalize_run() was not called)"
    try:
        manager._finish(run, state, reason=reason)
    finally:
        manager._run = None


def _config_changed(given: dict[str, Any], stored: dict[str, Any]) -> bool:
    """Whether a resume brings a config of its own. Repro's bookkeeping (``_repro``, which
    ``ExperimentContext`` adds) alone is not one: resuming without a config keeps the run's."""
    def own(config: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in config.items() if k != "_repro"}
    return bool(own(given)) and given != stored


def _owner_row(run: Run) -> RunRow:
    """The registry row of a run this process starts (or continues)."""
    assert run.id is not None
    pid = os.getpid()
    return RunRow(
        id=run.id, name=run.name, project=run.project, state=RunState.RUNNING.value,
        tags=run.tags, config=run.config, created_at=run.created_at, ended_at=None,
        host=socket.gethostname(), pid=pid, world_size=distributed.world_size(),
        pid_started=process_start_time(pid), process_ns=process_namespace(),
    )


_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{3,63}")
_RESUME = ("never", "allow", "must")


def _check_resume(run_id: object, resume: object) -> None:
    if resume not in _RESUME:
        raise InvalidArgumentError(f"resume must be one of {', '.join(map(repr, _RESUME))}, "
                                   f"got {resume!r}", argument="resume")
    if run_id is None:
        if resume == "must":
            raise InvalidArgumentError("resume='must' needs the run_id of the run to continue",
                                       argument="run_id")
        return
    if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
        raise InvalidArgumentError(
            f"run_id must be 4-64 letters, digits, '_' or '-' (starting with a letter or "
            f"digit), got {run_id!r}", argument="run_id")


def _write_json_atomic(path: Path, value: Any) -> None:
    """Exports are replaced atomically (see ``_fsio.write_file_atomic``)."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    _fsio.write_file_atomic(path, text.encode("utf-8"))
