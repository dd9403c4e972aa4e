"""``WandBStorageBackend`` on the real ``wandb`` package, in W&B offline mode.

Offline, what is logged must land in the offline run, ready for ``wandb sync``: we read the
run's ``.wandb`` file back the way ``wandb sync`` does (W&B's LevelDB-style record log, each
record a ``wandb_internal_pb2.Record``, checksums checked) and assert on the artifact record
itself — its name, aliases, metadata and manifest — and on the staged copy of each file.
What offline W&B cannot do (reads, lineage) must say so. The online paths need a W&B server,
which cannot run here: they are exercised with small stand-ins for ``wandb.Api`` and for an
online run (the objects replaced), to show the digest check, the not-found mapping, and that
each parent is used before the child is logged.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from repro_core import (
    ArtifactNotFoundError,
    IntegrityError,
    InvalidArgumentError,
    StorageError,
    WandBStorageBackend,
    constants,
    hash_file,
)
from repro_core.errors import InvalidNameError
from repro_core.store import _wandb_mirror
from repro_core.store.wandb_backend import artifact_name

wandb = pytest.importorskip("wandb")

from test_wandb_suite import (  # noqa: E402 (after importorskip)
    finish,
    logged_artifacts,
    manifest,
    md5_b64,
    offline_env,
    run_files,
    run_record,
)


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return offline_env(tmp_path, monkeypatch)


@pytest.fixture
def offline_run(tmp_path: Path, wandb_env: Path) -> Iterator[Any]:
    run = wandb.init(project="repro-blobs", dir=str(tmp_path / "wandb"), reinit="create_new")
    try:
        yield run
    finally:
        run.finish()


def _blob(tmp_path: Path, content: bytes = b"weights " * 1000,
          name: str = "blob.bin") -> tuple[Path, str]:
    path = tmp_path / name
    path.write_bytes(content)
    return path, hash_file(path)


# -- blobs: upload offline, reads refused -----------------------------------------------------


def test_offline_upload_lands_in_the_offline_run(tmp_path: Path, offline_run: Any) -> None:
    path, digest = _blob(tmp_path)
    backend = WandBStorageBackend()
    backend.set_run(offline_run)
    where = backend.upload(path, digest, aliases=["checkpoint-v3"])
    assert where == f"wandb-artifact://repro-blobs/{artifact_name(digest)}:latest"
    finish(offline_run)
    (record,) = logged_artifacts(tmp_path / "wandb")
    assert (record.name, record.type) == (artifact_name(digest), "repro-blob")
    assert set(record.aliases) == {"latest", "checkpoint-v3"}
    assert json.loads(record.metadata) == {"digest": digest, "size": 8000}
    content = path.read_bytes()
    assert manifest(record) == {artifact_name(digest): (8000, md5_b64(content), content)}


def test_a_file_that_is_not_the_digest_is_refused(tmp_path: Path, offline_run: Any) -> None:
    path, _ = _blob(tmp_path)
    other = "blake3:" + "0" * 64
    with pytest.raises(IntegrityError, match="nothing was uploaded"):
        WandBStorageBackend(offline_run).upload(path, other)
    finish(offline_run)
    assert logged_artifacts(tmp_path / "wandb") == []


def test_offline_reads_say_wandb_sync_and_leave_nothing(tmp_path: Path,
                                                        offline_run: Any) -> None:
    path, digest = _blob(tmp_path)
    backend = WandBStorageBackend(offline_run)
    backend.upload(path, digest)
    target = tmp_path / "out" / "blob"
    for call in (lambda: backend.download(digest, target), lambda: backend.exists(digest),
                 lambda: backend.delete(digest), lambda: list(backend.iter_digests())):
        with pytest.raises(StorageError, match="wandb sync") as info:
            call()
        assert "local repro store" in str(info.value)
    assert not target.exists() and not target.parent.exists()


def test_bad_input_is_refused_before_any_io(tmp_path: Path) -> None:
    path, digest = _blob(tmp_path)
    with pytest.raises(StorageError, match="set_run"):
        WandBStorageBackend().upload(path, digest)
    with pytest.raises(StorageError, match="cannot read") as info:
        WandBStorageBackend(run=object()).upload(tmp_path / "missing", digest)
    assert info.value.errno == 2  # ENOENT, as the local and fsspec backends say it
    for aliases in (["a:b"], ["a/b"], [""], ["x" * 129], "best"):
        with pytest.raises(InvalidArgumentError, match="W&B aliases"):
            WandBStorageBackend(run=object()).upload(path, digest, aliases=aliases)
    for bad in ("sha1:abc", "blake3:../../etc/passwd", "blake3:" + "g" * 64):
        with pytest.raises(InvalidArgumentError):
            WandBStorageBackend().upload(path, bad)
        with pytest.raises(InvalidArgumentError):
            artifact_name(bad)


def test_import_repro_core_does_not_import_wandb() -> None:
    code = ("import sys, repro_core\n"
            "from repro_core.store.wandb_backend import WandBStorageBackend\n"
            "WandBStorageBackend.from_url('wandb://team/proj')\n"
            "print('wandb' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


# -- wandb:// URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "entity", "project"), [
    ("wandb://mnist", None, "mnist"), ("wandb://my-team/mnist.v2", "my-team", "mnist.v2"),
    ("WANDB://team_1/p", "team_1", "p"), (" wandb://p ", None, "p"),
])
def test_from_url(url: str, entity: str | None, project: str) -> None:
    backend = WandBStorageBackend.from_url(url)
    assert (backend._entity, backend._project) == (entity, project)
    assert backend.url == (f"wandb://{entity}/{project}" if entity else f"wandb://{project}")


@pytest.mark.parametrize(("url", "says"), [
    ("wandb://user:hunter2@team/proj", "credentials"), ("wandb://hunter2@proj", "credentials"),
    ("wandb://team/proj?api_key=hunter2", "query"), ("wandb://team/proj#hunter2", "query"),
    ("wandb://", "invalid W&B project"), ("wandb://team/", "invalid W&B project"),
    ("wandb:///proj", "invalid W&B entity"), ("wandb://a/b/c", "3 parts"),
    ("wandb://team/pro ject", "invalid W&B project"), ("wandb://../x", "invalid W&B entity"),
    ("wandb://-x", "invalid W&B project"), ("wandb://" + "p" * 129, "invalid W&B project"),
    ("s3://bucket/p", "not a W&B URL"), ("wandb:/p", "not a W&B URL"), (42, "string"),
])
def test_bad_urls_are_refused(url: Any, says: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match=says) as info:
        WandBStorageBackend.from_url(url)
    assert "hunter2" not in str(info.value)  # a secret is never repeated in a message
    with pytest.raises(InvalidArgumentError):
        WandBStorageBackend(project="a/b")


# -- ensure_run / close ---------------------------------------------------------------------


def test_ensure_run_opens_an_offline_mirror_run_and_close_finishes_it(
        tmp_path: Path, wandb_env: Path) -> None:
    backend = WandBStorageBackend.from_url("wandb://mirror")
    run = backend.ensure_run()
    try:
        assert run.offline and backend.ensure_run() is run  # one run per backend
    finally:
        backend.close()
    assert run._is_finished
    (run_file,) = run_files(tmp_path / "wandb")  # under today's WANDB_DIR
    record = run_record(run_file)
    assert (record.project, record.job_type, record.run_id) == ("mirror", "repro-mirror", run.id)
    backend.close()  # nothing left to finish
    second = backend.ensure_run()  # a fresh run after close
    backend.close()
    assert second is not run


def test_threads_share_one_run(tmp_path: Path, wandb_env: Path) -> None:
    backend = WandBStorageBackend.from_url("wandb://mirror")
    barrier, runs = threading.Barrier(4), []

    def first_use() -> None:
        barrier.wait()
        runs.append(backend.ensure_run())

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    backend.close()
    assert len(runs) == 4 and len({id(r) for r in runs}) == 1
    assert len(run_files(tmp_path / "wandb")) == 1


@pytest.mark.parametrize("why", ["REPRO_OFFLINE", "not logged in"])
def test_own_run_is_offline_without_wandb_mode(why: str, wandb_env: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE")
    if why == "REPRO_OFFLINE":
        monkeypatch.setattr(constants, "REPRO_OFFLINE", True)  # REPRO_OFFLINE=1, as parsed
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)  # logged in, but told to stay offline
    backend = WandBStorageBackend.from_url("wandb://mirror")
    try:
        assert backend.ensure_run().offline
    finally:
        backend.close()


def test_own_run_is_online_when_logged_in(wandb_env: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The online ``wandb.init`` itself needs a server: a stand-in records its arguments."""
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    calls: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> _OnlineRun:
        calls.append(kwargs)
        return _OnlineRun()

    monkeypatch.setattr(wandb, "init", init)
    WandBStorageBackend.from_url("wandb://team/mirror").ensure_run()
    assert calls == [{"project": "mirror", "entity": "team", "job_type": "repro-mirror",
                      "mode": "online", "reinit": "create_new",
                      "dir": str(wandb_env / "wandb")}]
    monkeypatch.setattr(wandb, "init", _raise(RuntimeError("network is unreachable")))
    with pytest.raises(StorageError, match="could not start a W&B run for wandb://team/mirror"):
        WandBStorageBackend.from_url("wandb://team/mirror").ensure_run()


