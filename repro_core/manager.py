"""``ArtifactManager``: the one writer. Runs, artifact versions, lineage edges, rank-aware.

Order of every write, and why:

1. validate every argument (names, types, metadata, parents, data) — nothing touches disk
   before the call is known to be acceptable;
2. stream the content into a blob (temp file → fsync → rename) *without* holding the manager's
   lock, so a 50 GB checkpoint does not stall metric logging in other threads;
3. commit the registry row in one transaction (version number assigned inside it).

A crash between 2 and 3 leaves an unreferenced blob (``repro gc`` removes it), never a row
whose blob is missing or a half-written blob.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import _exit, _fsio, constants, distributed
from ._artifacts import ArtifactWriter, metadata_from_row
from .errors import (
    ArtifactNotFoundError,
    DistributedTimeoutError,
    InvalidArgumentError,
    ReproError,
    RunStateError,
    SerializationError,
    StorageError,
)
from .metrics import MetricsWriter, read_metrics
from .registry import Registry, RunRow
from .serialize import canonical_json, load_payload
from .store.local import LocalStorageBackend
from .types import ArtifactMetadata, ArtifactType, Run, RunState, parse_key

__all__ = ["ArtifactManager"]


class ArtifactManager:
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
        self._root: Path | None = None
        self._store: LocalStorageBackend | None = None
        self._registry: Registry | None = None
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
            if old._registry is not None:
                old._registry.close()
        return cls()

    # -- store ------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The store this manager writes to (the active run's, else ``REPRO_HOME``)."""
        return self._root or _default_root()

    def set_root(self, root: str | Path) -> None:
        """Point the manager at another store; refused while a run is active."""
        with self._lock:
            if self._run is not None:
                raise RunStateError(
                    f"run {self._run.id} is active on {self.root}; finalize_run() first"
                )
            new_root = Path(root).expanduser().absolute()
            if new_root != self._root:
                self._close_store()
                self._root = new_root

    def _open(self) -> tuple[LocalStorageBackend, Registry]:
        with self._lock:
            if self._store is None or self._registry is None:
                root = self.root
                registry = Registry(root / "registry.sqlite", algorithm=constants.REPRO_HASH)
                store = LocalStorageBackend(root, algorithm=registry.hash_algorithm())
                store.ensure_layout()
                store.sweep_tmp()
                self._root, self._store, self._registry = root, store, registry
            return self._store, self._registry

    def store(self) -> LocalStorageBackend:
        """The blob store (opened on first use). For integrations; prefer the logging API."""
        return self._open()[0]

    def registry(self) -> Registry:
        """The registry (opened on first use). For integrations and queries."""
        return self._open()[1]

    def version_id(self, key: str) -> int:
        """The registry id of the version ``key`` names (``name:v3``, ``name:best``, …)."""
        return self.registry().resolve(parse_key(key)).id

    def _close_store(self) -> None:
        if self._registry is not None:
            self._registry.close()
        self._store = self._registry = None

    # -- runs -------------------------------------------------------------------------------

    def init_run(
        self,
        name: str,
        config: dict[str, Any] | None = None,
        project: str = "default",
        tags: list[str] | None = None,
        *,
        root: str | Path | None = None,
    ) -> Run:
        """Initialize a new experimental run and record it immediately (a crash keeps it)."""
        _check_text(name, "name")
        _check_text(project, "project")
        tag_list = _check_tags(tags)
        config_dict = _check_config(config)
        with self._lock:
            if self._run is not None:
                raise RunStateError(
                    f"run {self._run.id} ({self._run.name!r}) is still active; call "
                    "finalize_run() before init_run()"
                )
            if root is not None:
                self.set_root(root)
            rank = distributed.global_rank()
            run = Run(id=None, name=name, project=project, tags=tag_list, config=config_dict,
                      root=self.root, rank=rank)
            run_id = self._exchange.run_on_zero(
                "init", lambda: self._create_run(run), encode=str, decode=str
            )
            run.id = run_id if run_id is not None else os.environ.get("REPRO_RUN_ID")
            self._run = run
            self._run_pid = os.getpid()
            _exit.install()
            _exit.reset()
            return run

    def _create_run(self, run: Run) -> str:
        _, registry = self._open()
        run.id = secrets.token_hex(6)
        registry.create_run(RunRow(
            id=run.id, name=run.name, project=run.project, state=RunState.RUNNING.value,
            tags=run.tags, config=run.config, created_at=run.created_at, ended_at=None,
            host=socket.gethostname(), pid=os.getpid(), world_size=distributed.world_size(),
        ))
        try:
            self._export_run(run.id, config=run.config)
        except StorageError as exc:
            # The row is committed; do not leave it RUNNING with nobody holding it.
            with contextlib.suppress(ReproError):
                registry.set_run_state(run.id, RunState.FAILED.value, reason=str(exc),
                                       ended=True)
            raise
        return run.id

    @property
    def current_run(self) -> Run | None:
        return self._run

    def set_run_state(self, state: RunState | str, *, reason: str | None = None) -> None:
        """Update run state for atomic tracking (recorded with a timestamp in the history)."""
        new_state = RunState.coerce(state)
        with self._lock:
            run = self._require_run("set_run_state")
            run.state = new_state
            if run.is_rank_zero and run.id is not None:
                self._open()[1].set_run_state(run.id, new_state.value, reason=reason,
                                              ended=new_state.is_terminal)

    def finalize_run(self) -> None:
        """Finalize the current run: every rank meets at a barrier (with a timeout), then rank 0
        marks it COMPLETED (unless already FAILED/INTERRUPTED) and writes ``run.json``.
        Idempotent: a second call does nothing."""
        with self._lock:
            run = self._run
            if run is None:
                return
            try:
                distributed.barrier(f"finalize/{run.id}")
            except BaseException as exc:
                if run.is_rank_zero:
                    self._finish(run, RunState.FAILED, reason=f"finalize barrier: {exc}")
                self._run = None
                raise
            try:
                final = run.state if run.state.is_terminal else RunState.COMPLETED
                state = self._exchange.run_on_zero(
                    "finalize", lambda: self._finish(run, final), encode=str, decode=str
                )
                run.state = RunState.coerce(state or final)
            finally:
                self._run = None
            self._wait_for_ranks(run)

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
                writer.close()  # every buffered metric is durable before the run is "done"
            except BaseException as exc:
                state, reason = RunState.FAILED, f"flushing metrics failed: {exc}"
                self._open()[1].set_run_state(run.id, state.value, reason=reason, ended=True)
                raise
        run.state = state
        registry = self._open()[1]
        current = registry.get_run(run.id)
        if current.state != state.value or current.ended_at is None or reason is not None:
            # not already recorded by set_run_state(): one history row per transition
            registry.set_run_state(run.id, state.value, reason=reason, ended=True)
        self._export_run(run.id)
        return state.value

    def _export_run(self, run_id: str, *, config: dict[str, Any] | None = None) -> None:
        """Write ``runs/<id>/run.json`` (and ``config.json``): derived, never the source."""
        store, registry = self._open()
        row = registry.get_run(run_id)
        export = {
            "run": row.__dict__,
            "states": [{"state": s, "at": at, "reason": r}
                       for s, at, r in registry.run_state_history(run_id)],
            "inputs": [v.key for v in registry.inputs_of(run_id)],
            "outputs": [v.key for v in registry.outputs_of(run_id)],
        }
        run_dir = store.root / "runs" / run_id
        _write_json_atomic(run_dir / "run.json", export)
        if config is not None:
            _write_json_atomic(run_dir / "config.json", config)

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
                self._metrics = MetricsWriter(self._open()[0].root / "registry.sqlite", run.id)
            return self._metrics

    def get_metrics(self, run_id: str | None = None, keys: list[str] | None = None
                    ) -> dict[str, list[tuple[int, float, float]]]:
        """``{key: [(step, value, unix_time), …]}`` for a run (default: the active one)."""
        with self._lock:
            if run_id is None:
                run_id = self._require_run("get_metrics").id
            if self._metrics is not None:
                self._metrics.flush()
        assert run_id is not None
        result = self._exchange.run_on_zero(
            f"metrics:{run_id}", lambda: read_metrics(self._open()[1], run_id, keys),
            encode=_identity, decode=lambda d: {k: [tuple(r) for r in v] for k, v in d.items()},
        )
        return result or {}

    # -- artifacts --------------------------------------------------------------------------

    def log_artifact(
        self,
        name: str,
        type: ArtifactType | str,
        data: Any | None = None,
        file_path: str | Path | None = None,
        metadata: dict[str, Any] | None = None,
        parent_artifacts: list[str] | None = None,
        *,
        aliases: Sequence[str] | None = None,
    ) -> ArtifactMetadata:
        """Log an artifact with automatic versioning and lineage tracking.

        Give exactly one of ``data`` (dict/list, str, bytes, tensor dict, numpy array) or
        ``file_path`` (a file or a directory). Content identical to ``latest`` returns that
        version instead of creating a new one.
        """
        with self._lock:
            run = self._require_run("log_artifact")

        def validate_and_write() -> ArtifactMetadata:
            # Validated on rank 0 only: a check that reads the filesystem (file_path) could
            # disagree on another rank, and rank 0's verdict reaches every rank anyway.
            writer = ArtifactWriter.validate(name, type, data, file_path, metadata,
                                             parent_artifacts, aliases)
            store, registry = self._open()
            return writer.write(store, registry, run.id)

        result = self._exchange.run_on_zero(
            f"log:{name}", validate_and_write,
            encode=ArtifactMetadata.to_dict, decode=ArtifactMetadata.from_dict,
        )
        return result  # type: ignore[return-value]

    def log_large_artifact(
        self,
        name: str,
        file_path: str | Path,
        type: ArtifactType | str = ArtifactType.MODEL,
        metadata: dict[str, Any] | None = None,
        chunk_size: int = 8192,
    ) -> ArtifactMetadata:
        """Log a large file by streaming it (never loaded in memory).

        ``chunk_size`` is accepted for compatibility; repro always copies with 16 MiB buffers,
        because 8 KiB reads would make hashing several times slower.
        """
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise InvalidArgumentError(
                f"chunk_size must be a positive int, got {chunk_size!r}", argument="chunk_size"
            )
        if file_path is None:
            raise InvalidArgumentError("log_large_artifact needs file_path", argument="file_path")
        return self.log_artifact(name, type, file_path=file_path, metadata=metadata)

    def use_artifact(
        self,
        name: str,
        version: str | None = None,
        type: ArtifactType | str | None = None,
        *,
        verify: bool | None = None,
    ) -> ArtifactMetadata:
        """Retrieve a logged artifact, check it, and record that the active run used it.

        ``name`` may be a full key (``data:v3``, ``data:best``, ``data@blake3:9f2c``) or a bare
        name with ``version`` (``"v3"``, ``"3"``, an alias, or ``"blake3:<prefix>"``). The size
        is always checked; the digest too unless ``verify=False`` or ``REPRO_VERIFY=size``.
        """
        key = parse_key(name, version)
        wanted = ArtifactType.coerce(type) if type is not None else None
        full = (constants.REPRO_VERIFY == "full") if verify is None else bool(verify)
        with self._lock:
            run = self._run
        result = self._exchange.run_on_zero(
            f"use:{name}:{version}", lambda: self._use(key, wanted, full, run),
            encode=ArtifactMetadata.to_dict, decode=ArtifactMetadata.from_dict,
        )
        return result  # type: ignore[return-value]

    def _use(self, key: Any, wanted: ArtifactType | None, full: bool,
             run: Run | None) -> ArtifactMetadata:
        store, registry = self._open()
        row = registry.resolve(key)
        if wanted is not None and row.type != wanted.value:
            raise ArtifactNotFoundError(
                f"{row.key} is a {row.type!r} artifact, not {wanted.value!r}", key=row.key
            )
        path = ArtifactWriter.check_content(store, registry, row, full=full)
        if run is not None and run.id is not None and run.id != row.run_id:
            # A run reading back its own output is not an input (it would make a lineage cycle).
            registry.record_use(run.id, row.id)
        return metadata_from_row(registry, row, path)

    def load_artifact(self, name: str, version: str | None = None) -> Any:
        """``use_artifact`` and load the content back into the object that was logged
        (dict/list, str, bytes, tensor dict, numpy array; a ``Path`` for files/directories)."""
        meta = self.use_artifact(name, version)
        assert meta.path is not None and meta.format is not None
        return load_payload(meta.path, meta.format)

    def list_artifacts(self, name: str | None = None) -> list[ArtifactMetadata]:
        """Metadata of every artifact version (or of one artifact's versions)."""
        if name is not None:
            parse_key(name)  # validates the name before any I/O

        def query() -> list[ArtifactMetadata]:
            registry = self._open()[1]
            return [metadata_from_row(registry, row, None)
                    for row in registry.list_versions(name)]

        result = self._exchange.run_on_zero(
            f"list:{name}", query, encode=lambda ms: [m.to_dict() for m in ms],
            decode=lambda ds: [ArtifactMetadata.from_dict(d) for d in ds],
        )
        return result or []

    def get_lineage(self, artifact_key: str) -> dict[str, Any]:
        """Full lineage of one artifact version: its transitive ``ancestors`` and
        ``descendants`` in the artifact → run → artifact graph (runs are ``run:<id>``), plus
        direct parents, children, producing run and consuming runs. For graph work use
        ``LineageTracker.from_store(root)``."""
        key = parse_key(artifact_key)
        result = self._exchange.run_on_zero(f"lineage:{artifact_key}", lambda: self._lineage(key),
                                            encode=_identity, decode=_identity)
        return result or {}

    def _lineage(self, key: Any) -> dict[str, Any]:
        from .lineage import LineageTracker

        registry = self._open()[1]
        row = registry.resolve(key)
        producer = registry.get_run(row.run_id).__dict__ if row.run_id else None
        graph = LineageTracker.from_registry(registry, around=row.key)
        return {
            "ancestors": sorted(graph.get_ancestors(row.key)),
            "descendants": sorted(graph.get_descendants(row.key)),
            "artifact": metadata_from_row(registry, row, None).to_dict(),
            "produced_by": producer,
            "run_inputs": [v.key for v in registry.inputs_of(row.run_id)] if row.run_id else [],
            "parents": [p.key for p in registry.parents_of(row.id)],
            "children": [c.key for c in registry.children_of(row.id)],
            "used_by": registry.consumers_of(row.id),
        }

    def get_run(self, run_id: str) -> dict[str, Any]:
        """The stored record of a run, with its state history, inputs and outputs."""

        def query() -> dict[str, Any]:
            registry = self._open()[1]
            row = registry.get_run(run_id)
            return {
                **row.__dict__,
                "states": [list(s) for s in registry.run_state_history(run_id)],
                "inputs": [v.key for v in registry.inputs_of(run_id)],
                "outputs": [v.key for v in registry.outputs_of(run_id)],
            }

        return self._exchange.run_on_zero(f"run:{run_id}", query, encode=_identity,
                                          decode=_identity) or {}


def _identity(value: Any) -> Any:
    return value


def _default_root() -> Path:
    return Path(constants.REPRO_HOME or constants.DEFAULT_HOME).expanduser().absolute()


def _check_text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip() or "\x00" in value or len(value) > 256:
        raise InvalidArgumentError(
            f"run {what} must be a non-empty str of at most 256 characters without NUL, "
            f"got {value!r}",
            argument=what,
        )
    return value


def _check_tags(tags: object) -> list[str]:
    if tags is None:
        return []
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
        raise InvalidArgumentError(f"tags must be a list of str, got {tags!r}", argument="tags")
    return [_check_text(t, "tag") for t in tags]


def _check_config(config: object) -> dict[str, Any]:
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise SerializationError(
            f"config must be a dict, got {type(config).__name__}", path="config"
        )
    canonical_json(config, root="config")
    return dict(config)


def _write_json_atomic(path: Path, value: Any) -> None:
    """Exports are replaced atomically (see ``_fsio.write_file_atomic``)."""
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    _fsio.write_file_atomic(path, text.encode("utf-8"))
