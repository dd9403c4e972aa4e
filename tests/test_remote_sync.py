"""``repro push`` / ``repro pull`` between real stores, through real remotes.

Remotes are a moto S3 server on loopback (``s3://bucket/prefix``) and a plain directory. What
each group proves (the failure it would catch):

- round trip: a store pushed, deleted and pulled back answers ``repro verify``,
  ``use_artifact``/``load_artifact``, lineage, metrics (NaN and ±inf bit-exact), TTRL rows and
  aliases exactly as the source did;
- idempotent: a second push or pull moves nothing (no version, run, blob or alias);
- resumable: a push or pull cut off part-way (the backend raising after N blobs, a record
  written but not noted locally) is finished by the next one, with nothing duplicated and
  nothing half-imported;
- two stores that logged the same name offline end with the union, each version once, the
  loser renumbered, ``latest`` the highest number; also with two processes pushing at once.

What a key or a run brings is in ``test_remote_selections.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from repro_core import ArtifactManager, ArtifactNotFoundError, remote
from repro_core.cli import main
from repro_core.errors import StorageError
from repro_core.remote import Remote, SyncReport
from repro_core.remote._records import RemoteVersion, decode, version_uid
from repro_core.ttrl import TTRLContext, run_updates


def _push(url: str, root: Path, key: str | None = None, **kwargs: Any) -> SyncReport:
    return remote.push(url, key, root=root, show_progress=False, **kwargs)


def _pull(url: str, root: Path, key: str | None = None, **kwargs: Any) -> SyncReport:
    return remote.pull(url, key, root=root, show_progress=False, **kwargs)


@pytest.fixture(autouse=True)
def _no_stray_manager() -> Iterator[None]:
    yield
    ArtifactManager.reset_instance()


@pytest.fixture(params=["dir", "s3"])
def remote_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A remote of each kind: a plain directory, and a prefix of a fresh moto S3 bucket
    (tests that exercise no backend-specific path take one kind, to keep the suite quick)."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/team/repro"
    return str(tmp_path / "remote")


# -- the source store ---------------------------------------------------------------------------


def build_source(manager: ArtifactManager, root: Path, work: Path) -> dict[str, str]:
    """prep (data, a directory) -> TTRL train (checkpoints v1..v4, best=v3, metrics with
    NaN/±inf, experiences, a payload blob, online updates) -> evaluate."""
    prep = manager.init_run("prep", {"seed": 1}, root=root)
    manager.log_artifact("data", "dataset", data={"rows": [1, 2, 3], "nan": "kept"})
    tree = work / "corpus"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("alpha\n")
    (tree / "sub" / "b.bin").write_bytes(bytes(range(256)) * 8)
    manager.log_artifact("corpus", "dataset", file_path=tree)
    manager.finalize_run()
    with TTRLContext(root=root, name="train", monitor_hardware=False, capture_level=1) as ctx:
        manager.use_artifact("data:v1")
        manager.use_artifact("corpus:latest")
        ctx.log_experience("e0", {"prompt": "2+3="}, {"answer": "5"}, metadata={"k": 1})
        ctx.log_experience("big", "x" * (70 * 1024), None)  # a payload blob
        ctx.log_online_update("e0", 0.5, 0.9, kl_divergence=math.nan)
        for i, loss in enumerate([1.0, math.nan, -math.inf]):
            weights = work / f"w{i}.bin"
            weights.write_bytes(f"weights {i} ".encode() * 200)
            if i < 2:
                ctx.log_model_checkpoint(weights, step=i, name="ckpt")
            else:
                manager.log_artifact("ckpt", "checkpoint", data=weights.read_bytes(),
                                     parent_artifacts=["ckpt:v2", "data:v1"], aliases=["best"])
            ctx.log_online_update(f"u{i}", math.inf if i else -math.inf, 0.5)
            manager.log_metrics({"loss": loss, "acc": float(i), "big": 1e308 * 10}, step=i)
        weights.write_bytes(b"final weights " * 300)
        ctx.log_model_checkpoint(weights, step=3, name="ckpt")  # v4
        train = ctx.run.id if ctx.run else ""
    manager.init_run("evaluate", root=root)
    manager.use_artifact("ckpt:best")
    manager.log_artifact("report", "evaluation", data={"acc": 0.9}, parent_artifacts=["ckpt:best"])
    evaluate = manager.run_id or ""
    manager.finalize_run()
    assert prep.id
    return {"prep": prep.id, "train": train, "evaluate": evaluate}


# -- what a store answers -----------------------------------------------------------------------


def canon(value: Any) -> Any:
    """A comparable form: floats by repr (NaN == NaN, -inf != inf), tuples as lists."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): canon(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [canon(v) for v in value]
    return value


