"""One rank of a 2-process gloo job driven by ``tests/test_distributed.py``.

Usage::

    python worker.py SCENARIO OUT_DIR [--rank R --world-size W --port P]

Without ``--rank`` the process group comes from torchrun's environment (``env://``); with it,
from ``tcp://127.0.0.1:P`` (the test launches both ranks itself, so a dying rank does not make a
launcher kill the survivor before it has written its observations).

Per-rank settings arrive as JSON in ``REPRO_TEST_RANK_ENV`` (``{"0": {"REPRO_HOME": …,
"cwd": …}, "1": {…}}``) and are applied *before* ``repro_core`` is imported, because
``repro_core.constants`` reads the environment at import time.

Each rank records what it saw in ``OUT_DIR/rank<r>.json``, rewritten (atomically) after every
step, so a rank that hangs and is killed by the test still leaves its last observations.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported for real only after the per-rank environment is applied
    from repro_core import ArtifactManager, Run

BIG_FILE_LIMIT = 1 * 1024 * 1024  # RLIMIT_FSIZE for rank 0 in the disk-full scenario
SOLO_MARKER = "rank0-solo-done"
MARKER_DEADLINE_S = 90.0


class Recorder:
    """Observations of one rank, flushed to ``rank<r>.json`` after each step."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path = out / f"rank{rank}.json"
        self.data: dict[str, Any] = {"rank": rank, "pid": os.getpid(), "steps": []}

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value
        self.data["steps"].append(key)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def _error(exc: BaseException, started: float) -> dict[str, Any]:
    return {
        "type": type(exc).__name__,
        "mro": [c.__name__ for c in type(exc).__mro__],
        "message": str(exc),
        "errno": getattr(exc, "errno", None),
        "elapsed": time.monotonic() - started,
    }


def _attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn``; return its value (``to_dict``-ed) or the error it raised, and the time."""
    started = time.monotonic()
    try:
        value = fn()
    except Exception as exc:
        return {"ok": False, "error": _error(exc, started)}
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return {"ok": True, "value": value, "elapsed": time.monotonic() - started}


def _init_run(manager: ArtifactManager, name: str, **kwargs: Any) -> Run:
    """``init_run`` is typed ``Run | None``; with a process group it always returns a Run."""
    run = manager.init_run(name, **kwargs)
    assert run is not None
    return run


def _wait_for(path: Path, deadline_s: float) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if path.exists():
            return True
        time.sleep(0.05)
    return False


def _wait_for_store_key_value(key: str, needle: str, deadline_s: float) -> bool:
    """Wait until the process group's store holds ``key`` with ``needle`` in its value."""
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if store.check([key]) and needle in store.get(key).decode():
            return True
        time.sleep(0.05)
    return False


# -- scenarios -----------------------------------------------------------------------------


def scenario_happy(rank: int, out: Path, rec: Recorder) -> None:
    """Every rank makes the same calls; then rank 0 alone makes calls while rank 1 idles."""
    from repro_core import ArtifactManager

    m = ArtifactManager()
    run = _init_run(m, "ddp-job", config={"lr": 0.1}, tags=["ddp"])
    rec["init"] = {"id": run.id, "is_rank_zero": run.is_rank_zero, "rank": run.rank}
    run_id = run.id
    assert run_id is not None
    logged = [
        m.log_artifact("weights", "model", data={"w": [1, 2, 3]}, metadata={"epoch": 1}),
        m.log_artifact("dataset", "dataset", file_path=out / "input.bin"),
        m.log_artifact("weights", "model", data={"w": [4, 5, 6]},
                       parent_artifacts=["dataset:v1"], aliases=["best"]),
    ]
    rec["log"] = [meta.to_dict() for meta in logged]
    used = [m.use_artifact("dataset:v1"), m.use_artifact("weights", "best")]
    rec["use"] = [meta.to_dict() for meta in used]
    rec["loaded"] = m.load_artifact("weights", "v1")
    rec["reads"] = {
        "list_artifacts": [meta.to_dict() for meta in m.list_artifacts()],
        "list_weights": [meta.key for meta in m.list_artifacts("weights")],
        "get_lineage": m.get_lineage("weights:v2"),
        "get_run": m.get_run(run_id),
    }

    if rank == 0:
        rec["solo"] = _solo_calls(m, run_id)
        (out / SOLO_MARKER).touch()
    else:
        # Rank 1 makes no repro call until rank 0 is done: a hidden collective on rank 0
        # would block forever here (and the test's subprocess timeout would fail the job).
        rec["waited_for_rank0_solo"] = _wait_for(out / SOLO_MARKER, MARKER_DEADLINE_S)

    # Same call on both ranks again, after rank 0 made calls alone: rank 1 must get *this*
    # call's answer, never the answer to rank 0's solo call.
    rec["after_solo"] = _attempt(lambda: m.log_artifact("after-solo", "metrics", data={"x": 1}))
    rec["finalize"] = _attempt(m.finalize_run)
    rec["final_state"] = run.state.value