def test_ensure_run_prefers_set_run_then_the_active_run_of_its_project(
        tmp_path: Path, wandb_env: Path) -> None:
    user = wandb.init(project="mirror", dir=str(tmp_path / "wandb"))
    try:
        assert wandb.run is user
        same = WandBStorageBackend.from_url("wandb://mirror")
        assert same.ensure_run() is user
        same.close()  # not the backend's run: left running
        assert not user._is_finished and wandb.run is user
        chosen = object()
        assert WandBStorageBackend(chosen, project="mirror").ensure_run() is chosen

        other = WandBStorageBackend.from_url("wandb://elsewhere")
        own = other.ensure_run()
        assert own is not user and own.project == "elsewhere"
        assert wandb.run is user  # the user's run is still the global one
        other.close()
        assert own._is_finished and not user._is_finished
    finally:
        user.finish()


def test_a_disabled_run_is_refused(tmp_path: Path, wandb_env: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path, digest = _blob(tmp_path)
    run = wandb.init(project="p", mode="disabled")
    with pytest.raises(StorageError, match="disabled"):
        WandBStorageBackend(run).upload(path, digest)
    run.finish()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with pytest.raises(StorageError, match="WANDB_MODE=disabled"):
        WandBStorageBackend.from_url("wandb://p").ensure_run()


# -- mirror_version, offline for real --------------------------------------------------------


def _mirror_args(digest: str, **over: Any) -> dict[str, Any]:
    args: dict[str, Any] = {"digest": digest, "project": "vision", "name": "resnet",
                            "version": 3, "type": "model", "aliases": ["best", "latest"],
                            "parents": [], "metadata": {"acc": 0.91, "loss": float("inf")}}
    return {**args, **over}


def test_mirror_a_file_offline(tmp_path: Path, wandb_env: Path) -> None:
    path, digest = _blob(tmp_path, b"\x00model bytes" * 500)
    backend = WandBStorageBackend.from_url("wandb://mirror")
    ref = backend.mirror_version(path, **_mirror_args(digest))
    backend.close()
    assert ref == f"wandb-artifact://mirror/{artifact_name(digest)}:resnet-v3"
    (record,) = logged_artifacts(tmp_path / "wandb")
    assert (record.name, record.type, record.project) == (artifact_name(digest), "repro-blob",
                                                          "mirror")
    assert set(record.aliases) == {"resnet-v3", "resnet-best", "resnet-latest", "latest"}
    assert json.loads(record.metadata) == {
        "digest": digest, "size": 6000,
        "repro": {"project": "vision", "name": "resnet", "version": 3, "type": "model",
                  "digest": digest, "aliases": ["best", "latest"], "parents": [],
                  "kind": "file"},
        "metadata": {"acc": 0.91, "loss": "inf"}}  # W&B refuses inf: kept as a string
    content = path.read_bytes()
    assert manifest(record) == {artifact_name(digest): (6000, md5_b64(content), content)}


def test_mirror_a_directory_offline_trusts_the_manifest_digest(tmp_path: Path,
                                                               wandb_env: Path) -> None:
    tree = tmp_path / "materialized"
    (tree / "shards").mkdir(parents=True)
    files = {"config.json": b"{}", "shards/0.bin": b"\x01" * 70000, "shards/1.bin": b""}
    for rel, data in files.items():
        (tree / rel).write_bytes(data)
    digest = "sha256:" + "ab" * 32  # the caller's manifest digest: not re-hashed
    backend = WandBStorageBackend.from_url("wandb://team/mirror")
    ref = backend.mirror_version(tree, **_mirror_args(digest, name="data", version=1,
                                                      type="dataset", aliases=[]))
    backend.close()
    assert ref == f"wandb-artifact://team/mirror/{artifact_name(digest)}:data-v1"
    (record,) = logged_artifacts(tmp_path / "wandb")
    assert set(record.aliases) == {"data-v1", "latest"}
    meta = json.loads(record.metadata)
    assert meta["repro"]["kind"] == "directory" and "size" not in meta
    assert manifest(record) == {rel: (len(data), md5_b64(data), data)
                                for rel, data in files.items()}


def test_offline_lineage_is_skipped_with_one_warning(tmp_path: Path, wandb_env: Path) -> None:
    parent_path, parent = _blob(tmp_path, b"parent", "parent.bin")
    child_path, child = _blob(tmp_path, b"child", "child.bin")
    backend = WandBStorageBackend.from_url("wandb://mirror")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backend.mirror_version(parent_path, **_mirror_args(parent, name="data", version=1))
        backend.mirror_version(child_path, **_mirror_args(child, parents=[parent]))
        backend.mirror_version(child_path, **_mirror_args(child, version=4, parents=[parent]))
    backend.close()
    ours = [str(w.message) for w in caught if "lineage" in str(w.message)]
    assert len(ours) == 1 and ours[0].startswith("W&B is offline: the lineage of resnet v3")
    assert "repro.parents" in ours[0]
    records = logged_artifacts(tmp_path / "wandb")
    assert [r.name for r in records] == [artifact_name(d) for d in (parent, child, child)]
    assert json.loads(records[1].metadata)["repro"]["parents"] == [parent]


BAD_ARGS: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"digest": "blake3:xyz"}, InvalidArgumentError),
    ({"parents": ["blake3:../x"]}, InvalidArgumentError),
    ({"parents": "blake3:" + "0" * 64}, InvalidArgumentError),
    ({"version": 0}, InvalidArgumentError), ({"version": True}, InvalidArgumentError),
    ({"version": "3"}, InvalidArgumentError), ({"type": "a/b"}, InvalidArgumentError),
    ({"type": ""}, InvalidArgumentError), ({"metadata": [1]}, InvalidArgumentError),
    ({"aliases": "best"}, InvalidArgumentError), ({"aliases": ["v2"]}, InvalidNameError),
    ({"aliases": ["a:b"]}, InvalidNameError), ({"name": "../x"}, InvalidNameError),
    ({"project": "a/b"}, InvalidNameError),
]


