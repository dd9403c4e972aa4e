"""``TTRLContext``: an ExperimentContext for online Test-Time RL loops.

Every experience is stored (input, output and metadata — the seed's original kept only a
counter), every online update is a row in ``online_updates`` linked to its experience and to
the **model version in force** (the last checkpoint logged in this run), so "which updates
produced checkpoint v7?" is one query. The same scalars go to the metrics store under the
names the original used (``online/reward``, …) so existing dashboards keep working. All of it
goes through the batching writer: ``log_online_update`` is a few microseconds, and everything
is durable once the context exits.

The queries are module functions of a :class:`~repro_core.registry.Registry`, usable without
any context (the CLI's ``repro updates`` builds on them): :func:`updates_for` (the updates made
under one model version of a run), :func:`updates_producing` (those that produced a checkpoint,
answered for whichever run logged it) and :func:`run_updates` (all of a run's updates).
Rewards, confidences and KLs come back exactly, NaN and ±inf included.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._metrics_rows import ROW_TABLES, is_utf8, real, to_number
from ._safepath import check_digest
from .capture import EnvironmentCaptureLevel, capture_config, scrub
from .context import ExperimentContext
from .errors import IntegrityError, InvalidArgumentError, RunStateError
from .metrics import MetricsWriter
from .registry import Registry
from .serialize import canonical_json, load_payload
from .types import ArtifactMetadata, ArtifactType

__all__ = ["TTRLContext", "run_updates", "updates_for", "updates_producing"]

# Payloads bigger than this go to a blob; the row keeps the digest.
INLINE_PAYLOAD_BYTES = 64 * 1024
_EXPERIENCE_COLUMNS = ROW_TABLES["experiences"]


class TTRLContext(ExperimentContext):
    """Specialized context for Test-Time Reinforcement Learning experiments.

    Adds experience storage, online-update records linked to model versions, periodic
    experience-buffer snapshots and running aggregates for loggers.
    """

    _default_prefix = "ttrl"
    _default_level = EnvironmentCaptureLevel.COMPLETE

    def __init__(
        self,
        config: Any | None = None,
        name: str | None = None,
        experience_snapshot_interval: float = 3600,
        *,
        window: int = 100,
        clock: Callable[[], float] = time.monotonic,
        **kwargs: Any,
    ) -> None:
        """``experience_snapshot_interval`` seconds between buffer snapshots; ``window`` is
        how many recent updates the running means cover; ``clock`` is injectable for tests."""
        interval = experience_snapshot_interval
        if isinstance(interval, bool) or not isinstance(interval, (int, float)) \
                or not math.isfinite(interval) or interval < 0:
            # NaN compared false with everything, so it was accepted and never snapshotted.
            raise InvalidArgumentError(
                "experience_snapshot_interval must be a finite number of seconds >= 0 (0: "
                f"every call), got {interval!r}", argument="experience_snapshot_interval")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise InvalidArgumentError(f"window must be a positive int, got {window!r}",
                                       argument="window")
        super().__init__(config=config, name=name, **kwargs)
        self.experience_snapshot_interval = float(experience_snapshot_interval)
        self._clock = clock
        self._recent: deque[tuple[float, float, float | None]] = deque(maxlen=window)
        self._update_count = 0
        self._experience_count = 0
        self._started = clock()
        self._last_snapshot = self._started
        self._model_version_id: int | None = None
        self._active: tuple[MetricsWriter, str] | None = None

    def __enter__(self) -> TTRLContext:
        super().__enter__()
        self._started = self._last_snapshot = self._clock()
        run = self.run
        if run is not None and run.resumed and run.is_rank_zero and run.id is not None:
            # update ids (<run>-u<n>) stay unique across the segments of a resumed run
            self._update_count = self.manager.registry().count_online_updates(run.id)
        return self

    def _finish(self, state: Any, exc: BaseException | None, *,
                alone: bool | None = None) -> None:
        self._active = None  # the writer is closed by finalize; never hand it out again
        super()._finish(state, exc, alone=alone)

    def set_model_version(self, checkpoint_key: str) -> None:
        """Make ``checkpoint_key`` the model version later updates link to (what logging a
        checkpoint through this context does; for adapters that log checkpoints themselves)."""
        self._model_version_id = self._version_id(checkpoint_key)

    # -- hot path -------------------------------------------------------------------------------

    def log_experience(self, experience_id: str, input_data: Any, output_data: Any,
                       metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Store one experience (JSON-safe input/output; large payloads as a blob)."""
        writer, run_id = self._writer("log_experience")
        record = {"experience_id": _check_id(experience_id), "input": capture_value(input_data),
                  "output": capture_value(output_data), "timestamp": time.time(),
                  "metadata": scrub(dict(_check_metadata(metadata))) if metadata else {}}
        meta_json = _json(record["metadata"])  # validated before the payload is written
        inp, out = _json(record["input"]), _json(record["output"])
        count = self._experience_count + 1
        hours = max(self._clock() - self._started, 1e-9) / 3600
        numbers = {"online/experience_count": float(count),
                   "online/experiences_per_hour": count / hours}
        if len(inp) + len(out) <= INLINE_PAYLOAD_BYTES:
            writer.record(numbers, "experiences", (
                run_id, record["experience_id"], inp, out, None, None, meta_json,
                record["timestamp"]))
        else:
            self._store_large(run_id, record, meta_json)
            writer.record(numbers)
        self._experience_count = count
        return record

    def log_online_update(self, experience_id: str, reward: float, confidence: float,
                          kl_divergence: float | None = None,
                          metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record one online learning update, linked to the current model version.

        Everything is validated before anything is counted or buffered, so a rejected call
        leaves no trace (and uses up no update number).
        """
        writer, run_id = self._writer("log_online_update")
        experience = _check_id(experience_id)
        reward_value = to_number("reward", reward)
        confidence_value = to_number("confidence", confidence)
        kl = None if kl_divergence is None else to_number("kl_divergence", kl_divergence)
        # Metadata is a record, scrubbed like a config (None/{} skip it: the hot path).
        meta = scrub(_check_metadata(metadata)) if metadata else None
        meta_json = _json(meta) if meta else "{}"
        count = self._update_count + 1
        now = time.time()
        update_id = f"{run_id}-u{count}"
        values = {"online/reward": reward_value, "online/confidence": confidence_value,
                  "online/update_count": float(count)}
        if kl is not None:
            values["online/kl_divergence"] = kl
        # real(): NaN/±inf as text, else SQLite would store a NaN reward as NULL
        writer.record(values, "online_updates", (
            run_id, update_id, experience, real(reward_value), real(confidence_value),
            None if kl is None else real(kl), self._model_version_id, meta_json, now))
        self._update_count = count
        self._recent.append((reward_value, confidence_value, kl))
        return {"update_id": update_id, "experience_id": experience, "reward": reward_value,
                "confidence": confidence_value, "kl_divergence": kl, "timestamp": now,
                "metadata": dict(metadata) if metadata else {}}

    def log_experience_buffer(self, buffer_data: Any, force: bool = False
                              ) -> ArtifactMetadata | None:
        """Snapshot the experience buffer if the interval has passed (or ``force``)."""
        now = self._clock()
        if not force and now - self._last_snapshot < self.experience_snapshot_interval:
            return None
        data = buffer_data if isinstance(buffer_data, (bytes, str)) else capture_value(
            buffer_data)
        meta = self.log_artifact("experience_buffer", ArtifactType.EXPERIENCE, data=data,
                                 metadata={"experience_count": self._experience_count,
                                           "update_count": self._update_count})
        self._last_snapshot = now
        return meta

    # -- model versions and queries -----------------------------------------------------------

    def log_artifact(self, *args: Any, **kwargs: Any) -> ArtifactMetadata:
        """As ExperimentContext; a checkpoint becomes the model version later updates link to."""
        meta = super().log_artifact(*args, **kwargs)
        if meta is not None and meta.type is ArtifactType.CHECKPOINT:
            self._model_version_id = self._version_id(meta.key)
        return meta

    def _version_id(self, key: str) -> int:
        return self.manager.version_id(key)

    def updates_for(self, checkpoint_key: str | None) -> list[dict[str, Any]]:
        """The online updates this run made while ``checkpoint_key`` was the current model
        (None: before any checkpoint), oldest first — i.e. the updates that led to the *next*
        checkpoint."""
        run_id = self._flushed_run_id()
        version_id = None if checkpoint_key is None else self._version_id(checkpoint_key)
        return updates_for(self.manager.registry(), run_id, version_id)

    def updates_producing(self, checkpoint_key: str) -> list[dict[str, Any]]:
        """Which updates produced this checkpoint, whichever run logged it (see the module
        function :func:`updates_producing`); works before, during and after the context."""
        if self._active is not None:
            self._active[0].flush()  # this run's rows may still be buffered
        return updates_producing(self.manager.registry(), self._version_id(checkpoint_key))

    def _flushed_run_id(self) -> str:
        """The run's id, with buffered rows written first; works after the context exited."""
        if self._active is not None:
            self._active[0].flush()
        if self.run is None or self.run.id is None:
            raise RunStateError("this context was never entered, so it has no run to read")
        return self.run.id

    def experiences(self) -> list[dict[str, Any]]:
        """Every stored experience of this run, payloads restored, oldest first."""
        run_id = self._flushed_run_id()
        store = self.manager.store()
        out = []
        for record in self.manager.registry().experiences(run_id):
            digest, size = record.pop("payload_digest"), record.pop("payload_size")
            if digest is not None:  # size and digest checked: IntegrityError if damaged
                digest = check_digest(digest, where=f"experience {record['experience_id']!r}")
                if size is None:  # written before sizes were recorded: the digest decides
                    size = store.blob_path(digest).stat().st_size if store.exists(digest) \
                        else -1
                payload = load_payload(store.check(digest, size), "json", digest=digest)
                if not isinstance(payload, dict) or not {"input", "output"} <= payload.keys():
                    raise IntegrityError(f"experience payload {digest} is not one repro wrote",
                                         digest=digest)
                record["input"], record["output"] = payload["input"], payload["output"]
            out.append(record)
        return out

    def aggregates(self) -> dict[str, Any]:
        """Counts and means over the last ``window`` updates (for progress bars and loggers)."""
        recent = list(self._recent)
        kls = [k for _, _, k in recent if k is not None]
        return {
            "update_count": self._update_count,
            "experience_count": self._experience_count,
            "mean_reward": _mean([r for r, _, _ in recent]),
            "mean_confidence": _mean([c for _, c, _ in recent]),
            "mean_kl_divergence": _mean(kls),
            "window": len(recent),
        }

    # -- helpers --------------------------------------------------------------------------------

    def _writer(self, what: str) -> tuple[MetricsWriter, str]:
        cached = self._active
        if cached is not None:  # hot path: one attribute read per call
            return cached
        run = self.manager.current_run
        if run is None or self.run is None or run.id != self.run.id or run.id is None:
            raise RunStateError(f"{what}() needs the context to be entered (use `with ...:`)")
        writer = self.manager.metrics_writer()
        if writer is None:  # another rank: nothing is written there
            raise RunStateError(f"{what}() is only recorded on global rank 0")
        self._active = (writer, run.id)
        return self._active

    def _store_large(self, run_id: str, record: dict[str, Any], meta_json: str) -> None:
        """A large payload becomes a blob, and its row is committed at once under the store's
        publish guard (not buffered), so gc can never see the blob without its row."""
        store, registry = self.manager.store(), self.manager.registry()
        body = canonical_json({"input": record["input"], "output": record["output"]})
        with store.publish_guard(), registry.publish_guard():
            with store.open_writer() as blob:
                blob.write(body)
                digest, size = blob.commit()
            registry.insert_experience((run_id, record["experience_id"], None, None, digest,
                                        size, meta_json, record["timestamp"]),
                                       _EXPERIENCE_COLUMNS)


def updates_for(registry: Registry, run_id: str, version_id: int | None
                ) -> list[dict[str, Any]]:
    """The online updates ``run_id`` made while version ``version_id`` was its model in force
    (None: before its first checkpoint), oldest first."""
    return registry.online_updates(run_id, version_id)


def updates_producing(registry: Registry, version_id: int) -> list[dict[str, Any]]:
    """The online updates that produced checkpoint ``version_id``: those its run made while
    the run's previous checkpoint was in force (before any, if it is the run's first).

    Answered for whichever run logged the version (``versions.run_id``); the context method
    used to answer with the *active* run's updates, so another run's checkpoint got ``[]`` or
    the wrong updates. The previous checkpoint is the version's checkpoint parent that this
    same run logged: a parent from another run (a resume point) was never a model version
    of this run, whose updates link only to checkpoints it logged itself.
    """
    row = registry.get_version(version_id)
    if row.type != ArtifactType.CHECKPOINT.value:
        raise InvalidArgumentError(
            f"{row.key} is a {row.type!r} artifact; online updates link to checkpoint "
            "versions only", argument="version_id")
    if row.run_id is None:
        return []
    parents = [p.id for p in registry.parents_of(row.id)
               if p.type == ArtifactType.CHECKPOINT.value]
    logged = {version for run, version in
              registry.edges_touching("run_outputs", "version_id", parents) if run == row.run_id}
    previous = max((p for p in parents if p in logged), default=None)
    return registry.online_updates(row.run_id, previous)


def run_updates(registry: Registry, run_id: str) -> list[dict[str, Any]]:
    """Every online update of a run, oldest first, each with its ``model_version_id``."""
    return registry.run_online_updates(run_id)


def capture_value(value: Any) -> Any:
    """Any input/output made JSON-safe with the config converter (tensors summarised, NaN as
    text). Key-name redaction is off: this is data, and a field called ``key`` is not a
    secret; credentials inside URLs are still scrubbed."""
    return capture_config({"v": value}, redact_allow=["*"])["v"]


def _json(value: Any) -> str:
    return canonical_json(value).decode("utf-8")


def _check_id(experience_id: object) -> str:
    """Ids are stored as SQL text: no NUL (SQLite's C strings end there), valid UTF-8."""
    valid = isinstance(experience_id, str) and 0 < len(experience_id) <= 256 \
        and "\x00" not in experience_id and experience_id.isprintable() \
        and is_utf8(experience_id)
    if not valid:
        raise InvalidArgumentError(
            f"experience_id must be a printable str of 1-256 characters (valid UTF-8, no NUL "
            f"or control characters), got {experience_id!r}", argument="experience_id")
    assert isinstance(experience_id, str)
    return experience_id


def _check_metadata(metadata: object) -> dict[str, Any]:
    if not isinstance(metadata, dict):
        raise InvalidArgumentError(f"metadata must be a dict, got {type(metadata).__name__}",
                                   argument="metadata")
    return metadata


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None