def content(value: Any) -> Any:
    """What ``load_artifact`` returned, by value (a file's bytes, a directory's tree)."""
    if isinstance(value, Path):
        if value.is_dir():
            return {str(p.relative_to(value)): p.read_bytes()
                    for p in sorted(value.rglob("*")) if p.is_file()}
        return value.read_bytes()
    return value


def _without_path(meta: Any) -> dict[str, Any]:
    data = meta.to_dict()
    data.pop("path", None)
    return data


def snapshot(manager: ArtifactManager, root: Path) -> dict[str, Any]:
    """Everything a user can ask the store: versions (content, aliases, parents), lineage of
    every checkpoint, every run's row, metrics, inputs/outputs, experiences and updates."""
    manager.set_root(root)
    registry = manager.registry()
    versions = {}
    for meta in manager.list_artifacts():
        key = f"{meta.project}/{meta.name}:{meta.version}"
        entry = _without_path(meta)
        assert _without_path(manager.use_artifact(key)) == entry
        entry["content"] = content(manager.load_artifact(key))
        versions[key] = entry
    lineage = {k: manager.get_lineage(k) for k in versions if "/ckpt:" in k}
    runs = {}
    for run in registry.list_runs():
        updates = run_updates(registry, run.id)
        for update in updates:
            vid = update.pop("model_version_id")
            update["model"] = None if vid is None else registry.get_version(vid).key
        experiences = registry.experiences(run.id)
        for exp in experiences:
            if exp["payload_digest"]:
                exp["payload"] = manager.store().blob_path(exp["payload_digest"]).read_bytes()
        runs[run.id] = {
            "row": dict(run.__dict__), "metrics": manager.get_metrics(run.id),
            "inputs": sorted(v.key for v in registry.inputs_of(run.id)),
            "outputs": sorted(v.key for v in registry.outputs_of(run.id)),
            "experiences": experiences, "updates": updates}
    return canon({"versions": versions, "lineage": lineage, "runs": runs})


