"""What a new user's trial of remotes found, pinned: each test is one reported problem.

- a store whose numbers are not in creation order (after a pull) pushed to an empty remote
  must keep every number;
- a remote that lost data is repaired by ``repro push --check``; a pull that meets a missing
  blob names the version that needs it;
- mistyped URLs (``s3:/bucket``), the store as its own remote and an empty remote are refused;
- a bare name pulls from the one project that has it;
- one run-id collision leaves the other runs to be pushed;
- ``repro status`` says what a push would still send.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from repro_core import ArtifactManager, ArtifactNotFoundError, InvalidArgumentError, remote
from repro_core.cli import main
from repro_core.hashing import hash_bytes


def _log(root: Path, *contents: bytes, project: str = "default", run_id: str | None = None,
         name: str = "notes") -> None:
    manager = ArtifactManager.reset_instance()
    manager.init_run("t", project=project, root=root, run_id=run_id)
    for content in contents:
        manager.log_artifact(name, "dataset", data=content)
    manager.finalize_run()
    ArtifactManager.reset_instance()


def _versions(root: Path, name: str = "notes") -> dict[str, bytes]:
    manager = ArtifactManager.reset_instance()
    manager.set_root(root)
    try:
        return {m.version: manager.load_artifact(m.key) for m in manager.list_artifacts(name)}
    finally:
        ArtifactManager.reset_instance()


def _push(url: str, root: Path, **kwargs: object) -> remote.SyncReport:
    return remote.push(url, root=root, show_progress=False, **kwargs)  # type: ignore[arg-type]


def _pull(url: str, root: Path, key: str | None = None) -> remote.SyncReport:
    return remote.pull(url, key, root=root, show_progress=False)


def test_a_pushed_store_keeps_its_numbers_on_an_empty_remote(tmp_path: Path) -> None:
    a, b, r1, r2 = tmp_path / "a", tmp_path / "b", str(tmp_path / "r1"), str(tmp_path / "r2")
    _log(a, b"a1")
    _log(b, b"b1", b"b2")
    _push(r1, b)
    assert _push(r1, a).renumbered == [("default/notes:v1", "default/notes:v3")]
    _pull(r1, a)  # a now holds v1, v2 (b's, created after its own v3 in row order)
    before = _versions(a)
    report = _push(r2, a)
    assert report.renumbered == [] and sorted(report.versions) == [
        "default/notes:v1", "default/notes:v2", "default/notes:v3"]
    assert _versions(a) == before == {"v1": b"b1", "v2": b"b2", "v3": b"a1"}
    assert _versions(_pull(r2, tmp_path / "c") and tmp_path / "c") == before


def test_push_check_repairs_a_remote_that_lost_data(tmp_path: Path) -> None:
    src, url = tmp_path / "src", tmp_path / "remote"
    _log(src, b"one", b"two")
    _push(str(url), src)
    algorithm, hexdigest = hash_bytes(b"one").split(":")
    (url / "blobs" / algorithm / hexdigest[:2] / hexdigest[2:]).unlink()  # the remote lost it
    with pytest.raises(ArtifactNotFoundError,
                       match=r"default/notes:v1\) is missing on .*repro push --check"):
        _pull(str(url), tmp_path / "first")
    shutil.rmtree(url / "meta")  # ... and its records
    assert not _push(str(url), src).transferred  # what this store recorded says "all there"
    repaired = _push(str(url), src, check=True)
    assert repaired.blobs == 1 and len(repaired.versions) == 2
    assert _versions(_pull(str(url), tmp_path / "second") and tmp_path / "second") == {
        "v1": b"one", "v2": b"two"}


def test_mistyped_and_self_pointing_remotes_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _log(src, b"x")
    for url in ("s3:/bucket/prefix", "s3:bucket", "file:relative"):
        with pytest.raises(InvalidArgumentError, match="typo"):
            remote.add_remote("bad", url, root=src)
    for inside in (src, src / "blobs", src / "meta"):
        with pytest.raises(InvalidArgumentError, match="this store"):
            remote.add_remote("me", str(inside), root=src)
        with pytest.raises(InvalidArgumentError, match="this store"):
            _push(str(inside), src)
    empty = tmp_path / "empty-remote"
    empty.mkdir()
    with pytest.raises(ArtifactNotFoundError, match="no version or run records"):
        _pull(str(empty), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert remote.remotes(root=src) == {}


def test_a_bare_name_pulls_from_the_project_that_has_it(tmp_path: Path) -> None:
    src, url = tmp_path / "src", str(tmp_path / "remote")
    _log(src, b"q1", b"q2", project="quickstart", name="checkpoint")
    _push(url, src)
    report = _pull(url, tmp_path / "dst", "checkpoint:v1")
    assert report.versions == ["quickstart/checkpoint:v1"]
    with pytest.raises(ArtifactNotFoundError, match="not on"):
        _pull(url, tmp_path / "dst", "checkpoint:v9")


def test_one_run_id_collision_leaves_the_other_runs_to_be_pushed(tmp_path: Path) -> None:
    a, b, url = tmp_path / "a", tmp_path / "b", str(tmp_path / "remote")
    _log(a, b"a", run_id="baseline")
    _log(b, b"b", run_id="baseline")
    _log(b, b"c", name="other")
    _push(url, a)
    report = _push(url, b)
    assert report.versions == ["default/other:v1"]
    assert any("run baseline was not pushed" in p for p in report.problems)
    _pull(url, a)
    assert _versions(a) == {"v1": b"a"}  # a's own run and version, untouched


def test_status_says_what_a_push_would_send(tmp_path: Path) -> None:
    src, url = tmp_path / "src", str(tmp_path / "remote")
    _log(src, b"one", b"two")
    remote.add_remote("origin", url, root=src)
    runner = CliRunner()
    status = json.loads(runner.invoke(main, ["--root", str(src), "status", "--json"]).output)
    assert status["origin"]["unpushed"] >= 2 and status["origin"]["pending"] == []
    _push("origin", src)
    status = json.loads(runner.invoke(main, ["--root", str(src), "status", "--json"]).output)
    assert status["origin"]["unpushed"] == 0
    result = runner.invoke(main, ["--root", str(src), "remote", "remove", "nosuch"])
    assert result.exit_code == 2 and result.stderr.startswith("repro: error:")
    result = runner.invoke(main, ["--root", str(src), "push", "orgin"])
    assert result.exit_code == 2 and "remotes are origin" in result.stderr


# -- a second review's findings -------------------------------------------------------------------


def _ids_by_number(root: Path, name: str = "notes") -> list[tuple[int, bytes]]:
    manager = ArtifactManager.reset_instance()
    manager.set_root(root)
    try:
        metas = manager.list_artifacts(name)
        return [(int(m.version[1:]), manager.load_artifact(m.key)) for m in metas]
    finally:
        ArtifactManager.reset_instance()


def test_a_losing_store_keeps_its_versions_in_order(tmp_path: Path) -> None:
    a, b, url = tmp_path / "a", tmp_path / "b", str(tmp_path / "remote")
    _log(a, b"a1", b"a2")
    _log(b, b"b1", b"b2", b"b3", b"b4", b"b5")
    _push(url, a)
    _push(url, b)
    assert _ids_by_number(b) == [(3, b"b1"), (4, b"b2"), (5, b"b3"), (6, b"b4"), (7, b"b5")]
    manager = ArtifactManager.reset_instance()
    manager.set_root(b)
    assert manager.load_artifact("notes:latest") == b"b5"
    ArtifactManager.reset_instance()
    _pull(url, b)
    assert [n for n, _ in _ids_by_number(b)] == [1, 2, 3, 4, 5, 6, 7]


def test_a_version_held_by_another_remote_keeps_its_number(tmp_path: Path) -> None:
    x, s, r1, r2 = tmp_path / "x", tmp_path / "s", str(tmp_path / "r1"), str(tmp_path / "r2")
    _log(x, b"x1", b"x2")
    _push(r1, x)
    _pull(r1, s)  # s holds R1's v1, v2
    other = tmp_path / "other"
    _log(other, b"o1", b"o2", b"o3")
    _push(r2, other)  # R2 already has v1..v3
    report = _push(r2, s)
    assert report.renumbered == [] and len(report.problems) == 2  # kept here, said why
    assert _versions(s) == {"v1": b"x1", "v2": b"x2"}  # R1's names still work here


def test_an_alias_conflict_is_resolved_by_pulling_then_pushing(tmp_path: Path) -> None:
    a, b, url = tmp_path / "a", tmp_path / "b", str(tmp_path / "remote")

    def log_best(root: Path, content: bytes) -> None:
        manager = ArtifactManager.reset_instance()
        manager.init_run("alias", root=root)
        manager.log_artifact("notes", "dataset", data=content, aliases=["best"])
        manager.finalize_run()
        ArtifactManager.reset_instance()

    _log(a, b"one")
    log_best(a, b"two")
    _push(url, a)
    _pull(url, b)  # both agree: best = "two"
    log_best(a, b"three")
    _push(url, a)  # the remote's best moves to "three"
    log_best(b, b"four")  # ... while b's moves to "four"
    conflict = _push(url, b)
    assert any("moved both here and on" in p for p in conflict.problems)
    seen = _pull(url, b)
    assert any("this store's is kept" in p for p in seen.problems)
    assert _push(url, b).aliases == 1  # after the pull, a push sends this store's
    _pull(url, a)
    manager = ArtifactManager.reset_instance()
    manager.set_root(a)
    assert manager.load_artifact("notes:best") == b"four"
    ArtifactManager.reset_instance()


def test_a_failed_first_pull_leaves_no_trace(tmp_path: Path) -> None:
    src, url = tmp_path / "src", tmp_path / "remote"
    _log(src, b"one")
    _push(str(url), src)
    algorithm, hexdigest = hash_bytes(b"one").split(":")
    (url / "blobs" / algorithm / hexdigest[:2] / hexdigest[2:]).unlink()
    with pytest.raises(ArtifactNotFoundError):
        _pull(str(url), tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["remote", "src"]  # no hidden work dir


def test_a_version_whose_run_record_is_missing_is_not_filed_under_a_same_id_run(
        tmp_path: Path) -> None:
    a, b, url = tmp_path / "a", tmp_path / "b", tmp_path / "remote"
    _log(a, b"from a", run_id="baseline")
    _push(str(url), a)
    (url / "meta" / "runs" / "baseline.json").unlink()  # a push cut before its run record
    _log(b, b"from b", run_id="baseline", name="mine")
    report = _pull(str(url), b)
    assert report.versions == [] and any("baseline" in p for p in report.problems)
    assert _versions(b) == {}  # nothing of a's was filed under b's run "baseline"


# -- a second trial's findings --------------------------------------------------------------------


def test_another_store_is_refused_as_a_remote_and_a_remote_is_not_a_cache(
        tmp_path: Path) -> None:
    a, b, url = tmp_path / "a", tmp_path / "b", tmp_path / "remote"
    _log(a, b"one")
    _log(b, b"two")
    with pytest.raises(InvalidArgumentError, match="another repro store"):
        remote.add_remote("b", str(b), root=a)
    _push(str(url), a)
    assert not (url / "CACHEDIR.TAG").exists()  # backup tools must not skip a remote


def test_push_check_on_an_intact_remote_reports_nothing_sent(tmp_path: Path) -> None:
    src, url = tmp_path / "src", str(tmp_path / "remote")
    _log(src, b"one", b"two")
    _push(url, src)
    checked = _push(url, src, check=True)
    assert not checked.transferred and checked.skipped == 2 and checked.skipped_runs == 1


def test_leftovers_of_killed_pushes_and_pulls_are_swept(tmp_path: Path) -> None:
    import subprocess
    import sys

    src, url = tmp_path / "src", tmp_path / "remote"
    _log(src, b"one")
    _push(str(url), src)
    # a first pull into "dst" killed (SIGKILL) while it holds its work directory's lock
    script = ("import fcntl, os, sys, tempfile, time; d = tempfile.mkdtemp(prefix='.dst.pull-',"
              " dir=sys.argv[1]); fd = os.open(d + '.lock', os.O_RDWR | os.O_CREAT);"
              " fcntl.flock(fd, fcntl.LOCK_EX); print(d, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    left = Path(proc.stdout.readline().strip())
    (left / "blobs").mkdir()
    proc.kill()
    proc.wait(30)
    # ... and a temp file a killed push left in the remote's tmp/
    stale = url / "tmp" / "12345-deadbeef.part"
    stale.write_bytes(b"half an upload")
    _pull(str(url), tmp_path / "dst")
    assert not left.exists() and not Path(f"{left}.lock").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "remote", "src"]
    _log(src, b"two")
    _push(str(url), src)
    assert not stale.exists()


def test_a_replaced_run_bundle_outlives_one_push(tmp_path: Path) -> None:
    """A pull that read a run's record just before a push replaced it can still fetch the
    bundle that record names: bundles are deleted two pushes after they were replaced."""
    from repro_core.remote._records import RunRecord, decode

    src, url = tmp_path / "src", tmp_path / "remote"
    manager = ArtifactManager.reset_instance()
    run = manager.init_run("long", root=src)
    assert run.id is not None
    record_path = url / "meta" / "runs" / f"{run.id}.json"
    bundles = []
    for step in range(3):
        manager.log_artifact("ckpt", "checkpoint", data=f"w{step}".encode())  # a new bundle
        _push(str(url), src)
        record = decode(record_path.read_bytes(), str(record_path))
        assert isinstance(record, RunRecord)
        bundles.append(record.bundle)
    manager.finalize_run()
    ArtifactManager.reset_instance()
    store = remote.Remote.open("r", remote.normalize_url(str(url))).backend
    assert len(set(bundles)) == 3
    assert not store.exists(bundles[0])  # two pushes old: deleted
    assert store.exists(bundles[1]) and store.exists(bundles[2])  # the replaced one outlives
