"""One test per defect found in review, so none comes back. Each names what it protects."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from repro_core import (
    ArtifactManager,
    IntegrityError,
    InvalidArgumentError,
    InvalidNameError,
    RunStateError,
    SerializationError,
    StorageError,
    TTRLContext,
    collect_garbage,
    verify_store,
)
from repro_core.store.local import LocalStorageBackend


def test_gc_keeps_ttrl_payload_blobs(manager: ArtifactManager, store_root: Path) -> None:
    with TTRLContext(name="t", root=store_root, monitor_hardware=False, capture_level=1) as t:
        t.log_experience("big", {"prompt": "x" * 70_000}, {"a": 1})
    report = collect_garbage(store_root, dry_run=False, grace_seconds=0)
    assert report.blobs == []
    assert t.experiences()[0]["input"] == {"prompt": "x" * 70_000}
    assert verify_store(store_root).unreferenced == []


def test_damaged_payload_is_an_integrity_error(manager: ArtifactManager,
                                               store_root: Path) -> None:
    with TTRLContext(name="t", root=store_root, monitor_hardware=False, capture_level=1) as t:
        t.log_experience("big", "y" * 70_000, None)
    store = LocalStorageBackend(store_root)
    (digest,) = [d for d in store.iter_digests()
                 if store.blob_path(d).stat().st_size > 70_000]
    store.blob_path(digest).unlink()
    with pytest.raises(IntegrityError):
        t.experiences()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_exit_leaves_the_parent_run_alone(tmp_path: Path) -> None:
    """A forked child (a DataLoader worker, say) exiting normally runs the atexit hooks it
    inherited: they must neither finish the parent's run nor flush its metrics buffer."""
    code = (
        "import os, sys\nfrom repro_core import ArtifactManager\n"
        "m = ArtifactManager(); run = m.init_run('parent', root=sys.argv[1])\n"
        "m.log_metrics({'loss': 1.0})\n"
        "pid = os.fork()\n"
        "if pid == 0:\n    sys.exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print(m.get_run(run.id)['state'])\n"
        "m.finalize_run()\n"
        "print(len(m.get_metrics(run.id)['loss']))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["running", "1"], out.stderr


def test_dedup_repairs_a_rotted_blob(manager: ArtifactManager, run: object) -> None:
    first = manager.log_artifact("a", "dataset", data=b"important bytes")
    assert first.path is not None
    os.chmod(first.path, 0o644)
    data = bytearray(first.path.read_bytes())
    data[0] ^= 1
    first.path.write_bytes(bytes(data))
    second = manager.log_artifact("b", "dataset", data=b"important bytes")
    assert second.hash == first.hash
    assert manager.use_artifact("b").path.read_bytes() == b"important bytes"  # type: ignore
    assert manager.use_artifact("a").path.read_bytes() == b"important bytes"  # type: ignore


def test_ttrl_refuses_to_log_after_the_run_was_finalized(manager: ArtifactManager,
                                                         store_root: Path) -> None:
    ctx = TTRLContext(name="t", root=store_root, monitor_hardware=False, capture_level=1)
    with ctx:
        ctx.log_online_update("e", 1.0, 1.0)
        manager.finalize_run()  # e.g. a callback finished the run
        with pytest.raises(RunStateError):
            ctx.log_online_update("e", 1.0, 1.0)
    assert len(ctx.updates_for(None)) == 1


@pytest.mark.slow
@pytest.mark.parametrize(("tail", "state"), [
    ("sys.exit(1)", "failed"), ("sys.exit(0)", "completed"),
    ("raise KeyboardInterrupt", "interrupted"),
])
def test_exit_status_decides_the_state(tmp_path: Path, tail: str, state: str) -> None:
    code = ("import sys\nfrom repro_core import ArtifactManager\n"
            "r = ArtifactManager().init_run('x', root=sys.argv[1]); print(r.id, flush=True)\n"
            + tail + "\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")],
                         capture_output=True, text=True).stdout.split()[0]
    manager = ArtifactManager.reset_instance()
    manager.set_root(tmp_path / "s")
    assert manager.get_run(out)["state"] == state
    ArtifactManager.reset_instance()


