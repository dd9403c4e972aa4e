"""TTRLContext: experiences, online updates linked to model versions, snapshots, metrics.

What each group proves (the failure it would catch):

- experiences keep their input/output/metadata (the seed's original dropped them), inline up to
  64 KiB and as a content-addressed blob above, and come back identical;
- every online update is stored and linked to the checkpoint in force when it was made, so
  ``updates_for(key)`` answers "which updates produced this checkpoint?";
- buffer snapshots follow the interval on an injected clock, and ``force=True`` resets it;
- the original metric names reach the metrics store; records, aggregates and errors are as
  documented; defaults (capture level COMPLETE, ``ttrl_`` names) are kept.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import pytest

from repro_core import ArtifactManager, InvalidArgumentError, RunStateError, SerializationError
from repro_core.capture import EnvironmentCaptureLevel
from repro_core.ttrl import INLINE_PAYLOAD_BYTES, TTRLContext


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _ctx(root: Path, **kwargs: Any) -> TTRLContext:
    kwargs.setdefault("monitor_hardware", False)
    kwargs.setdefault("capture_level", 1)  # COMPLETE (the default) runs git/pip: slow
    return TTRLContext(root=root, **kwargs)


# -- defaults and arguments ---------------------------------------------------------------------


def test_defaults(manager: ArtifactManager) -> None:
    ctx = TTRLContext(monitor_hardware=False)
    assert ctx.capture_level == EnvironmentCaptureLevel.COMPLETE == 3
    assert re.fullmatch(r"ttrl_\d{8}_\d{6}", ctx.name)
    assert ctx.experience_snapshot_interval == 3600.0
    assert TTRLContext(name="online", monitor_hardware=False).name == "online"


@pytest.mark.parametrize("kwargs", [{"experience_snapshot_interval": -1},
                                    {"experience_snapshot_interval": "hourly"},
                                    {"experience_snapshot_interval": math.nan},
                                    {"experience_snapshot_interval": math.inf},
                                    {"experience_snapshot_interval": True},
                                    {"window": 0}, {"window": 2.5}, {"window": True}])
def test_bad_arguments_rejected_before_any_run(manager: ArtifactManager,
                                               kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        TTRLContext(monitor_hardware=False, **kwargs)
    assert manager.current_run is None


def test_logging_outside_the_context_is_refused(manager: ArtifactManager,
                                                store_root: Path) -> None:
    ctx = _ctx(store_root)
    with pytest.raises(RunStateError, match="entered"):
        ctx.log_online_update("e", 1.0, 1.0)
    with pytest.raises(RunStateError):
        ctx.log_experience("e", 1, 2)
    with pytest.raises(RunStateError, match="never entered"):
        ctx.updates_for(None)
    with ctx:
        ctx.log_online_update("e", 1.0, 1.0)
    with pytest.raises(RunStateError):
        ctx.log_online_update("e", 1.0, 1.0)  # the run is over: nothing more is recorded
    assert [u["update_id"][-3:] for u in ctx.updates_for(None)] == ["-u1"]  # reads still work


# -- experiences --------------------------------------------------------------------------------


def test_experiences_round_trip_inline_and_blob(manager: ArtifactManager,
                                                store_root: Path) -> None:
    small_in = {"prompt": "2+3=", "tokens": [2, 11, 3, 12], "nan": float("nan")}
    small_out = {"answers": ["5", "5", "6"], "majority": "5"}
    big_in = {"image": "x" * (80 * 1024), "shape": [3, 224, 224]}
    big_out = ["y" * 1000] * 10
    with _ctx(store_root) as ctx:
        rec = ctx.log_experience("small", small_in, small_out, metadata={"source": "test"})
        ctx.log_experience("big", big_in, big_out)
        ctx.log_experience("text", "plain input", None)
        got = ctx.experiences()
        run_id = ctx.run.id if ctx.run else None
    assert rec["experience_id"] == "small" and rec["metadata"] == {"source": "test"}
    assert set(rec) == {"experience_id", "input", "output", "timestamp", "metadata"}
    assert abs(rec["timestamp"] - time.time()) < 60
    assert [e["experience_id"] for e in got] == ["small", "big", "text"]
    assert got[0]["input"]["tokens"] == [2, 11, 3, 12]
    assert got[0]["input"]["nan"] == rec["input"]["nan"] == "nan"  # JSON-safe text, not NaN
    assert got[0]["output"] == small_out and got[0]["metadata"] == {"source": "test"}
    assert got[1]["input"] == big_in and got[1]["output"] == big_out
    assert got[2]["input"] == "plain input" and got[2]["output"] is None
    assert "payload_digest" not in got[0]
    # How they are stored: the big one's row holds only a digest, the blob holds the payload.
    assert run_id is not None
    rows = manager.registry().experiences(run_id)
    assert rows[0]["payload_digest"] is None and rows[0]["output"] == small_out
    assert rows[1]["payload_digest"] is not None and rows[1]["input"] is None
    assert manager.store().blob_path(rows[1]["payload_digest"]).is_file()


@pytest.mark.parametrize(("extra", "as_blob"), [(0, False), (1, True)])
def test_inline_limit_is_exactly_64_kib(manager: ArtifactManager, store_root: Path,
                                        extra: int, as_blob: bool) -> None:
    # canonical JSON: '"aaa…"' is len + 2 characters, '"b"' is 3; together exactly the limit.
    text = "a" * (INLINE_PAYLOAD_BYTES - 5 + extra)
    with _ctx(store_root) as ctx:
        ctx.log_experience("edge", text, "b")
        assert ctx.experiences()[0]["input"] == text
        run_id = ctx.run.id if ctx.run else ""
    assert INLINE_PAYLOAD_BYTES == 64 * 1024
    assert (manager.registry().experiences(run_id or "")[0]["payload_digest"] is not None) \
        is as_blob


@pytest.mark.parametrize("bad", ["", None, 42, "x" * 257])
def test_bad_experience_id(manager: ArtifactManager, store_root: Path, bad: Any) -> None:
    with _ctx(store_root) as ctx:
        with pytest.raises(InvalidArgumentError, match="experience_id"):
            ctx.log_experience(bad, 1, 2)
        with pytest.raises(ValueError, match="experience_id"):
            ctx.log_online_update(bad, 1.0, 0.5)
        assert ctx.experiences() == []
        assert ctx.updates_for(None) == []
        assert ctx.aggregates()["experience_count"] == 0


def test_rejected_update_consumes_no_update_number(manager: ArtifactManager,
                                                   store_root: Path) -> None:
    with _ctx(store_root) as ctx:
        with pytest.raises(InvalidArgumentError):
            ctx.log_online_update("", 1.0, 0.5)
        with pytest.raises(TypeError):
            ctx.log_online_update("e1", 1.0, 0.5, metadata={"x": object()})
        assert ctx.aggregates()["update_count"] == 0
        record = ctx.log_online_update("e1", 1.0, 0.5)
        assert record["update_id"].endswith("-u1")


# -- online updates -----------------------------------------------------------------------------


def test_online_update_record_and_rejections(manager: ArtifactManager, store_root: Path) -> None:
    with _ctx(store_root) as ctx:
        rec = ctx.log_online_update("exp-1", 1, 0.75, kl_divergence=0.01,
                                    metadata={"k": 8, "pseudo_label": "5"})
        with pytest.raises(TypeError, match="'reward'"):
            ctx.log_online_update("exp-2", "high", 0.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="'confidence'"):
            ctx.log_online_update("exp-2", 1.0, None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="'kl_divergence'"):
            ctx.log_online_update("exp-2", 1.0, 0.5, kl_divergence=[0.1])  # type: ignore
        second = ctx.log_online_update("exp-2", 0.0, 0.25)
        stored = ctx.updates_for(None)
    assert set(rec) == {"update_id", "experience_id", "reward", "confidence", "kl_divergence",
                        "timestamp", "metadata"}
    assert rec["experience_id"] == "exp-1" and rec["reward"] == 1.0
    assert isinstance(rec["reward"], float) and rec["confidence"] == 0.75
    assert rec["kl_divergence"] == 0.01 and rec["metadata"] == {"k": 8, "pseudo_label": "5"}
    assert abs(rec["timestamp"] - time.time()) < 60
    assert second["kl_divergence"] is None and second["metadata"] == {}
    assert rec["update_id"] != second["update_id"]
    assert [u["update_id"] for u in stored] == [rec["update_id"], second["update_id"]]
    assert stored[0] == rec  # the stored row is the returned record
    assert stored[1]["kl_divergence"] is None


def test_updates_link_to_the_checkpoint_in_force(manager: ArtifactManager, store_root: Path,
                                                 tmp_path: Path) -> None:
    def checkpoint_file(i: int) -> Path:
        path = tmp_path / f"policy-{i}.pt"
        path.write_bytes(f"weights {i}".encode() * 50)
        return path

    with _ctx(store_root) as ctx:
        ctx.log_online_update("a0", 0.1, 0.5)
        ctx.log_online_update("a1", 0.2, 0.5)
        v0 = ctx.log_model_checkpoint(checkpoint_file(0), step=2, metrics={"reward": 0.15})
        for i in range(3):
            ctx.log_online_update(f"b{i}", 0.5, 0.6)
        v1 = ctx.log_model_checkpoint(checkpoint_file(1), step=5)
        ctx.log_online_update("c0", 0.9, 0.9)
        # a non-checkpoint artifact does not change the model version
        ctx.log_artifact("notes", "evaluation", data={"ok": True})
        ctx.log_online_update("c1", 0.8, 0.9)

        before = ctx.updates_for(None)
        under_v0 = ctx.updates_for(v0.key)
        under_v1 = ctx.updates_for(v1.key)
        under_latest = ctx.updates_for(v1.key.rsplit(":", 1)[0] + ":latest")
    assert v0.key != v1.key and v0.key.rsplit(":", 1)[0] == v1.key.rsplit(":", 1)[0]
    assert [u["experience_id"] for u in before] == ["a0", "a1"]
    assert [u["experience_id"] for u in under_v0] == ["b0", "b1", "b2"]
    assert [u["experience_id"] for u in under_v1] == ["c0", "c1"]
    assert under_latest == under_v1
    assert manager.use_artifact(v1.key).metadata["step"] == 5
    # "which updates produced the second checkpoint?" -> those made while the first was in force
    assert ctx.updates_producing(v1.key) == under_v0
    assert ctx.updates_producing(v0.key) == before


@pytest.mark.parametrize("json1", [True, False], ids=["json_each", "executemany"])
def test_nonfinite_rewards_round_trip_exactly(manager: ArtifactManager, store_root: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              json1: bool) -> None:
    """SQLite stores a NaN REAL as NULL: a NaN reward read back as None, like a missing KL."""
    from repro_core import _metrics_rows

    monkeypatch.setattr(_metrics_rows, "_json1", json1)  # False: the executemany fallback
    with _ctx(store_root) as ctx:
        ctx.log_online_update("a", math.nan, math.inf, kl_divergence=-math.inf)
        ctx.log_online_update("b", -math.inf, 0.5, kl_divergence=math.nan)
        ctx.log_online_update("c", 1.0, 0.25)
        stored = ctx.updates_for(None)
        run_id = ctx.run.id if ctx.run else ""
    a, b, c = stored
    assert math.isnan(a["reward"]) and a["confidence"] == math.inf
    assert a["kl_divergence"] == -math.inf
    assert b["reward"] == -math.inf and math.isnan(b["kl_divergence"])
    assert c["kl_divergence"] is None and c["confidence"] == 0.25
    got = manager.get_metrics(run_id)
    assert math.isnan(got["online/reward"][0][1]) and got["online/reward"][1][1] == -math.inf


def test_updates_producing_answers_for_the_run_that_logged_the_checkpoint(
        manager: ArtifactManager, store_root: Path, tmp_path: Path) -> None:
    """Asked in another run's context, the answer was [] or that run's own updates."""
    def weights(i: int) -> Path:
        path = tmp_path / f"w{i}.bin"
        path.write_bytes(f"weights {i}".encode() * 20)
        return path

    def ids(updates: list[dict[str, Any]]) -> list[str]:
        return [u["experience_id"] for u in updates]

    with _ctx(store_root, name="first") as first:
        first.log_online_update("a0", 0.1, 0.5)
        first.log_online_update("a1", 0.2, 0.5)
        c1 = first.log_model_checkpoint(weights(1), step=2)
        first.log_online_update("b0", 0.3, 0.5)
        c2 = first.log_model_checkpoint(weights(2), step=3)
    with _ctx(store_root, name="second") as second:
        second.log_online_update("x0", 0.4, 0.5)
        # resumed from first's c2, which becomes a parent of second's first checkpoint
        s1 = second.log_artifact("checkpoint", "checkpoint", file_path=weights(3),
                                 parent_artifacts=[c2.key])
        second.log_online_update("y0", 0.5, 0.5)
        assert ids(second.updates_producing(c2.key)) == ["b0"]
        assert ids(second.updates_producing(c1.key)) == ["a0", "a1"]
        assert ids(second.updates_producing(s1.key)) == ["x0"]  # not first's, via the resume
        notes = second.log_artifact("notes", "evaluation", data={"ok": True})
    from repro_core.ttrl import run_updates, updates_for, updates_producing

    registry = manager.registry()  # no context needed: what the CLI uses
    assert first.run is not None and second.run is not None and second.run.id is not None
    assert ids(updates_producing(registry, manager.version_id(c2.key))) == ["b0"]
    assert ids(updates_for(registry, str(first.run.id), manager.version_id(c1.key))) == ["b0"]
    everything = run_updates(registry, second.run.id)
    assert [(u["experience_id"], u["model_version_id"]) for u in everything] == [
        ("x0", None), ("y0", manager.version_id(s1.key))]
    assert ids(first.updates_producing(c2.key)) == ["b0"]  # after the context, too
    with pytest.raises(InvalidArgumentError, match="checkpoint"):
        updates_producing(registry, manager.version_id(notes.key))


def test_lone_surrogates_are_refused_before_anything_is_buffered(manager: ArtifactManager,
                                                                 store_root: Path) -> None:
    with _ctx(store_root) as ctx:
        with pytest.raises(InvalidArgumentError, match="experience_id"):
            ctx.log_online_update("e\udc80", 1.0, 0.5)
        with pytest.raises(SerializationError):
            ctx.log_online_update("e", 1.0, 0.5, metadata={"k": "v\udc80"})
        with pytest.raises(SerializationError):
            ctx.log_online_update("e", 1.0, 0.5, metadata={"k\udc80": 1})
        with pytest.raises(InvalidArgumentError, match="experience_id"):
            ctx.log_experience("e\udc80", 1, 2)
        with pytest.raises(SerializationError):
            ctx.log_experience("e", {"prompt": "x\udc80"}, 2)
        with pytest.raises(SerializationError):
            ctx.log_experience("e", 1, 2, metadata={"source": "\udc80"})
        ctx.log_online_update("ok", 1.0, 0.5)
        ctx.log_experience("ok", 1, 2)
        updates, experiences, agg = ctx.updates_for(None), ctx.experiences(), ctx.aggregates()
    assert [u["update_id"][-3:] for u in updates] == ["-u1"]
    assert [e["experience_id"] for e in experiences] == ["ok"]
    assert (agg["update_count"], agg["experience_count"]) == (1, 1)


def test_updates_are_per_run(manager: ArtifactManager, store_root: Path,
                             tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"w" * 10)
    with _ctx(store_root, name="first") as first:
        first.log_online_update("first-0", 1.0, 1.0)
        checkpoint = first.log_model_checkpoint(path, step=1)
        first.log_online_update("first-1", 1.0, 1.0)
    with _ctx(store_root, name="second") as second:
        second.log_online_update("second-0", 0.0, 0.0)
        assert [u["experience_id"] for u in second.updates_for(None)] == ["second-0"]
        assert second.updates_for(checkpoint.key) == []
    assert first.run is not None and first.run.id is not None
    version = manager.version_id(checkpoint.key)
    assert [u["experience_id"] for u in
            manager.registry().online_updates(first.run.id, version)] == ["first-1"]


def test_metric_names_and_values(manager: ArtifactManager, store_root: Path) -> None:
    clock = FakeClock()
    with _ctx(store_root, clock=clock) as ctx:
        clock.advance(1800)  # half an hour after entering
        ctx.log_experience("e0", 1, 2)
        ctx.log_online_update("e0", 1.0, 0.5, kl_divergence=0.1)
        ctx.log_experience("e1", 1, 2)
        ctx.log_online_update("e1", 0.0, 0.25)
        ctx.log_metrics({"custom": 3.0})
    assert ctx.run is not None and ctx.run.id is not None
    got = ArtifactManager().get_metrics(ctx.run.id)

    def values(key: str) -> list[float]:
        return [v for _, v, _ in got[key]]

    assert {"online/reward", "online/confidence", "online/kl_divergence", "online/update_count",
            "online/experience_count", "online/experiences_per_hour", "custom"} <= set(got)
    assert values("online/reward") == [1.0, 0.0]
    assert values("online/confidence") == [0.5, 0.25]
    assert values("online/kl_divergence") == [0.1]  # only logged when given
    assert values("online/update_count") == [1.0, 2.0]
    assert values("online/experience_count") == [1.0, 2.0]
    assert values("online/experiences_per_hour") == [2.0, 4.0]  # 1 and 2 in half an hour


def test_aggregates_are_window_means(manager: ArtifactManager, store_root: Path) -> None:
    with _ctx(store_root, window=3) as ctx:
        empty = ctx.aggregates()
        kls = [0.5, None, 0.1, None, 0.3]
        for i, kl in enumerate(kls):
            ctx.log_online_update(f"e{i}", float(i + 1), (i + 1) / 10, kl_divergence=kl)
        ctx.log_experience("x", 1, 1)
        agg = ctx.aggregates()
    assert empty["update_count"] == 0 and empty["mean_reward"] is None
    assert empty["mean_kl_divergence"] is None and empty["window"] == 0
    assert agg["update_count"] == 5 and agg["experience_count"] == 1 and agg["window"] == 3
    assert agg["mean_reward"] == pytest.approx(4.0)  # last three: 3, 4, 5
    assert agg["mean_confidence"] == pytest.approx(0.4)
    assert agg["mean_kl_divergence"] == pytest.approx(0.2)  # None skipped: 0.1, 0.3


# -- experience buffer snapshots ----------------------------------------------------------------


def test_snapshots_follow_the_interval_on_a_fake_clock(manager: ArtifactManager,
                                                       store_root: Path) -> None:
    clock = FakeClock()
    with _ctx(store_root, experience_snapshot_interval=10, clock=clock) as ctx:
        assert ctx.log_experience_buffer([1]) is None  # t = 0 since enter
        clock.advance(9.99)
        assert ctx.log_experience_buffer([1]) is None
        clock.advance(0.01)  # t = 10: due
        ctx.log_experience("e", 1, 2)
        first = ctx.log_experience_buffer([1, 2])
        assert first is not None
        assert first.metadata == {"experience_count": 1, "update_count": 0}
        clock.advance(5)  # t = 15: not due, but forced (and the timer restarts)
        assert ctx.log_experience_buffer([1, 2, 3]) is None
        forced = ctx.log_experience_buffer([1, 2, 3], force=True)
        assert forced is not None and forced.key != first.key
        clock.advance(9.5)  # t = 24.5: 9.5 s after the forced snapshot
        assert ctx.log_experience_buffer([4]) is None
        clock.advance(0.5)  # t = 25
        third = ctx.log_experience_buffer({"items": [4]})
        assert third is not None and third.key not in (first.key, forced.key)
    assert [m.key for m in manager.list_artifacts("experience_buffer")] == [
        first.key, forced.key, third.key]
    assert manager.load_artifact(forced.key) == [1, 2, 3]
    assert manager.load_artifact(third.key) == {"items": [4]}


def test_zero_interval_snapshots_every_call(manager: ArtifactManager, store_root: Path) -> None:
    with _ctx(store_root, experience_snapshot_interval=0, clock=FakeClock()) as ctx:
        keys = [getattr(ctx.log_experience_buffer([i]), "key", None) for i in range(3)]
    assert None not in keys and len(set(keys)) == 3  # a new version every call
    assert keys == [m.key for m in manager.list_artifacts("experience_buffer")]


def test_snapshot_with_nonfinite_values(manager: ArtifactManager, store_root: Path) -> None:
    with _ctx(store_root) as ctx:
        meta = ctx.log_experience_buffer({"r": [1.0, math.inf]}, force=True)
    assert meta is not None
    assert manager.load_artifact(meta.key) == {"r": [1.0, "inf"]}  # valid JSON, not Infinity


_BUSY_LOOP = """
import sys
from repro_core import ArtifactManager, TTRLContext
ctx = TTRLContext(name="busy", root=sys.argv[1], monitor_hardware=False, capture_level=1)
ctx.__enter__()
print(ctx.run.id, flush=True)
i = 0
while True:
    ctx.log_online_update(f"e{i}", 0.5, 0.9)
    i += 1
    if i % 20000 == 0:
        print(i, flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_updates_are_durable_while_the_loop_keeps_running(tmp_path: Path) -> None:
    """The writer must make progress beside a loop that never lets go of the GIL: a SIGKILL
    loses only the last seconds. (``executemany`` re-takes the GIL per row and starved here:
    minutes for a batch; one ``json_each`` statement releases it for the whole insert.)"""
    from helpers.kill_loop import kill_after

    from repro_core.registry import Registry

    root = tmp_path / "s"
    run_id, must_have, _ = kill_after(_BUSY_LOOP, [str(root)], 6.0, slack=3.0)
    registry = Registry(root / "registry.sqlite", readonly=True)  # or REPRO_REGISTRY's server
    try:
        ((stored,),) = registry._read("SELECT COUNT(*) FROM online_updates WHERE run_id = ?",
                                      (run_id,))
    finally:
        registry.close()
    assert stored >= must_have > 0, (stored, must_have)
