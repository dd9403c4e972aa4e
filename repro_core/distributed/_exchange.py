"""How rank 0's answers reach the other ranks through the process group's key-value store.

Keys (all under ``repro/``; they stay in the store until the job ends, a few hundred bytes
per call)::

    <kind>/<fingerprint>/<n>   rank 0's answer to the n-th call with that fingerprint:
                               {"ok", "value" | "error", "message", "fp", "g", "label"}
    recent/<subject digest>    the arguments (digests) of rank 0's last calls on a subject,
                               read only to explain a call that was never answered
    waiting/<rank>/<flow>      the key one thread of another rank is waiting for
    flows/<rank>               how many threads of that rank have waited
    ended/<epoch>              rank 0 reached finalize_run: it will answer nothing more
    journal/<epoch>/<rank>     which answers that rank took, checked by rank 0 at finalize

Pairing (see ``_ledger`` for why it is safe): rank 1 takes the earliest answer with its
call's fingerprint that it has not taken yet and that is newer than the answer to its
previous call in the same thread. Publishing never blocks, so a call rank 0 makes alone
always returns; a rank waits for its answer with one ``store.wait`` and no polling.

A call rank 0 never answers fails fast without a collective: before waiting, a rank records
the key it waits for (``waiting/…``), then checks ``ended/<epoch>``; when rank 0 reaches
finalize_run it sets ``ended/<epoch>``, then reads every ``waiting/…`` key and writes a
"never" answer into each unanswered one. The store serialises both sequences, so one of the
two sides always sees the other: a waiting rank learns it the moment rank 0 reaches
finalize_run. If rank 0 never gets there (it waits in a collective for the waiting rank),
the wait ends after ``REPRO_BARRIER_TIMEOUT`` with ``DistributedTimeoutError``; either error
says what rank 0 did instead (``recent/…``: "differed from this rank's in: data").
"""

from __future__ import annotations

import builtins
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

from .. import constants
from ..errors import DistributedTimeoutError, ReproError
from ..errors import __all__ as _error_names
from ._errors import RankMismatchError
from ._fingerprint import Call, digest_bytes
from ._ledger import Ledger
from ._ranks import PREFIX, barrier, dist_module, global_rank, key_exists, kv_store
from ._scope import in_rank_zero_only

__all__ = ["EXCHANGE", "Exchange"]

_T = TypeVar("_T")
_RECENT = 4  # calls per subject kept to explain a mismatch
_FIX = ("every rank must make shared calls with the same arguments, and code that runs on "
        "rank 0 alone belongs inside `with repro_core.rank_zero_only():`")


def _group() -> Any | None:
    """``torch.distributed`` when there are other ranks to answer, else None."""
    dist = dist_module()
    return dist if dist is not None and dist.get_world_size() > 1 else None


@dataclass
class _Flow:
    """One thread of a non-zero rank; rank 0 answers its calls in program order."""

    ident: int
    last_g: int = -1


@dataclass
class _Stream:
    """What a non-zero rank knows of rank 0's answers to one fingerprint."""

    gs: dict[int, int] = field(default_factory=dict)  # n -> g, for answers seen
    taken: set[int] = field(default_factory=set)
    first_open: int = 0