def _solo_calls(m: ArtifactManager, run_id: str) -> dict[str, Any]:
    """Rank 0 alone, while rank 1 makes no repro call."""
    from repro_core.distributed import rank_zero_only

    # Unmarked calls no other rank makes with these arguments: they publish, never block.
    solo: dict[str, Any] = {
        "log_artifact": _attempt(lambda: m.log_artifact("solo", "metrics", data={"acc": 0.9})),
        "use_artifact": _attempt(lambda: m.use_artifact("weights:v1")),
        "set_run_state": _attempt(lambda: m.set_run_state("running", reason="rank 0 alone")),
    }
    # Reads identical to the shared ones above, with other answers now: marked, as they
    # must be (unmarked, finalize_run could not tell which one rank 1 made: "ambiguous").
    with rank_zero_only():
        solo["list_artifacts"] = _attempt(lambda: [a.key for a in m.list_artifacts()])
        solo["get_lineage"] = _attempt(lambda: m.get_lineage("weights:v2"))
        solo["get_run"] = _attempt(lambda: m.get_run(run_id))
    return solo


def scenario_dies(rank: int, out: Path, rec: Recorder) -> None:
    """Rank 1 dies before finalize_run; rank 0's finalize must time out, not hang."""
    from repro_core import ArtifactManager

    m = ArtifactManager()
    run = _init_run(m, "dies")
    rec["init"] = {"id": run.id}
    rec["log"] = m.log_artifact("before-death", "metrics", data={"ok": 1}).to_dict()
    if rank == 1:
        os._exit(1)  # no finalize, no cleanup: what an OOM-killed rank looks like
    rec["finalize"] = _attempt(m.finalize_run)
    rec["finalize_again"] = _attempt(m.finalize_run)  # idempotent once the run is closed
    rec["current_run_after"] = m.current_run is None


def scenario_diskfull(rank: int, out: Path, rec: Recorder) -> None:
    """Rank 0's save fails (file size limit = disk full); every rank must learn it."""
    from repro_core import ArtifactManager

    m = ArtifactManager()
    run = _init_run(m, "diskfull")
    rec["init"] = {"id": run.id}
    if rank == 0:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (BIG_FILE_LIMIT, hard))
    rec["big"] = _attempt(lambda: m.log_artifact("big", "dataset", file_path=out / "big.bin"))
    rec["small"] = _attempt(lambda: m.log_artifact("small", "metrics", data={"after": "full"}))
    lonely_done = out / "rank1-lonely-done"
    if rank == 1:
        # A fetch rank 0 never answers. Rank 0 is held back (as if busy in a collective), so
        # only the timeout can end it; once rank 0 reaches finalize_run it ends at once
        # ("mismatch").
        rec["lonely_fetch"] = _attempt(lambda: m.use_artifact("small"))
        lonely_done.touch()
    else:
        rec["waited_for_lonely"] = _wait_for(lonely_done, MARKER_DEADLINE_S)
    rec["finalize"] = _attempt(m.finalize_run)


def scenario_reset(rank: int, out: Path, rec: Recorder) -> None:
    """Two runs in one process group, with ``reset_instance`` in between (switching stores)."""
    from repro_core import ArtifactManager

    m = ArtifactManager()
    first = _init_run(m, "first")
    rec["first"] = {"id": first.id, "log": m.log_artifact("a", "metrics", data={"n": 1}).to_dict()}
    rec["first_finalize"] = _attempt(m.finalize_run)
    m = ArtifactManager.reset_instance()
    m.set_root(out / "second-store")
    entering = out / "rank1-entering-second-init"
    if rank == 0:
        # Let rank 1 ask first (as when rank 0 is busy writing) so the outcome does not depend
        # on scheduling: a buggy rank 1 reads a stale answer within milliseconds of entering
        # init_run; a correct one blocks there until rank 0 answers below.
        rec["rank1_entered_first"] = _wait_for(entering, MARKER_DEADLINE_S)
        time.sleep(2.0)
    else:
        entering.touch()
    second = _init_run(m, "second")
    rec["second_init"] = {"id": second.id}
    rec["second_log"] = _attempt(lambda: m.log_artifact("b", "metrics", data={"n": 2}))
    rec["second_finalize"] = _attempt(m.finalize_run)


