"""Background mirroring: a run given a remote pushes each artifact as it lands.

The training step never waits on the network (W&B's ``finish()`` and MLflow's
``log_artifact`` blocking training are long-standing complaints: wandb#9730, mlflow#14153):
``submit`` only writes a row to the registry's ``remote_queue`` (durable: a crash leaves it
there) and wakes a worker thread, which pushes with its own registry connection. A failing
push is retried with backoff, its error kept on the row (``repro status`` shows it) and warned
about once — never raised into the training loop, and the local copy is never touched.
``close(timeout)`` waits for the queue a bounded time and says what is left; the next run
with that remote, or ``repro push``, finishes it.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReproError
from ..registry import Registry
from ..store._remote import redact_url
from ..store.local import LocalStorageBackend
from ..types import utc_now
from ._config import is_wandb
from ._local import closure
from ._remote import Remote, SyncReport

__all__ = ["Mirror", "QueueItem", "pending", "push_selection", "settle"]

_MAX_BACKOFF = 60.0
_PARKED = 8


@dataclass(frozen=True)
class QueueItem:
    id: int
    url: str
    kind: str  # "version" (ref: local version id) or "run" (ref: run id)
    ref: str
    enqueued_at: str
    attempts: int
    last_error: str | None


def push_selection(registry: Registry, store: LocalStorageBackend, remote: Remote,
                   versions: list[int], runs: list[str], report: SyncReport,
                   advance: Callable[[int], None], *, background: bool = False,
                   check: bool = False) -> SyncReport:
    """Push versions and runs (with their upstream closure) to a remote of either kind.
    ``background`` (the mirror's per-checkpoint pushes): a run already on the remote is not
    sent again (finishing it does), and the queue is left to the mirror."""
    from ._push import Pusher
    from ._wandb_push import WandbPusher

    began = utc_now()
    ids, run_ids = closure(registry, versions, runs)
    if is_wandb(remote.url):
        WandbPusher(registry, store, remote, report, advance).push(ids, run_ids)
    else:
        Pusher(registry, store, remote, report, advance,
               refresh_runs=not background or bool(runs), check=check).push(ids, run_ids)
    if not background:
        settle(registry, remote.url, run_ids, before=began)
    return report


def enqueue(registry: Registry, url: str, kind: str, ref: str) -> None:
    with registry.transaction() as conn:
        # queued again (a resumed run finishing again): as new, with a fresh count
        conn.execute("INSERT INTO remote_queue (url, kind, ref, enqueued_at) VALUES (?, ?, ?,"
                     " ?) ON CONFLICT (url, kind, ref) DO UPDATE SET enqueued_at ="
                     " excluded.enqueued_at, attempts = 0, last_error = NULL",
                     (url, kind, ref, utc_now()))


def pending(registry: Registry, url: str | None = None) -> list[QueueItem]:
    where, params = ("WHERE url = ?", (url,)) if url is not None else ("", ())
    return [QueueItem(int(i), str(u), str(k), str(r), str(at), int(n), e) for i, u, k, r, at, n, e
            in registry._read(f"SELECT id, url, kind, ref, enqueued_at, attempts, last_error"
                              f" FROM remote_queue {where} ORDER BY id", params)]


def settle(registry: Registry, url: str, runs: list[str], *, before: str) -> int:
    """Drop queued items a push has since covered: versions the remote now holds, and the
    ``runs`` this push sent as they are now (a run pushed earlier with a checkpoint is not
    covered: its final state was not) as queued ``before`` this push began (one queued while
    it ran may hold a newer state). Returns how many. (A W&B mirror holds artifacts only: a
    run's item there has nothing to push.)"""
    with registry.transaction() as conn:
        if is_wandb(url):
            conn.execute("DELETE FROM remote_queue WHERE url = ? AND kind = 'run'", (url,))
        dropped = conn.execute(
            "DELETE FROM remote_queue WHERE url = ? AND kind = 'version' AND ref IN"
            " (SELECT CAST(version_id AS TEXT) FROM remote_versions WHERE url = ?)",
            (url, url)).rowcount
        return dropped + sum(conn.execute(
            "DELETE FROM remote_queue WHERE url = ? AND kind = 'run' AND ref = ? AND"
            " enqueued_at < ?", (url, run_id, before)).rowcount for run_id in runs)


class Mirror:
    """The background worker of one run's remote (rank 0 only)."""

    def __init__(self, root: Path, name: str, url: str) -> None:
        self.root, self.name, self.url = root, name, url
        # Two connections: the training thread queues through one while the worker reads a
        # snapshot for a run's bundle through the other (never waiting on each other).
        self._registry = Registry(root / "registry.sqlite", create=False)
        self._queue = Registry(root / "registry.sqlite", create=False)
        with contextlib.suppress(ReproError), self._queue.transaction() as conn:
            # items parked by an earlier run (an outage): this run tries them again
            conn.execute("UPDATE remote_queue SET attempts = 0 WHERE url = ?", (url,))
        self._store: LocalStorageBackend | None = None
        self._wake = threading.Event()
        self._stop = False
        self._warned: set[str] = set()
        self._thread = threading.Thread(target=self._run, name=f"repro-mirror-{name}",
                                        daemon=True)
        self._thread.start()

    def submit(self, kind: str, ref: str) -> None:
        """Queue one push (a registry row: durable) and wake the worker; never blocks on
        the network, never raises into the caller for a remote's trouble."""
        try:
            enqueue(self._queue, self.url, kind, ref)
        except ReproError as exc:
            self._warn("queue", f"could not queue the push of {kind} {ref}: {exc}")
        self._wake.set()

    def pending(self) -> list[QueueItem]:
        return pending(self._queue, self.url)

    def close(self, timeout: float) -> list[QueueItem]:
        """Wait up to ``timeout`` s for the queue to empty; returns (and warns about) what is
        left, which stays queued for the next run with this remote or ``repro push``."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)
        left = pending(self._queue, self.url)
        if left:
            why = (f"did not finish within {timeout:g} s" if self._thread.is_alive()
                   else "failed again")
            warnings.warn(
                f"repro: {len(left)} push(es) to remote {self.name!r} "
                f"({redact_url(self.url)}) {why} (last error: "
                f"{next((i.last_error for i in left if i.last_error), 'none')}); they stay "
                f"queued: `repro push {self.name}` or the next run with this remote finishes "
                "them (`repro status` lists them)", RuntimeWarning, stacklevel=3)
        if not self._thread.is_alive():
            self._registry.close()
        self._queue.close()
        return left

    # -- the worker -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self._stop:  # (a worker that outlived close() closes its own connection)
                self._registry.close()

    def _loop(self) -> None:
        failures = 0
        while True:
            items = self._items()
            if not items:
                if self._stop:
                    return
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            if self._push(items):
                failures = 0
                continue
            failures += 1
            if self._stop and failures > 1:
                return  # finishing: one retry only, the rest stays queued
            self._wake.wait(min(_MAX_BACKOFF, 0.5 * 2 ** failures))
            self._wake.clear()

    def _items(self) -> list[QueueItem]:
        """What is left to do, less the items parked after ``_PARKED`` failed attempts (one
        item that cannot be pushed — a blob gone from the store — must not hold up every
        later checkpoint; ``repro push`` and ``repro status`` still see it)."""
        try:
            return [i for i in pending(self._registry, self.url) if i.attempts < _PARKED]
        except ReproError as exc:
            self._warn("read", f"cannot read the push queue: {exc}")
            return []

    def _push(self, items: list[QueueItem]) -> bool:
        """Push the queued items one by one: a failing one does not hold up the others —
        but when the first fails, the remote is likely down: the round stops there (one
        attempt counted, not one per item, so an outage does not park every item). True
        when all went through."""
        done = 0
        for item in items:
            if self._push_one(item):
                done += 1
            elif done == 0:
                return False
        return done == len(items)

    def _push_one(self, item: QueueItem) -> bool:
        try:
            versions = [int(item.ref)] if item.kind == "version" else []
            runs = [item.ref] if item.kind == "run" else []
            if self._store is None:
                self._store = LocalStorageBackend(
                    self.root, algorithm=self._registry.hash_algorithm())
            remote = Remote.open(self.name, self.url)
            report = SyncReport("push", self.name, self.url)
            push_selection(self._registry, self._store, remote, versions, runs, report,
                           lambda _: None, background=True)
            with self._registry.transaction() as conn:
                conn.execute("DELETE FROM remote_queue WHERE id = ?", (item.id,))
            return True
        except Exception as exc:  # a remote's trouble must never reach the training loop
            text = f"{type(exc).__name__}: {exc}"[:500]
            with contextlib.suppress(ReproError), self._registry.transaction() as conn:
                conn.execute("UPDATE remote_queue SET attempts = attempts + 1, last_error = ?"
                             " WHERE id = ?", (text, item.id))
            self._warn(type(exc).__name__, f"pushing to remote {self.name!r} failed ({text}); "
                       "will retry; the local store keeps everything")
            return False

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            # (warnings made errors, -W error: the worker must live on all the same)
            with contextlib.suppress(Warning):
                warnings.warn(f"repro: {message}", RuntimeWarning, stacklevel=2)