class Exchange:
    """Rank 0 answers; other ranks receive the answer to the call *they* made.

    One module-level instance (``EXCHANGE``) lives as long as the process, so a fresh
    ``ArtifactManager`` (``reset_instance``) can never read answers meant for the old one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ledger = Ledger()  # rank 0
        self._recent: dict[str, list[dict[str, Any]]] = {}  # rank 0
        self._streams: dict[str, _Stream] = {}  # other ranks
        self._journal: dict[int, list[tuple[str, int]]] = {}  # other ranks, this epoch
        self._local = threading.local()
        self._epoch = 0
        self._closed: int | None = None

    # -- the call --------------------------------------------------------------------------

    def run_on_zero(self, call: Call, fn: Callable[[], _T], encode: Callable[[_T], Any],
                    decode: Callable[[Any], _T]) -> _T | None:
        """Run ``fn`` on rank 0 and share its outcome; other ranks return rank 0's answer to
        their own call (identified by ``call``), or raise the error rank 0 hit.

        Inside ``rank_zero_only()``: rank 0 runs ``fn`` and publishes nothing, other ranks
        return None at once. Without a process group other ranks return None (nobody to
        ask).
        """
        if in_rank_zero_only():
            if call.every_rank:
                raise RankMismatchError(
                    f"{call.label} involves every rank: call it outside rank_zero_only()",
                    calls=[call.label])
            return fn() if global_rank() == 0 else None
        dist = _group()
        if global_rank() == 0:
            return fn() if dist is None else self._answer(call, fn, encode)
        if dist is None:
            return None
        outcome = self._fetch(call, int(dist.get_rank()))
        if not outcome["ok"]:
            raise _rebuild_error(outcome)
        return decode(outcome["value"])

    # -- rank 0 ------------------------------------------------------------------------------

    def _answer(self, call: Call, fn: Callable[[], _T], encode: Callable[[_T], Any]) -> _T:
        """Rank 0: run and publish in a ``finally``, so a failure (disk full) reaches every
        rank as the same typed error instead of leaving them waiting."""
        fp = call.fingerprint
        with self._lock:
            n, g = self._ledger.reserve(fp, call.label)
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
            self._publish(call, n, g, outcome)

    def _publish(self, call: Call, n: int, g: int, outcome: dict[str, Any]) -> None:
        body = json.dumps(outcome, sort_keys=True, default=str)
        answer = json.dumps({**outcome, "fp": call.fingerprint, "g": g, "label": call.label})
        items = {_answer_key(call, n): answer.encode("utf-8")}
        with self._lock:
            self._ledger.answer(call.fingerprint, n, digest_bytes(body.encode("utf-8")))
            recent = self._recent.setdefault(_subject_key(call), [])
            if not call.every_rank and all(r["fp"] != call.fingerprint for r in recent):
                recent[:] = [*recent, {"fp": call.fingerprint, "parts": call.parts}][-_RECENT:]
                items[_subject_key(call)] = json.dumps(recent).encode("utf-8")
        _set_many(kv_store(), items)

    # -- other ranks ---------------------------------------------------------------------------

    def _flow(self, store: Any, rank: int) -> _Flow:
        flow: _Flow | None = getattr(self._local, "flow", None)
        if flow is None:
            flow = _Flow(int(store.add(f"{PREFIX}flows/{rank}", 1)))
            self._local.flow = flow
        return flow

    def _fetch(self, call: Call, rank: int) -> dict[str, Any]:
        """The earliest untaken answer to ``call`` newer than this thread's last answer."""
        store = kv_store()
        flow, fp = self._flow(store, rank), call.fingerprint
        with self._lock:
            epoch = self._epoch  # a "never" from this epoch on is for this call
        while True:
            n = self._candidate(fp, flow.last_g)
            outcome = self._await(store, call, n, flow, rank, epoch)
            verdict = self._take(fp, n, outcome, flow, epoch)
            if verdict == "mine":
                break
            if verdict == "refused":
                raise RankMismatchError(
                    f"rank {rank}: rank 0 reached finalize_run() without answering "
                    f"{call.label}: {_why_unanswered(store, call)}; {_FIX}",
                    calls=[call.label], rank=rank)
        if outcome["fp"] != fp:  # the key names the fingerprint; this is defence in depth
            raise RankMismatchError(f"rank {rank}: the answer to {outcome.get('label')} was "
                                    f"filed under {call.label}", calls=[call.label], rank=rank)
        return outcome

    def _take(self, fp: str, n: int, outcome: dict[str, Any], flow: _Flow, epoch: int) -> str:
        """Decide whether answer ``n`` is this call's: "mine", "skip" (a call rank 0 made
        alone, or taken by another thread) or "refused" (rank 0 will never answer)."""
        with self._lock:
            stream = self._streams[fp]
            stream.gs[n] = g = int(outcome["g"])
            if outcome.get("never"):
                stream.taken.add(n)  # dead for every thread
                return "refused" if int(outcome["epoch"]) >= epoch else "skip"
            if n in stream.taken or g <= flow.last_g:
                return "skip"
            stream.taken.add(n)
            flow.last_g = g
            self._journal.setdefault(flow.ident, []).append((fp, g))
            return "mine"

    def _candidate(self, fp: str, last_g: int) -> int:
        """Index of the first answer that may be ours: known and eligible, or not seen yet."""
        with self._lock:
            stream = self._streams.setdefault(fp, _Stream())
            while stream.first_open in stream.taken:
                stream.first_open += 1
            n = stream.first_open
            while n in stream.gs and (n in stream.taken or stream.gs[n] <= last_g):
                n += 1
            return n

    def _await(self, store: Any, call: Call, n: int, flow: _Flow, rank: int,
               epoch: int) -> dict[str, Any]:
        key = _answer_key(call, n)
        present = key_exists(store, key)  # rank 0 was ahead: no need to announce or wait
        if not present:
            store.set(f"{PREFIX}waiting/{rank}/{flow.ident}", json.dumps(
                {"key": key, "fp": call.fingerprint, "n": n, "epoch": epoch,
                 "label": call.label}).encode("utf-8"))
            if key_exists(store, f"{PREFIX}ended/{epoch}") and not key_exists(store, key):
                raise RankMismatchError(
                    f"rank {rank}: rank 0 reached finalize_run() without making "
                    f"{call.label}: {_why_unanswered(store, call)}; {_FIX}",
                    calls=[call.label], rank=rank)
        return _read_outcome(store, key, call, present=present)

    # -- finalize ----------------------------------------------------------------------------

    def finalize_barrier(self, name: str) -> None:
        """Every rank, at ``finalize_run``: settle this epoch's calls, then meet at ``name``.

        Rank 0 announces that it will answer nothing more (so a rank waiting for a call rank
        0 never made fails now, not after ``REPRO_BARRIER_TIMEOUT``); the other ranks publish
        which answers they took, for :meth:`verify_pairing`.
        """
        if in_rank_zero_only():
            raise RankMismatchError("finalize_run() involves every rank: call it outside "
                                    "rank_zero_only()", calls=["finalize_run()"])
        dist = _group()
        if dist is not None:
            store, rank = kv_store(), int(dist.get_rank())
            with self._lock:
                epoch, journal = self._epoch, list(self._journal.values())
                self._journal = {}
            if rank == 0:
                self._refuse_waiting(store, epoch, int(dist.get_world_size()))
            else:
                store.set(f"{PREFIX}journal/{epoch}/{rank}", json.dumps(journal).encode())
            with self._lock:
                self._epoch, self._closed = epoch + 1, epoch
        barrier(name)

    def _refuse_waiting(self, store: Any, epoch: int, world: int) -> None:
        """Rank 0: mark the epoch ended, then answer "never" to every call still waiting."""
        store.set(f"{PREFIX}ended/{epoch}", b"1")
        for rank in range(1, world):
            for ident in range(1, int(store.add(f"{PREFIX}flows/{rank}", 0)) + 1):
                slot = f"{PREFIX}waiting/{rank}/{ident}"
                if key_exists(store, slot):
                    self._refuse(store, json.loads(store.get(slot)), epoch)

    def _refuse(self, store: Any, waiting: dict[str, Any], epoch: int) -> None:
        if waiting["epoch"] != epoch or key_exists(store, waiting["key"]):
            return
        with self._lock:
            if self._ledger.count(waiting["fp"]) != waiting["n"]:
                return  # a call in flight on rank 0 will answer it
            _, g = self._ledger.reserve(waiting["fp"], waiting["label"])
        never = {"never": True, "epoch": epoch, "g": g, "fp": waiting["fp"]}
        # compare_set with "": written only if still absent, never over a real answer
        store.compare_set(waiting["key"], "", json.dumps(never))

    def verify_pairing(self) -> None:
        """Rank 0, after :meth:`finalize_barrier`: raise ``RankMismatchError`` if another rank
        may have received the answer to an identical call rank 0 made alone."""
        dist = _group()
        if dist is None or self._closed is None or global_rank() != 0:
            return
        store = kv_store()
        suspects: list[tuple[int, str]] = []
        for rank in range(1, int(dist.get_world_size())):
            flows = json.loads(store.get(f"{PREFIX}journal/{self._closed}/{rank}"))
            with self._lock:
                found = [label for flow in flows for label in self._ledger.suspects(
                    [(fp, int(g)) for fp, g in flow])]
            suspects.extend((rank, label) for label in found)
        if suspects:
            named = ", ".join(f"rank {r}'s {label}" for r, label in suspects[:5])
            raise RankMismatchError(
                f"{named} may hold the answer to a call rank 0 made alone: rank 0 made that "
                "call more than once with the same arguments and different answers, and "
                f"repro cannot tell which one was the other rank's; {_FIX}",
                calls=[label for _, label in suspects], rank=suspects[0][0])