def test_self_referencing_data_is_an_error_not_a_hang(manager: ArtifactManager,
                                                      run: object) -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="contains itself"):
        manager.log_artifact("x", "config", data={"a": loop})
    many = [loop] * 1000  # used to blow up memory before failing
    with pytest.raises(SerializationError, match="contains itself"):
        manager.log_artifact("x", "config", data={"m": many})
    shared = [1, 2]
    assert manager.log_artifact("ok", "config", data={"a": shared, "b": shared}).version == "v1"
    with pytest.raises(SerializationError):
        manager.log_artifact("x", "config", data={"a": 1}, metadata={"m": loop})


def test_non_utf8_file_name_is_refused_before_any_write(manager: ArtifactManager, run: object,
                                                        tmp_path: Path,
                                                        store_root: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("ok")
    try:
        (src / os.fsdecode(b"bad\xff.txt")).write_text("x")
    except (OSError, UnicodeError):
        pytest.skip("this filesystem refuses non-UTF-8 names")
    before = sorted(store_root.rglob("*"))
    with pytest.raises(InvalidArgumentError, match="not valid UTF-8"):
        manager.log_artifact("dir", "dataset", file_path=src)
    assert sorted(store_root.rglob("*")) == before


def test_unusable_root_is_a_storage_error(manager: ArtifactManager, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    for root in (a_file, a_file / "below"):
        with pytest.raises(StorageError):
            ArtifactManager.reset_instance().init_run("r", root=root)
    store = LocalStorageBackend(tmp_path / "s")
    with pytest.raises(IntegrityError):
        store.verify("blake3:" + "0" * 64)


def test_ignored_sigterm_stays_ignored(tmp_path: Path) -> None:
    code = ("import os, signal, sys\nfrom repro_core import ExperimentContext\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "with ExperimentContext(name='x', root=sys.argv[1], monitor_hardware=False,"
            " capture_level=1):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "print('survived', signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "survived True", out.stderr
    assert signal.getsignal(signal.SIGTERM) is not None


def test_executable_bit_survives_a_directory_round_trip(manager: ArtifactManager, run: object,
                                                        tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (src / "run.sh").chmod(0o755)
    (src / "data.txt").write_text("d")
    used = manager.use_artifact(manager.log_artifact("tools", "code", file_path=src).key)
    assert used.path is not None
    assert os.access(used.path / "run.sh", os.X_OK)
    assert not os.access(used.path / "data.txt", os.X_OK)


def test_relogging_same_content_keeps_the_new_parents(manager: ArtifactManager,
                                                      run: object) -> None:
    cfg = manager.log_artifact("cfg", "config", data={"lr": 1})
    manager.log_artifact("model", "model", data=b"w")
    again = manager.log_artifact("model", "model", data=b"w", parent_artifacts=[cfg.key])
    assert again.version == "v1" and again.parent_artifacts == ["default/cfg:v1"]


def test_argument_checks(manager: ArtifactManager, run: object) -> None:
    manager.log_metrics({"loss": 1.0})
    with pytest.raises(InvalidArgumentError):
        manager.get_metrics(keys="loss")  # type: ignore[arg-type]
    with pytest.raises(InvalidNameError):
        manager.use_artifact("model", version="²")


def test_reset_instance_flushes_the_old_writer(manager: ArtifactManager,
                                               store_root: Path) -> None:
    run = manager.init_run("r")
    manager.log_metrics({"loss": 2.0})
    fresh = ArtifactManager.reset_instance()
    fresh.set_root(store_root)
    assert run.id is not None
    assert fresh.get_metrics(run.id)["loss"][0][1] == 2.0


def test_checkpoint_decorator_links_config_inputs_and_previous(manager: ArtifactManager,
                                                               store_root: Path) -> None:
    import torch

    from repro_core import ExperimentContext, checkpoint

    @checkpoint(metric="loss")
    def epoch(model: torch.nn.Module, loss: float) -> dict[str, float]:
        return {"loss": loss}

    manager.init_run("prep", root=store_root)
    manager.log_artifact("data", "dataset", data={"rows": 3})
    manager.finalize_run()
    with ExperimentContext(config={"lr": 1}, name="train", root=store_root,
                           monitor_hardware=False, capture_level=1):
        manager.use_artifact("data")
        net = torch.nn.Linear(2, 1)
        first = epoch(net, 1.0)
        with torch.no_grad():
            net.weight.add_(1)
        epoch(net, 0.5)
    assert first == {"loss": 1.0}
    second = manager.list_artifacts("checkpoint")[-1]
    assert set(second.parent_artifacts) == {"default/config:v1", "default/data:v1",
                                            "default/checkpoint:v1"}


# -- second review ------------------------------------------------------------------------------


def test_v2_store_gains_payload_sizes_by_migration(tmp_path: Path) -> None:
    """A store written at schema v2 (experiences without payload_size) opens and works."""
    import sqlite3

    from repro_core.registry import SCHEMA_VERSION, Registry, run_script
    from repro_core.registry.schema import _SCHEMA_V1, _SCHEMA_V2

    path = tmp_path / "s" / "registry.sqlite"
    path.parent.mkdir()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    run_script(conn, _SCHEMA_V1)
    run_script(conn, _SCHEMA_V2)
    conn.execute("INSERT INTO schema_version VALUES (2)")
    conn.execute("INSERT INTO store_meta VALUES ('hash_algorithm', 'blake3')")
    conn.execute("INSERT INTO runs VALUES ('r1', 'old', 'p', 'completed', '[]', '{}', 't',"
                 " 't', 'h', 1, 1)")
    conn.execute("INSERT INTO experiences (run_id, experience_id, input, output, payload_digest,"
                 " metadata, time) VALUES ('r1', 'e', '1', '2', NULL, '{}', 1.0)")
    conn.execute("COMMIT")
    conn.close()
    registry = Registry(path)
    assert registry._read("SELECT version FROM schema_version")[0][0] == SCHEMA_VERSION == 8
    assert registry.experiences("r1")[0]["payload_size"] is None
    registry.close()
    assert collect_garbage(tmp_path / "s", dry_run=False).blobs == []
    with TTRLContext(name="new", root=tmp_path / "s", monitor_hardware=False,
                     capture_level=1) as t:
        t.log_experience("e2", "x" * 70_000, 1)
    assert [e["output"] for e in t.experiences()] == [1]


@pytest.mark.parametrize("bad", ["a\x00b", "bad\ud800", "tab\there", ""])
def test_experience_ids_that_sql_text_would_mangle_are_refused(
        manager: ArtifactManager, store_root: Path, bad: str) -> None:
    with TTRLContext(name="t", root=store_root, monitor_hardware=False, capture_level=1) as t:
        with pytest.raises(InvalidArgumentError):
            t.log_experience(bad, 1, 2)
        with pytest.raises(InvalidArgumentError):
            t.log_online_update(bad, 1.0, 1.0)
        t.log_experience("fine", {"text": "to Infinity and NaN \u2603"}, "\x00 inside data")
    assert t.experiences()[0]["output"] == "\x00 inside data"  # data keeps its NULs


def test_non_finite_rewards_are_stored(manager: ArtifactManager, store_root: Path) -> None:
    with TTRLContext(name="t", root=store_root, monitor_hardware=False, capture_level=1) as t:
        t.log_online_update("e", float("inf"), 0.5)
        t.log_online_update("e", 1.0, 0.5, kl_divergence=float("-inf"))
    stored = t.updates_for(None)
    assert stored[0]["reward"] == float("inf") and stored[1]["kl_divergence"] == float("-inf")


def test_relogging_cannot_make_a_lineage_cycle(manager: ArtifactManager, run: object) -> None:
    from repro_core import LineageTracker

    p = manager.log_artifact("P", "dataset", data=b"p")
    manager.log_artifact("Q", "dataset", data=b"q", parent_artifacts=["P"])
    # Same content as P's latest: the existing version comes back; the looping edge is dropped.
    again = manager.log_artifact("P", "dataset", data=b"p", parent_artifacts=["Q"])
    assert again.key == p.key and again.parent_artifacts == []
    manager.finalize_run()
    manager.init_run("uses-q")
    manager.use_artifact("Q")
    assert manager.log_artifact("P", "dataset", data=b"p").version == "v1"
    manager.finalize_run()
    assert LineageTracker.from_store(manager.root).detect_cycles() == []


def test_repaired_blob_rebuilds_the_directory_cache(manager: ArtifactManager, run: object,
                                                    tmp_path: Path) -> None:
    src = tmp_path / "d"
    src.mkdir()
    (src / "f.txt").write_bytes(b"important bytes")
    used = manager.use_artifact(manager.log_artifact("d", "dataset", file_path=src).key)
    assert used.path is not None
    blob = LocalStorageBackend(manager.root).blob_path(
        manager.log_artifact("f", "dataset", file_path=src / "f.txt").hash)  # type: ignore
    os.chmod(blob, 0o644)
    blob.write_bytes(b"hmportant bytes")  # rot, seen through the cache's hard link too
    with pytest.raises(IntegrityError):
        manager.use_artifact("d")
    manager.log_artifact("g", "dataset", file_path=src / "f.txt")  # republish repairs it
    again = manager.use_artifact("d")
    assert again.path is not None and (again.path / "f.txt").read_bytes() == b"important bytes"


@pytest.mark.slow
@pytest.mark.parametrize(("tail", "state"), [
    ("import threading\nt = threading.Thread(target=lambda: sys.exit(1)); t.start(); t.join()",
     "completed"),
    ("try:\n    sys.exit(2)\nexcept SystemExit:\n    pass\n"
     "m.finalize_run(); r = m.init_run('second'); print(r.id, flush=True)", "completed"),
])
def test_exit_outcome_is_the_processes(tmp_path: Path, tail: str, state: str) -> None:
    code = ("import sys\nfrom repro_core import ArtifactManager\nm = ArtifactManager()\n"
            "r = m.init_run('x', root=sys.argv[1]); print(r.id, flush=True)\n" + tail + "\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60).stdout.split()
    manager = ArtifactManager.reset_instance()
    manager.set_root(tmp_path / "s")
    assert manager.get_run(out[-1])["state"] == state
    ArtifactManager.reset_instance()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_does_not_pin_the_publish_lock(tmp_path: Path) -> None:
    import threading
    import time

    store = LocalStorageBackend(tmp_path / "s")
    inside, release = threading.Event(), threading.Event()

    def writer() -> None:
        with store.publish_guard():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=writer)
    thread.start()
    assert inside.wait(10)
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a DataLoader worker that lives on (until the test kills it)
        os.close(hold_w)
        os.read(hold_r, 1)
        os._exit(0)
    os.close(hold_r)
    try:
        release.set()
        thread.join()
        start = time.monotonic()
        with store.publish_guard(exclusive=True):
            pass
        # The child never exits by itself: a pinned lock would be a 60 s wait and an error.
        assert time.monotonic() - start < 30.0
    finally:
        os.close(hold_w)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_gc_right_after_a_large_experience_keeps_it(manager: ArtifactManager,
                                                    store_root: Path) -> None:
    with TTRLContext(name="t", root=store_root, monitor_hardware=False, capture_level=1) as t:
        t.log_experience("big", "z" * 70_000, None)
        assert collect_garbage(store_root, dry_run=False, grace_seconds=0).blobs == []
    assert t.experiences()[0]["input"] == "z" * 70_000


def test_an_artifact_may_be_called_run(manager: ArtifactManager, run: object) -> None:
    manager.log_artifact("run", "dataset", data=b"r")
    assert manager.get_lineage("run")["artifact"]["name"] == "run"
    assert manager.get_lineage("run:v1")["artifact"]["version"] == "v1"
