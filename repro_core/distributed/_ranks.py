"""Which process is global rank 0, and a barrier that cannot hang.

The global rank comes from ``torch.distributed`` when a process group is initialised, else
``RANK``, else ``SLURM_PROCID``, else ``LOCAL_RANK`` on a single node; ``LOCAL_RANK`` alone
when ``WORLD_SIZE > LOCAL_WORLD_SIZE`` could be any node's rank 0, so we refuse to guess. It
is read at every call, never cached at import (the seed's original read it once).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from typing import Any

from .. import constants
from ..errors import AmbiguousRankError, DistributedTimeoutError

PREFIX = "repro/"


def dist_module() -> Any | None:
    """``torch.distributed`` if torch is already imported and a group is up (never imports)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    dist = getattr(torch, "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def process_group_active() -> bool:
    return dist_module() is not None


def global_rank() -> int:
    """This process's global rank (0 when not distributed)."""
    dist = dist_module()
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
    dist = dist_module()
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


def kv_store() -> Any:
    """The default process group's key-value store (c10d ``Store``)."""
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def key_exists(store: Any, key: str) -> bool:
    """``store.check`` that answers False instead of raising when the store is gone."""
    try:
        return bool(store.check([key]))
    except RuntimeError:  # DistStoreError / DistNetworkError are RuntimeErrors
        return False


def barrier(name: str, timeout: float | None = None) -> None:
    """Wait until every rank has reached ``name``; raise ``DistributedTimeoutError`` otherwise.

    Built on the process group's store (set a key per rank, wait for all) rather than on
    ``dist.barrier``, whose NCCL version cannot time out.
    """
    dist = dist_module()
    if dist is None:
        return
    timeout = constants.REPRO_BARRIER_TIMEOUT if timeout is None else timeout
    store = kv_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    store.set(f"{PREFIX}barrier/{name}/{rank}", b"1")
    keys = [f"{PREFIX}barrier/{name}/{r}" for r in range(world)]
    try:
        _wait(store, keys, timeout)
    except _StoreGone as exc:
        raise DistributedTimeoutError(
            f"barrier {name!r}: the process group's store stopped answering ({exc.__cause__}); "
            "the launcher or rank 0 is probably gone") from exc
    except RuntimeError as exc:
        missing = [r for r, k in enumerate(keys) if not key_exists(store, k)]
        raise DistributedTimeoutError(
            f"barrier {name!r}: rank(s) {missing or '?'} did not arrive within {timeout:.0f}s "
            f"(REPRO_BARRIER_TIMEOUT); a rank probably died or skipped finalize_run()"
        ) from exc


class _StoreGone(RuntimeError):
    """The store failed at once, several times in a row: not a slow rank."""


def _wait(store: Any, keys: list[str], timeout: float) -> None:
    """``store.wait`` in slices of at most a second: a wait in C++ holds off Python's signal
    handlers, and a SIGTERM (a launcher stopping the job because another rank died) must
    end the process now, not when the whole timeout has run out."""
    deadline = time.monotonic() + timeout
    instant = 0
    while True:
        left = deadline - time.monotonic()
        began = time.monotonic()
        try:
            store.wait(keys, timedelta(seconds=max(0.001, min(1.0, left))))
            return
        except RuntimeError as exc:
            instant = instant + 1 if time.monotonic() - began < 0.01 else 0
            if instant >= 3:  # failing at once, again and again: gone, not slow
                raise _StoreGone(str(exc)) from exc
            if time.monotonic() >= deadline:
                raise
            if instant:
                time.sleep(0.05)
