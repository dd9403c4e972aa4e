"""Ranks, and how rank 0 shares its answers without hidden collectives.

Rules (DESIGN.md "Ranks"):

* The global rank comes from ``torch.distributed`` when a process group is initialised, else
  ``RANK``, else ``SLURM_PROCID``, else ``LOCAL_RANK`` on a single node; ``LOCAL_RANK`` alone
  when ``WORLD_SIZE > LOCAL_WORLD_SIZE`` could be any node's rank 0, so we refuse to guess.
  It is read at every call, never cached at import (the seed's original read it once).
* Only rank 0 writes. Rank 0 *publishes* each result (run id, artifact metadata, or the error
  it hit) into the process group's key-value store under a per-call sequence key; other ranks
  *fetch* it with a timeout. Publishing never blocks, so any API called on rank 0 alone
  returns; a fetch waits at most ``REPRO_BARRIER_TIMEOUT`` and then raises
  :class:`DistributedTimeoutError` — nothing hangs. No torch collective (broadcast, barrier) is
  ever issued from library code, so a call inside ``if rank == 0:`` cannot deadlock the job.
* ``barrier(name)`` (used by ``finalize_run``, which every rank calls) is built on the same
  store with a timeout, and works the same on gloo and NCCL.
"""

from __future__ import annotations

import builtins
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

from . import constants
from .errors import AmbiguousRankError, DistributedTimeoutError, ReproError
from .errors import __all__ as _error_names

__all__ = [
    "Exchange",
    "barrier",
    "global_rank",
    "is_rank_zero",
    "process_group_active",
    "world_size",
]

_T = TypeVar("_T")
_PREFIX = "repro/"