@pytest.mark.parametrize(("over", "error"), BAD_ARGS)
def test_mirror_arguments_are_checked_before_any_io(tmp_path: Path, wandb_env: Path,
                                                    over: dict[str, Any],
                                                    error: type[Exception]) -> None:
    path, digest = _blob(tmp_path)
    backend = WandBStorageBackend.from_url("wandb://mirror")
    with pytest.raises(error):
        backend.mirror_version(path, **{**_mirror_args(digest), **over})
    with pytest.raises(InvalidArgumentError):
        backend.mirror_version(42, **_mirror_args(digest))  # type: ignore[arg-type]
    assert backend._own is None and list((tmp_path / "wandb").iterdir()) == []  # no run


def test_mirror_refuses_a_file_that_is_not_its_digest(tmp_path: Path, wandb_env: Path) -> None:
    path, _ = _blob(tmp_path)
    claimed = "blake3:" + "1" * 64
    backend = WandBStorageBackend.from_url("wandb://mirror")
    with pytest.raises(IntegrityError) as info:
        backend.mirror_version(path, **_mirror_args(claimed))
    assert info.value.expected == claimed and info.value.actual == hash_file(path)
    with pytest.raises(StorageError, match="cannot read"):
        backend.mirror_version(tmp_path / "gone", **_mirror_args(claimed))
    assert backend._own is None and list((tmp_path / "wandb").iterdir()) == []