def differences(a: Any, b: Any, at: str = "") -> list[str]:
    """Where two snapshots differ (a readable failure instead of pytest's elided dicts)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in (differences(a.get(k), b.get(k), f"{at}/{k}") if k in a and k in b
                          else [f"{at}/{k}: only in {'first' if k in a else 'second'}"])]
    if a != b:
        return [f"{at}: {a!r:.200} != {b!r:.200}"]
    return []


def verify(root: Path) -> dict[str, Any]:
    result = CliRunner().invoke(main, ["verify", "--root", str(root), "--json"])
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.output)
    assert report["ok"] and report["blobs_checked"] > 0
    return report


def blob_files(root: Path) -> int:
    return sum(1 for p in (root / "blobs").rglob("*") if p.is_file())


def registry_rows(root: Path, tables: tuple[str, ...] = ("versions", "runs", "aliases",
                                                        "artifact_parents", "run_outputs",
                                                        "run_inputs", "metric_chunks")
                  ) -> dict[str, list[Any]]:
    conn = sqlite3.connect(f"file:{root / 'registry.sqlite'}?mode=ro", uri=True)
    try:
        return {t: sorted(map(repr, conn.execute(f"SELECT * FROM {t}"))) for t in tables}
    finally:
        conn.close()


def versions_of(root: Path, name: str = "ckpt") -> dict[int, tuple[str, str]]:
    """number -> (uid, digest) of every version of ``name`` in a store."""
    conn = sqlite3.connect(f"file:{root / 'registry.sqlite'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT version, project, name, digest, created_at, run_id FROM"
                            " versions WHERE name = ?", (name,)).fetchall()
    finally:
        conn.close()
    return {n: (version_uid(p, nm, d, c, r), d) for n, p, nm, d, c, r in rows}


def remote_versions(url: str, name: str = "ckpt") -> dict[int, tuple[str, str]]:
    """number -> (uid, digest) of every version record of ``name`` on a remote."""
    target = Remote.open("t", remote.normalize_url(url))
    out = {}
    for path in target.records.list(f"versions/default/{name}"):
        data = target.records.get(path)
        assert data is not None
        record = decode(data, path)
        assert isinstance(record, RemoteVersion)
        assert path.endswith(f"/{record.number:012d}.json")
        out[record.number] = (record.uid, record.digest)
    return out


# -- round trip ---------------------------------------------------------------------------------


def test_round_trip_through_a_remote_restores_everything(
        manager: ArtifactManager, tmp_path: Path, remote_url: str) -> None:
    src = tmp_path / "src"
    runs = build_source(manager, src, tmp_path)
    before = snapshot(manager, src)
    assert set(before["runs"]) == set(runs.values())
    assert before["versions"]["default/ckpt:v3"]["aliases"] == ["best"]
    assert before["runs"][runs["train"]]["metrics"]["loss"][1][1] == "nan"
    report = _push(remote_url, src)
    assert report.transferred and not report.problems and not report.renumbered
    assert sorted(report.runs) == sorted(runs.values())
    assert len(report.versions) == len(before["versions"])
    ArtifactManager.reset_instance()
    shutil.rmtree(src)

    pulled = _pull(remote_url, src)
    assert not pulled.problems and not pulled.renumbered
    assert sorted(pulled.versions) == sorted(report.versions)
    assert sorted(pulled.runs) == sorted(report.runs)
    assert pulled.blobs == report.blobs and pulled.bytes == report.bytes
    verify(src)
    manager = ArtifactManager.reset_instance()
    after = snapshot(manager, src)
    assert differences(after, before) == []
    # and a second, unrelated store gets the same answers
    other = tmp_path / "other"
    _pull(remote_url, other)
    verify(other)
    assert differences(snapshot(ArtifactManager.reset_instance(), other), before) == []


def test_push_and_pull_twice_transfer_nothing_the_second_time(
        manager: ArtifactManager, tmp_path: Path, remote_url: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_source(manager, src, tmp_path)
    first = _push(remote_url, src)
    second = _push(remote_url, src)
    assert first.transferred and not second.transferred
    assert (second.versions, second.runs, second.blobs, second.bytes, second.aliases) == (
        [], [], 0, 0, 0)
    assert second.skipped == len(first.versions) and second.skipped_runs == len(first.runs)
    first = _pull(remote_url, dst)
    rows = registry_rows(dst)
    second = _pull(remote_url, dst)
    assert first.transferred and not second.transferred, second.to_json()
    assert (second.versions, second.runs, second.blobs, second.bytes, second.aliases) == (
        [], [], 0, 0, 0)
    assert registry_rows(dst) == rows
    # a store that pulled everything has nothing to push back
    back = _push(remote_url, dst)
    assert not back.transferred, back.to_json()


# -- interrupted, then finished -----------------------------------------------------------------


class Cut(StorageError):
    """The network going away in the middle of a transfer (what the test injects)."""

    def __init__(self) -> None:
        super().__init__("connection reset (injected by the test)", path=None)


def cut_after(monkeypatch: pytest.MonkeyPatch, part: str, method: str, calls: int, *,
              after_effect: bool = False) -> dict[str, int]:
    """Make every ``Remote`` opened from now on fail its ``part.method`` (``backend.upload``,
    ``records.put``…) once ``calls`` calls went through. ``after_effect``: the failing call
    still takes effect, then raises (a reply lost on the way back)."""
    original = Remote.open.__func__  # type: ignore[attr-defined]
    seen = {"calls": 0}

    def opened(cls: type[Remote], name: str, url: str, **options: Any) -> Remote:
        target = original(cls, name, url, **options)
        obj = getattr(target, part)
        real: Callable[..., Any] = getattr(obj, method)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if seen["calls"] >= calls:
                if after_effect:
                    real(*args, **kwargs)
                raise Cut()
            seen["calls"] += 1
            return real(*args, **kwargs)

        setattr(obj, method, wrapped)
        return target

    monkeypatch.setattr(Remote, "open", classmethod(opened))
    return seen


@pytest.mark.parametrize("remote_url", ["s3"], indirect=True)
def test_interrupted_push_is_finished_by_the_next(
        manager: ArtifactManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        remote_url: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_source(manager, src, tmp_path)
    before = snapshot(manager, src)
    with monkeypatch.context() as patch:
        cut_after(patch, "backend", "upload", 3)
        with pytest.raises(Cut):
            _push(remote_url, src)
    target = Remote.open("t", remote.normalize_url(remote_url))
    assert len(list(target.backend.iter_digests())) == 3
    assert target.records.list("versions") == [] and target.records.list("runs") == []
    # a pull now finds no version or run there: one clear error, and no store is left
    with pytest.raises(ArtifactNotFoundError, match="no version or run"):
        _pull(remote_url, tmp_path / "early")
    assert not (tmp_path / "early").exists()

    done = _push(remote_url, src)
    assert done.blobs > 0 and len(done.versions) == len(before["versions"])
    assert _push(remote_url, src).transferred is False
    _pull(remote_url, dst)
    verify(dst)
    assert differences(snapshot(ArtifactManager.reset_instance(), dst), before) == []


def test_push_cut_after_a_claim_is_written_claims_nothing_twice(
        manager: ArtifactManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 4th version record reaches the remote but the reply is lost: the store never
    noted the number. The next push must find its own record (by uid), not claim another."""
    src, url = tmp_path / "src", str(tmp_path / "remote")
    build_source(manager, src, tmp_path)
    before = snapshot(manager, src)
    with monkeypatch.context() as patch:
        cut_after(patch, "records", "put", 3, after_effect=True)
        with pytest.raises(Cut):
            _push(url, src)
    assert len(Remote.open("t", remote.normalize_url(url)).records.list("versions")) == 4
    done = _push(url, src)
    assert not done.renumbered and not done.problems
    assert remote_versions(url) == versions_of(src)
    dst = tmp_path / "dst"
    _pull(url, dst)
    verify(dst)
    assert differences(snapshot(ArtifactManager.reset_instance(), dst), before) == []


