"""Two "hosts" sharing one PostgreSQL registry and one S3 bucket (moto, on loopback).

Each host is a process with its own ``REPRO_HOME`` (its blob cache); the registry rows are
shared, the blobs travel through the bucket (each run mirrors what it logs). Host B uses what
host A logged, logs from it, A uses B's output: lineage spans both. Also: the PostgreSQL
server killed and restarted in the middle of a run loses no metric.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pg_support import PgServer

from repro_core import ArtifactManager
from repro_core.lineage import LineageTracker
from repro_core.maintenance import verify_store

_HOST = textwrap.dedent("""
    import sys
    from repro_core import ArtifactManager
    step, home, remote = sys.argv[1], sys.argv[2], sys.argv[3]
    m = ArtifactManager.reset_instance(); m.set_root(home)
    if step == "a1":
        m.init_run("host-a", remote=remote)
        m.log_artifact("raw", "dataset", data=b"raw rows " * 1000)
    elif step == "b":
        m.init_run("host-b", remote=remote)
        raw = m.use_artifact("raw:latest")
        clean = raw.path.read_bytes().replace(b"raw", b"ok!")
        m.log_artifact("clean", "dataset", data=clean, parent_artifacts=["raw"])
    else:
        m.init_run("host-a-train", remote=remote)
        data = m.use_artifact("clean:latest").path.read_bytes()
        assert data.startswith(b"ok! rows"), data[:20]
        m.log_artifact("model", "model", data={"trained_on": len(data)})
    m.finalize_run()
""")


def _host(step: str, home: Path, remote: str) -> None:
    done = subprocess.run([sys.executable, "-c", _HOST, step, str(home), remote],
                          env=dict(os.environ), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_hosts_share_a_registry_and_a_bucket(tmp_path: Path, pg_url: str, s3_bucket: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPRO_REGISTRY", pg_url)
    remote = f"s3://{s3_bucket}/team"
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    _host("a1", host_a, remote)
    _host("b", host_b, remote)  # B has none of A's blobs: fetched from the bucket
    _host("a2", host_a, remote)  # and A none of B's
    mgr = ArtifactManager.reset_instance()
    mgr.set_root(host_b)
    try:
        names = {a.name: a for a in mgr.list_artifacts()}
        assert set(names) == {"raw", "clean", "model"}
        runs = {r.name: r for r in mgr.registry().list_runs()}
        assert names["raw"].run_id == runs["host-a"].id
        assert names["clean"].run_id == runs["host-b"].id
        assert names["clean"].parent_artifacts == ["default/raw:v1"]
        # The model (host A) came from clean (host B), which came from raw (host A).
        upstream = LineageTracker.from_store(host_b).get_ancestors("default/model:v1")
        assert {"default/clean:v1", "default/raw:v1", f"run:{runs['host-a'].id}",
                f"run:{runs['host-b'].id}", f"run:{runs['host-a-train'].id}"} <= upstream
        # B does not hold A's model yet: not missing, on the bucket (verify says so).
        report = verify_store(host_b)
        assert report.ok and report.problems == [] and len(report.elsewhere) == 1
        model = mgr.use_artifact("model:latest")  # B fetches A's last output too
        assert verify_store(host_b).elsewhere == []
        assert model.path is not None and b"trained_on" in model.path.read_bytes()
        assert (host_a / "blobs").is_dir() and (host_b / "blobs").is_dir()
    finally:
        ArtifactManager.reset_instance()


_METRICS = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from repro_core import ArtifactManager
    m = ArtifactManager.reset_instance(); m.set_root(sys.argv[1])
    run = m.init_run("through-a-restart")
    Path(sys.argv[2]).write_text(run.id)
    for i in range(int(sys.argv[3])):
        m.log_metrics({"loss": 1.0 / (i + 1), "step_time": float(i)}, step=i)
        time.sleep(0.002)
    m.log_artifact("after-restart", "dataset", data=b"still here")
    m.finalize_run()
    print("finished")
""")


def test_server_killed_and_restarted_mid_run(tmp_path: Path, pg_url: str, pg_server: PgServer,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL the postmaster while a run logs; restart it two seconds later. The writer keeps
    the points in memory (bounded), reconnects, and the run finishes with every point."""
    monkeypatch.setenv("REPRO_REGISTRY", pg_url)
    steps, id_file = 3000, tmp_path / "run_id"
    child = subprocess.Popen(
        [sys.executable, "-c", _METRICS, str(tmp_path / "store"), str(id_file), str(steps)],
        env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not id_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert id_file.exists(), child.stderr.read() if child.stderr else ""
    time.sleep(1.0)  # some points are written before the kill
    pg_server.kill()
    time.sleep(2.0)
    pg_server.start()
    out, err = child.communicate(timeout=240)
    assert child.returncode == 0, err[-3000:]
    assert "finished" in out
    mgr = ArtifactManager.reset_instance()
    mgr.set_root(tmp_path / "store")
    try:
        metrics = mgr.get_metrics(id_file.read_text())
        assert [p[0] for p in metrics["loss"]] == list(range(steps))
        assert [p[0] for p in metrics["step_time"]] == list(range(steps))
        assert mgr.use_artifact("after-restart").path.read_bytes() == b"still here"
    finally:
        ArtifactManager.reset_instance()


def test_the_first_write_after_a_server_restart_succeeds(tmp_path: Path, pg_url: str,
                                                        pg_server: PgServer,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections kept from before a restart (the pool's, the publish lock's) are replaced
    on first use: the next ``log_artifact`` works, it does not fail once first."""
    monkeypatch.setenv("REPRO_REGISTRY", pg_url)
    mgr = ArtifactManager.reset_instance()
    mgr.set_root(tmp_path / "store")
    try:
        mgr.init_run("across-a-restart")
        mgr.log_artifact("before", "dataset", data=b"before")
        pg_server.stop()
        pg_server.start()
        mgr.log_artifact("after", "dataset", data=b"after")
        assert mgr.use_artifact("before").path.read_bytes() == b"before"
        mgr.finalize_run()
        assert {a.name for a in mgr.list_artifacts()} == {"before", "after"}
    finally:
        ArtifactManager.reset_instance()


def test_another_hosts_version_with_no_remote_says_so(tmp_path: Path, pg_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Logged on host C without a remote: host B is told where the content is (nowhere it
    can reach) and what the logging host must do — not that its own store is corrupt."""
    from repro_core.errors import ArtifactNotFoundError

    monkeypatch.setenv("REPRO_REGISTRY", pg_url)
    mgr = ArtifactManager.reset_instance()
    try:
        mgr.set_root(tmp_path / "host-c")
        mgr.init_run("no-remote")
        mgr.log_artifact("local-only", "dataset", data=b"stays on host c")
        mgr.finalize_run()
        mgr.set_root(tmp_path / "host-b")
        mgr.init_run("reader")
        with pytest.raises(ArtifactNotFoundError, match=r"another host.*REPRO_REMOTE"):
            mgr.use_artifact("local-only")
        mgr.finalize_run()
    finally:
        ArtifactManager.reset_instance()