def test_wandb_failures_are_storage_errors(tmp_path: Path, offline_run: Any) -> None:
    path, digest = _blob(tmp_path)
    finish(offline_run)  # W&B itself refuses to log into a finished run
    backend = WandBStorageBackend(offline_run)
    with pytest.raises(StorageError, match="not in W&B") as info:
        backend.mirror_version(path, **_mirror_args(digest))
    assert info.value.__cause__ is not None  # W&B's own error, kept in the chain
    with pytest.raises(StorageError, match="not in W&B"):
        backend.upload(path, digest)
    assert logged_artifacts(tmp_path / "wandb") == []


def test_metadata_is_made_json_safe() -> None:
    nested: dict[Any, Any] = {"x": float("nan"), 1: (float("-inf"), {2}), "ok": [True, None]}
    assert _wandb_mirror.json_safe(nested) == {"x": "nan", "1": ["-inf", "{2}"],
                                               "ok": [True, None]}
    assert _wandb_mirror.fit_alias("a" * 128) == "a" * 128
    long = _wandb_mirror.fit_alias("a" * 200)
    assert len(long) == 128 and long != _wandb_mirror.fit_alias("a" * 201)


# -- online paths, with stand-ins for the W&B server side -------------------------------------


class _Logged:
    def __init__(self, calls: list[tuple[str, Any]], error: Exception | None) -> None:
        self.calls, self.error = calls, error

    def wait(self) -> _Logged:
        self.calls.append(("wait", None))
        if self.error:
            raise self.error
        return self