@pytest.mark.parametrize("remote_url", ["dir"], indirect=True)
def test_interrupted_pull_imports_nothing_and_the_next_finishes(
        manager: ArtifactManager, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        remote_url: str) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    build_source(manager, src, tmp_path)
    before = snapshot(manager, src)
    pushed = _push(remote_url, src)
    # dst already holds a run of its own: the failed pull must leave its registry as it was
    manager = ArtifactManager.reset_instance()
    manager.init_run("local", root=dst)
    manager.log_artifact("notes", "evaluation", data={"mine": True})
    manager.finalize_run()
    ArtifactManager.reset_instance()
    rows = registry_rows(dst)
    with monkeypatch.context() as patch:
        # 3 run bundles come first, then blobs: cut after 3 of the blobs
        cut_after(patch, "backend", "download", len(pushed.runs) + 3)
        with pytest.raises(Cut):
            _pull(remote_url, dst)
    assert registry_rows(dst) == rows
    fetched = blob_files(dst) - 1  # the local 'notes' blob
    assert fetched == 3
    done = _pull(remote_url, dst)
    assert done.blobs == pushed.blobs - fetched
    verify(dst)
    after = snapshot(ArtifactManager.reset_instance(), dst)
    local = [k for k in after["versions"] if "/notes:" in k]
    assert len(local) == 1
    del after["versions"][local[0]]
    del after["runs"][next(r for r, v in after["runs"].items() if v["row"]["name"] == "local")]
    assert differences(after, before) == []


# -- two stores, one remote ---------------------------------------------------------------------


def _log_offline(manager: ArtifactManager, root: Path, tag: str, count: int,
                 best: int | None = None) -> str:
    run = manager.init_run(f"train-{tag}", root=root)
    for i in range(count):
        manager.log_artifact("ckpt", "checkpoint", data=f"{tag} weights {i}".encode() * 50,
                             aliases=["best"] if i == best else None)
    manager.finalize_run()
    ArtifactManager.reset_instance()
    return run.id or ""