def _dist() -> Any | None:
    """``torch.distributed`` if torch is already imported and a group is up (never imports)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def process_group_active() -> bool:
    return _dist() is not None


def global_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    dist = _dist()
    if dist is not None:
        return int(dist.get_rank())
    for var in ("RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").strip():
            return _as_int(var)
    if os.environ.get("LOCAL_RANK", "").strip():
        world = _as_int_or("WORLD_SIZE", 1)
        local_world = _as_int_or("LOCAL_WORLD_SIZE", 1 if world > 1 else world)
        if world > local_world:
            raise AmbiguousRankError(
                f"LOCAL_RANK={os.environ['LOCAL_RANK']} but WORLD_SIZE={world} > "
                f"LOCAL_WORLD_SIZE={local_world}: this could be any node; set RANK (torchrun "
                "does) so repro knows which process is global rank 0"
            )
        return _as_int("LOCAL_RANK")
    return 0


def world_size() -> int:
    dist = _dist()
    if dist is not None:
        return int(dist.get_world_size())
    return _as_int_or("WORLD_SIZE", 1)


def is_rank_zero() -> bool:
    return global_rank() == 0


def _as_int(var: str) -> int:
    raw = os.environ[var]
    try:
        return int(raw)
    except ValueError as exc:
        raise AmbiguousRankError(f"{var}={raw!r} is not an integer rank") from exc


def _as_int_or(var: str, default: int) -> int:
    return _as_int(var) if os.environ.get(var, "").strip() else default


class Exchange:
    """Rank 0 publishes results; other ranks fetch them, matched by call signature and order.

    ``call`` names the call by what every rank knows alike (``log:model``, ``use:data:v3``);
    the n-th ``log:model`` on rank 1 receives what the n-th ``log:model`` on rank 0 produced.
    A call rank 0 makes alone (inside ``if rank == 0:``) therefore does not shift the pairing
    of calls that name something else; a rank-0-only ``log_artifact("model")`` followed by a
    shared ``log_artifact("model")`` would. Counters live for the whole process (one
    module-level exchange), so a fresh ``ArtifactManager`` cannot read the previous one's
    answers. Keys stay in the process group's store until the job ends (a few hundred bytes
    per call).
    """

    def __init__(self) -> None:
        self._counters: dict[str, itertools.count[int]] = {}
        self._lock = threading.Lock()

    def _next_key(self, call: str) -> str:
        with self._lock:
            counter = self._counters.setdefault(call, itertools.count())
            return f"{_PREFIX}{call}/{next(counter)}"

    def run_on_zero(self, call: str, fn: Callable[[], _T], encode: Callable[[_T], Any],
                    decode: Callable[[Any], _T]) -> _T | None:
        """Run ``fn`` on rank 0 and share its outcome; other ranks return the shared value.

        Without a process group, other ranks return ``None`` (they have nobody to ask).
        Rank 0 publishes in a ``finally``, so a failure there (disk full) reaches every rank
        as the same typed error instead of leaving them waiting.
        """
        dist = _dist()
        if global_rank() == 0:
            key = self._next_key(call) if dist is not None else None
            outcome: dict[str, Any] = {"ok": False, "error": "RuntimeError",
                                       "message": "rank 0 was interrupted"}
            try:
                result = fn()
                outcome = {"ok": True, "value": encode(result)}
                return result
            except BaseException as exc:
                outcome = {"ok": False, "error": type(exc).__name__, "message": str(exc)}
                raise
            finally:
                if key is not None:
                    _store_set(key, outcome)
        if dist is None:
            return None
        outcome = _store_get(self._next_key(call), f"rank 0's answer to {call}")
        if not outcome["ok"]:
            raise _rebuild_error(outcome)
        return decode(outcome["value"])


EXCHANGE = Exchange()


def barrier(name: str, timeout: float | None = None) -> None:
    """Wait until every rank has reached ``name``; raise ``DistributedTimeoutError`` otherwise.

    Built on the process group's store (set a key per rank, wait for all) rather than on
    ``dist.barrier``, whose NCCL version cannot time out.
    """
    dist = _dist()
    if dist is None:
        return
    timeout = constants.REPRO_BARRIER_TIMEOUT if timeout is None else timeout
    store = _store()
    rank, world = dist.get_rank(), dist.get_world_size()
    store.set(f"{_PREFIX}barrier/{name}/{rank}", b"1")
    keys = [f"{_PREFIX}barrier/{name}/{r}" for r in range(world)]
    try:
        store.wait(keys, timedelta(seconds=timeout))
    except Exception as exc:
        missing = [r for r, k in enumerate(keys) if not _check(store, k)]
        raise DistributedTimeoutError(
            f"barrier {name!r}: rank(s) {missing or '?'} did not arrive within {timeout:.0f}s "
            f"(REPRO_BARRIER_TIMEOUT); a rank probably died or skipped finalize_run()"
        ) from exc


def _store() -> Any:
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _check(store: Any, key: str) -> bool:
    try:
        return bool(store.check([key]))
    except Exception:
        return False


def _store_set(key: str, value: dict[str, Any]) -> None:
    _store().set(key, json.dumps(value).encode("utf-8"))


def _store_get(key: str, what: str) -> dict[str, Any]:
    timeout = constants.REPRO_BARRIER_TIMEOUT
    store = _store()
    start = time.monotonic()
    try:
        store.wait([key], timedelta(seconds=timeout))
        raw = store.get(key)
    except Exception as exc:
        waited = time.monotonic() - start
        why = (f"waited {timeout:.0f}s (REPRO_BARRIER_TIMEOUT)" if waited >= timeout * 0.9
               else f"lost the process group's store after {waited:.1f}s ({exc})")
        raise DistributedTimeoutError(
            f"{why} for {what}: rank 0 died, or did not make the same call (every rank must "
            "call repro's API alike)"
        ) from exc
    decoded: dict[str, Any] = json.loads(raw)
    return decoded


def _rebuild_error(outcome: dict[str, Any]) -> BaseException:
    """Re-create rank 0's error on this rank, as the same repro type where possible."""
    name, message = outcome["error"], f"on rank 0: {outcome['message']}"
    from . import errors

    if name in _error_names:
        cls = getattr(errors, name)
        try:
            return cls(message)  # type: ignore[no-any-return]
        except TypeError:
            pass
    builtin = getattr(builtins, name, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        return builtin(message)
    return ReproError(f"{name} {message}")