class _OnlineRun:
    """What the backend asks of an online run: ``use_artifact`` (W&B's "not found" for an
    artifact the server lacks), ``log_artifact`` and the logged artifact's ``wait``."""

    offline, disabled, project, entity = False, False, "mirror", "team"

    def __init__(self, known: tuple[str, ...] = (), wait_error: Exception | None = None):
        self.known, self.wait_error = known, wait_error
        self.calls: list[tuple[str, Any]] = []

    def use_artifact(self, ref: str) -> None:
        self.calls.append(("use", ref))
        if ref.rsplit("/", 1)[-1].split(":")[0] not in self.known:
            raise ValueError(f"artifact '{ref}' not found")

    def log_artifact(self, artifact: Any, aliases: list[str]) -> _Logged:
        self.calls.append(("log", (artifact.name, sorted(aliases), artifact.metadata)))
        return _Logged(self.calls, self.wait_error)


def _raise(exc: Exception) -> Any:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc
    return fail


def test_online_mirror_uses_each_parent_before_logging(tmp_path: Path,
                                                       wandb_env: Path) -> None:
    path, digest = _blob(tmp_path)
    parents = ["blake3:" + "1" * 64, "sha256:" + "2" * 64]
    run = _OnlineRun(known=tuple(artifact_name(p) for p in parents))
    backend = WandBStorageBackend(run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # online: no lineage warning
        ref = backend.mirror_version(path, **_mirror_args(digest, parents=parents))
    assert ref == f"wandb-artifact://team/mirror/{artifact_name(digest)}:resnet-v3"
    assert [c[0] for c in run.calls] == ["use", "use", "log", "wait"]
    assert [c[1] for c in run.calls[:2]] == [f"team/mirror/{artifact_name(p)}:latest"
                                             for p in parents]
    name, aliases, metadata = run.calls[2][1]
    assert name == artifact_name(digest)
    assert aliases == ["resnet-best", "resnet-latest", "resnet-v3"]
    assert metadata["repro"]["parents"] == parents


def test_online_failures_log_nothing_or_say_so(tmp_path: Path, wandb_env: Path) -> None:
    path, digest = _blob(tmp_path)
    missing = "blake3:" + "3" * 64
    run = _OnlineRun()
    with pytest.raises(StorageError, match="mirror the parent version first"):
        WandBStorageBackend(run).mirror_version(path, **_mirror_args(digest,
                                                                     parents=[missing]))
    assert [c[0] for c in run.calls] == ["use"]  # the child was never logged
    refused = _OnlineRun(wait_error=ValueError("upload failed: quota exceeded"))
    with pytest.raises(StorageError, match="quota exceeded"):
        WandBStorageBackend(refused).mirror_version(path, **_mirror_args(digest))
    assert [c[0] for c in refused.calls] == ["log", "wait"]
    with pytest.raises(StorageError, match="quota exceeded"):  # uploads wait online too
        WandBStorageBackend(_OnlineRun(wait_error=ValueError("quota exceeded"))).upload(
            path, digest)
    run = _OnlineRun()
    assert WandBStorageBackend(run).upload(path, digest) == \
        f"wandb-artifact://team/mirror/{artifact_name(digest)}:latest"
    assert [c[0] for c in run.calls] == ["log", "wait"]


class _Artifact:
    def __init__(self, name: str, content: bytes) -> None:
        self.name, self.content, self.deleted = name, content, False

    def download(self, root: str) -> str:
        (Path(root) / self.name).write_bytes(self.content)
        return root

    def delete(self, delete_aliases: bool = False) -> None:
        self.deleted = True


class _Api:
    """What the backend asks of ``wandb.Api``: ``artifact(name, type)`` (raises W&B's "not
    found" message for an unknown one) and ``artifact_collections(project, type)``."""

    def __init__(self, artifacts: dict[str, bytes]) -> None:
        self.artifacts = {name: _Artifact(name, content) for name, content in artifacts.items()}

    def artifact(self, name: str, type: str | None = None) -> _Artifact:
        short = name.rsplit("/", 1)[-1].split(":")[0]
        if short not in self.artifacts:
            raise ValueError(f"artifact '{name}' not found in 'team/repro-blobs'")
        return self.artifacts[short]

    def artifact_collections(self, project: str, type_name: str) -> list[Any]:
        return [type("C", (), {"name": n})() for n in [*self.artifacts, "not-a-digest"]]


def test_online_download_is_digest_checked(tmp_path: Path) -> None:
    path, digest = _blob(tmp_path)
    good = WandBStorageBackend(project="repro-blobs",
                               api=_Api({artifact_name(digest): path.read_bytes()}))
    target = tmp_path / "got" / "blob"
    assert good.exists(digest)
    assert good.download(digest, target) == target
    assert target.read_bytes() == path.read_bytes()
    assert list(good.iter_digests()) == [digest]  # a foreign artifact name is skipped

    corrupt = WandBStorageBackend(project="repro-blobs",
                                  api=_Api({artifact_name(digest): b"tampered"}))
    bad_target = tmp_path / "bad" / "blob"
    with pytest.raises(IntegrityError, match="corrupt"):
        corrupt.download(digest, bad_target)
    assert not bad_target.exists()
    assert [p.name for p in bad_target.parent.iterdir()] == []  # no temp left beside it


def test_online_missing_blob(tmp_path: Path) -> None:
    backend = WandBStorageBackend(project="repro-blobs", api=_Api({}))
    digest = "blake3:" + "ab" * 32
    assert not backend.exists(digest)
    assert backend.delete(digest) is False
    with pytest.raises(ArtifactNotFoundError):
        backend.download(digest, tmp_path / "x")
    assert not (tmp_path / "x").exists()