@pytest.mark.parametrize("remote_url", ["dir"], indirect=True)
def test_two_stores_sharing_a_name_end_with_the_union(
        manager: ArtifactManager, tmp_path: Path, remote_url: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _log_offline(manager, a, "A", 2, best=1)
    _log_offline(ArtifactManager.reset_instance(), b, "B", 3, best=0)
    uids_a, uids_b = versions_of(a), versions_of(b)
    first, second = _push(remote_url, a), _push(remote_url, b)
    assert not first.renumbered
    # B's versions went after A's, keeping their order; each move is reported once
    assert sorted(second.renumbered) == [("default/ckpt:v1", "default/ckpt:v3"),
                                         ("default/ckpt:v2", "default/ckpt:v4"),
                                         ("default/ckpt:v3", "default/ckpt:v5")]
    assert versions_of(b) == {3: uids_b[1], 4: uids_b[2], 5: uids_b[3]}
    pulled_a, pulled_b = _pull(remote_url, a), _pull(remote_url, b)
    assert not pulled_a.renumbered and not pulled_b.renumbered
    union = remote_versions(remote_url)
    assert versions_of(a) == versions_of(b) == union
    assert sorted(u for u, _ in union.values()) == sorted(
        u for u, _ in [*uids_a.values(), *uids_b.values()])  # each version exactly once
    for root in (a, b):
        manager = ArtifactManager.reset_instance()
        manager.set_root(root)
        assert manager.use_artifact("ckpt:latest").version == "v5"
        assert manager.use_artifact("ckpt:best").hash == uids_b[1][1]  # B pushed last
        assert manager.load_artifact("ckpt", "v1") == b"A weights 0" * 50
        verify(root)
    assert not _push(remote_url, a).transferred and not _push(remote_url, b).transferred


def test_pull_moves_aside_a_local_version_that_never_left_the_store(
        manager: ArtifactManager, tmp_path: Path) -> None:
    """B pulled A's v1..v2, then logged v3 offline while A pushed its own v3: the pull gives
    the number to A's (the remote's) and moves B's to v4, which B's next push claims."""
    a, b, url = tmp_path / "a", tmp_path / "b", str(tmp_path / "remote")
    _log_offline(manager, a, "A", 2)
    _push(url, a)
    _pull(url, b)
    _log_offline(ArtifactManager.reset_instance(), b, "B", 1)  # B's v3, never pushed
    mine = versions_of(b)[3]
    _log_offline(ArtifactManager.reset_instance(), a, "A3", 1)  # A's v3, pushed first
    _push(url, a)
    report = _pull(url, b)
    assert report.renumbered == [("default/ckpt:v3", "default/ckpt:v4")]
    assert versions_of(b)[3] == versions_of(a)[3] and versions_of(b)[4] == mine
    pushed = _push(url, b)
    assert pushed.versions == ["default/ckpt:v4"] and not pushed.renumbered
    _pull(url, a)
    assert versions_of(a) == versions_of(b) == remote_versions(url)
    assert len({uid for uid, _ in remote_versions(url).values()}) == 4


_PUSHER = """
import json, sys, time
from pathlib import Path
from repro_core import remote
from repro_core.remote import Remote

url, root, here, other = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
lost = []
opened = Remote.open.__func__

def open_(cls, name, url, **options):
    # Both processes reach their first claim before either makes it (each has listed the
    # remote and seen no version yet), then claim slowly: the claims interleave and collide.
    target = opened(cls, name, url, **options)
    put = target.records.put
    def claim(path, data, *, create=False):
        # Version claims only: the remote's one-time conditional-write probe (locks/probe-*)
        # is a create-if-absent put too, and syncing on it let the processes drift apart
        # again before their first real claim.
        if create and path.startswith("versions/"):
            here.touch()
            deadline = time.monotonic() + 60
            while not other.exists() and time.monotonic() < deadline:
                time.sleep(0.002)
            time.sleep(0.01)
        won = put(path, data, create=create)
        if create and not won:
            lost.append(path)
        return won
    target.records.put = claim
    return target

Remote.open = classmethod(open_)
report = remote.push(url, root=root, show_progress=False)
print(json.dumps(report.to_json() | {"lost": lost}))
"""


@pytest.mark.slow
def test_two_processes_pushing_at_once_never_claim_one_number_twice(
        manager: ArtifactManager, tmp_path: Path, s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/shared"
    stores = {tag: tmp_path / tag for tag in "AB"}
    for tag, root in stores.items():
        _log_offline(ArtifactManager.reset_instance(), root, tag, 6)
    ready = {tag: tmp_path / f"ready-{tag}" for tag in stores}
    procs = [subprocess.Popen([sys.executable, "-c", _PUSHER, url, str(root), str(ready[tag]),
                               str(ready["B" if tag == "A" else "A"])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ))
             for tag, root in stores.items()]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert all(not r["problems"] for r in reports)
    # both claimed v1 at once (each had listed the remote empty): one lost and moved on
    assert [p for r in reports for p in r["lost"]].count(
        "versions/default/ckpt/000000000001.json") == 1
    # only 6 numbers are anyone's original ones: at least 6 versions moved
    assert sum(len(r["renumbered"]) for r in reports) >= 6
    union = remote_versions(url)
    assert len(union) == 12
    assert len({uid for uid, _ in union.values()}) == 12
    claimed = [v for r in reports for v in r["versions"]]
    assert len(claimed) == len(set(claimed)) == 12  # no number reported by both
    for root in stores.values():  # each store's numbers are the ones it won on the remote
        mine = versions_of(root)
        assert all(union[n] == v for n, v in mine.items())
    for root in stores.values():
        _pull(url, root)
        assert versions_of(root) == union
        manager = ArtifactManager.reset_instance()
        manager.set_root(root)
        assert manager.use_artifact("ckpt:latest").version == f"v{max(union)}"