def scenario_exit_race(rank: int, out: Path, rec: Recorder) -> None:
    """Rank 0 exits as soon as ``finalize_run`` returns (the end of a training script), while
    rank 1 is a moment slower after the barrier (descheduled on a loaded node)."""
    from repro_core import ArtifactManager

    if rank == 1:
        # Fault injection: delay rank 1's fetch of finalize's outcome. Missing hook = the test
        # can no longer inject the delay: crash loudly rather than pass vacuously.
        exchange = sys.modules.get("repro_core.distributed._exchange")
        original = getattr(exchange, "_read_outcome", None)
        if exchange is None or original is None:
            raise RuntimeError("repro_core.distributed._exchange._read_outcome is gone: "
                               "update this worker")

        def slow_read(store: Any, key: str, call: Any, *, present: bool) -> dict[str, Any]:
            if "finalize" in key:
                time.sleep(1.5)
            return original(store, key, call, present=present)  # type: ignore[no-any-return]

        exchange._read_outcome = slow_read  # type: ignore[attr-defined]
    m = ArtifactManager()
    run = _init_run(m, "exit-race")
    rec["init"] = {"id": run.id}
    rec["finalize"] = _attempt(m.finalize_run)


def scenario_interleaved(rank: int, out: Path, rec: Recorder) -> None:
    """Rank-0-only calls (plain ``if rank == 0:``) interleaved with calls every rank makes,
    of the same name and kind: rank 1 must get the answer to its own call every time."""
    from repro_core import ArtifactManager

    m = ArtifactManager()
    run_id = _init_run(m, "interleaved").id
    assert run_id is not None
    if rank == 0:  # the issue, verbatim
        rec["solo_model"] = m.log_artifact("model", "model", data=b"solo").to_dict()
    rec["shared_model"] = _attempt(lambda: m.log_artifact("model", "model", data=b"shared"))
    steps = []
    for step in range(3):
        if rank == 0:
            m.log_artifact("ckpt", "checkpoint", data={"step": step, "solo": True})
        steps.append(_attempt(partial(m.log_artifact, "ckpt", "checkpoint", data={"step": step})))
    rec["same_name"] = steps
    if rank == 0:
        m.log_artifact("other", "metrics", data={"solo": 1})
        m.use_artifact("ckpt")
    rec["other_names"] = [
        _attempt(lambda: m.log_artifact("other", "metrics", data={"shared": 1})),
        _attempt(lambda: m.log_artifact("third", "metrics", data={"shared": 2})),
    ]
    # A read rank 0 makes alone, a write, then the same read on every rank: not the old answer.
    m.log_metrics({"loss": 1.0}, step=0)
    if rank == 0:
        m.use_artifact("model")
        m.list_artifacts("model")
        m.get_run(run_id)
        m.get_metrics(run_id)
        m.get_lineage("model:latest")
        m.log_metrics({"loss": 2.0}, step=1)
    rec["write"] = _attempt(lambda: m.log_artifact("model", "model", data=b"newer"))
    rec["reads"] = _reads(m, run_id)
    if rank == 0:  # reading again alone, with the same answer, is no ambiguity
        m.use_artifact("model")
    rec["finalize"] = _attempt(m.finalize_run)


def _reads(m: ArtifactManager, run_id: str) -> dict[str, Any]:
    return {
        "use_artifact": _attempt(lambda: m.use_artifact("model")),
        "list_artifacts": _attempt(lambda: [a.to_dict() for a in m.list_artifacts("model")]),
        "get_run": _attempt(lambda: m.get_run(run_id)),
        "get_metrics": _attempt(lambda: m.get_metrics(run_id)),
        "get_lineage": _attempt(lambda: m.get_lineage("model:latest")),
    }


def scenario_scope(rank: int, out: Path, rec: Recorder) -> None:
    """``rank_zero_only()``: rank 0's calls run and publish nothing; rank 1's return None."""
    from repro_core import ArtifactManager
    from repro_core.distributed import EXCHANGE, rank_zero_only

    m = ArtifactManager()
    run_id = _init_run(m, "scope").id
    assert run_id is not None
    rec["first"] = _attempt(lambda: m.log_artifact("model", "model", data=b"first"))
    m.log_metrics({"loss": 1.0}, step=0)
    published = EXCHANGE._ledger.next_g
    with rank_zero_only():
        # Identical to the shared reads below, with other answers (a write in between):
        # were they published, rank 1 would take them.
        rec["scoped_reads"] = _reads(m, run_id)
        rec["scoped_write"] = _attempt(lambda: m.log_artifact("model", "model", data=b"scoped"))
        m.log_metrics({"loss": 2.0}, step=1)
    ran: list[str] = []

    @rank_zero_only
    def save(tag: str) -> Any:
        ran.append(tag)
        return m.log_artifact("model", "model", data=tag.encode())

    rec["decorated"] = {"result": _attempt(lambda: save("decorated")), "ran": ran}
    rec["published_in_scope"] = EXCHANGE._ledger.next_g - published
    rec["reads"] = _reads(m, run_id)
    with rank_zero_only():
        rec["finalize_in_scope"] = _attempt(m.finalize_run)
    rec["run_still_active"] = m.current_run is not None
    rec["finalize"] = _attempt(m.finalize_run)