EXCHANGE = Exchange()


def _answer_key(call: Call, n: int) -> str:
    return f"{PREFIX}{call.kind}/{call.fingerprint}/{n}"


def _subject_key(call: Call) -> str:
    return f"{PREFIX}recent/{digest_bytes(f'{call.kind}/{call.subject}'.encode())}"


def _read_outcome(store: Any, key: str, call: Call, *, present: bool) -> dict[str, Any]:
    """Wait (up to ``REPRO_BARRIER_TIMEOUT``, unless ``present``) for ``key``; decode it."""
    timeout = constants.REPRO_BARRIER_TIMEOUT
    try:
        if not present:
            store.wait([key], timedelta(seconds=timeout))
        raw = store.get(key)
    except RuntimeError as exc:  # DistStoreError (timeout) / DistNetworkError (store gone)
        if not _store_alive(store):
            raise DistributedTimeoutError(
                f"lost the process group's store while waiting for rank 0's answer to "
                f"{call.label} ({exc}): rank 0 probably died") from exc
        raise DistributedTimeoutError(
            f"waited {timeout:.0f}s (REPRO_BARRIER_TIMEOUT) for rank 0's answer to "
            f"{call.label}: rank 0 died or is stuck, or never made this call "
            f"({_why_unanswered(store, call)}); {_FIX}") from exc
    decoded: dict[str, Any] = json.loads(raw)
    return decoded