def scenario_ambiguous(rank: int, out: Path, rec: Recorder) -> None:
    """An unmarked rank-0-only read identical to a later shared one, with a write (also rank 0
    alone) in between: rank 1 cannot tell them apart; finalize_run must say so on every rank."""
    from repro_core import ArtifactManager

    m = ArtifactManager()
    run_id = _init_run(m, "ambiguous").id
    rec["init"] = {"id": run_id}
    rec["shared_write"] = _attempt(lambda: m.log_artifact("data", "dataset", data={"v": 0}))
    if rank == 0:
        rec["solo_read"] = _attempt(lambda: m.use_artifact("data"))
        rec["solo_write"] = _attempt(lambda: m.log_artifact("data", "dataset", data={"v": 1}))
    rec["shared_read"] = _attempt(lambda: m.use_artifact("data"))
    rec["finalize"] = _attempt(m.finalize_run)
    rec["run_closed"] = m.current_run is None


def scenario_mismatch(rank: int, out: Path, rec: Recorder) -> None:
    """Calls rank 0 never answers: arguments that differ between ranks, a rank-1-only call.
    Rank 1's timeout is long: they must fail as soon as rank 0 reaches finalize_run."""
    from repro_core import ArtifactManager
    from repro_core.distributed import Call

    m = ArtifactManager()
    _init_run(m, "mismatch")
    # Per-rank metadata is fine: it does not decide the answer, so it is not fingerprinted.
    rec["per_rank_metadata"] = _attempt(lambda: m.log_artifact(
        "weights", "model", data={"w": [1, 2]}, metadata={"rank": rank, "t": time.time()}))
    data = {"w": [1, 2], "rank": rank}
    if rank == 0:
        # Reach finalize_run only once rank 1 waits for its (never made) version of this call,
        # so that the "rank 0 answers every waiting call with never" path is the one tested;
        # the rank-1-only call below then meets the "rank 0 already ended" path.
        rank1_call = Call("log_artifact", "weights", {
            "type": "model", "data": {**data, "rank": 1}, "file_path": None,
            "parent_artifacts": None, "aliases": None})
        rec["rank1_waiting"] = _wait_for_store_key_value(
            "repro/waiting/1/1", rank1_call.fingerprint, MARKER_DEADLINE_S)
    rec["per_rank_data"] = _attempt(lambda: m.log_artifact("weights", "model", data=data))
    if rank == 1:
        rec["rank1_only"] = _attempt(lambda: m.use_artifact("weights"))
    rec["finalize"] = _attempt(m.finalize_run)


SCENARIOS: dict[str, Callable[[int, Path, Recorder], None]] = {
    "happy": scenario_happy,
    "dies": scenario_dies,
    "diskfull": scenario_diskfull,
    "reset": scenario_reset,
    "exit_race": scenario_exit_race,
    "interleaved": scenario_interleaved,
    "scope": scenario_scope,
    "ambiguous": scenario_ambiguous,
    "mismatch": scenario_mismatch,
}
# Rank 0 hosts the TCP store (tcp:// init); if it exits first, rank 1's last fetch fails. The
# harness keeps rank 0 alive until rank 1 is done, except where that race is the subject.
RANK0_EXITS_AT_ONCE = {"dies", "exit_race"}
RANK1_FINISHED = "rank1-finished"


# -- main ----------------------------------------------------------------------------------


def _apply_rank_env(rank: int) -> None:
    settings = json.loads(os.environ.get("REPRO_TEST_RANK_ENV", "{}")).get(str(rank), {})
    cwd = settings.pop("cwd", None)
    os.environ.update({k: str(v) for k, v in settings.items()})
    if cwd is not None:
        os.chdir(cwd)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    out = args.out.absolute()
    rank = args.rank if args.rank is not None else int(os.environ["RANK"])
    _apply_rank_env(rank)

    import torch.distributed as dist

    if args.rank is None:
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                                rank=args.rank, world_size=args.world_size,
                                timeout=timedelta(seconds=60))
    rec = Recorder(out, rank)
    rec["process_group"] = {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    try:
        SCENARIOS[args.scenario](rank, out, rec)
    except BaseException:
        rec["crash"] = traceback.format_exc()
        raise
    rec["done"] = True
    if rank == 1:
        (out / RANK1_FINISHED).touch()
    elif args.scenario not in RANK0_EXITS_AT_ONCE:
        rec["rank1_finished"] = _wait_for(out / RANK1_FINISHED, MARKER_DEADLINE_S)
    sys.stdout.flush()
    # Skip destroy_process_group/interpreter teardown: with a dead peer it can block, and
    # everything this rank wrote (sqlite commits, JSON) is already durable.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