def _set_many(store: Any, items: dict[str, bytes]) -> None:
    """One round trip where the store allows it (TCPStore, HashStore; not FileStore)."""
    if len(items) > 1 and store.has_extended_api():
        store.multi_set(list(items), list(items.values()))
        return
    for key, value in items.items():
        store.set(key, value)


def _store_alive(store: Any) -> bool:
    try:
        store.check([f"{PREFIX}alive"])
    except RuntimeError:
        return False
    return True


def _why_unanswered(store: Any, call: Call) -> str:
    """What rank 0 did instead, from its last calls on the same subject (best effort)."""
    key = _subject_key(call)
    try:
        recent = json.loads(store.get(key)) if key_exists(store, key) else []
    except RuntimeError:
        return "rank 0's calls could not be read"
    if not recent:
        return f"rank 0 made no {call.label} call outside rank_zero_only()"
    if any(r["fp"] == call.fingerprint for r in recent):
        return ("rank 0 made this exact call, but each of its answers was either taken by an "
                "earlier identical call of this rank or older than this thread's previous "
                "answer (this rank made the call more often than rank 0)")
    theirs = recent[-1]["parts"]
    differ = sorted(k for k in {*theirs, *call.parts} if theirs.get(k) != call.parts.get(k))
    return (f"rank 0's last {call.label} differed from this rank's in: "
            f"{', '.join(differ) or 'its subject'}")


def _rebuild_error(outcome: dict[str, Any]) -> BaseException:
    """Re-create rank 0's error on this rank, as the same repro type where possible."""
    name, message = outcome["error"], f"on rank 0: {outcome['message']}"
    from .. import errors

    cls = RankMismatchError if name == "RankMismatchError" else (
        getattr(errors, name) if name in _error_names else None)
    if cls is not None:
        try:
            return cls(message)  # type: ignore[no-any-return]
        except TypeError:
            pass
    builtin = getattr(builtins, name, None)
    if isinstance(builtin, type) and issubclass(builtin, Exception):
        return builtin(message)
    return ReproError(f"{name} {message}")
