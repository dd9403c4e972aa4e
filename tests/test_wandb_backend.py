"""``WandBStorageBackend`` on the real ``wandb`` package, in W&B offline mode.

Offline, an upload must land in the offline run (ready for ``wandb sync``): the artifact's
record in the run's ``.wandb`` file and its file staged under ``WANDB_DATA_DIR``. What offline
W&B cannot do (download, exists, delete, listing) must raise one ``StorageError`` naming
``wandb sync`` and the local store, never leave a file. The online read path needs a W&B
server, which cannot run here: it is exercised with a small stand-in for ``wandb.Api`` (the
one object replaced), to show the digest check and the not-found mapping.
"""

from __future__ import annotations

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
    hash_file,
)
from repro_core.store.wandb_backend import artifact_name

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for name, sub in (("WANDB_DIR", "wandb"), ("WANDB_DATA_DIR", "data"),
                      ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(name, str(tmp_path / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = wandb.init(project="repro-blobs", dir=str(tmp_path / "wandb"))
    try:
        yield run
    finally:
        run.finish()


def _blob(tmp_path: Path, content: bytes = b"weights " * 1000) -> tuple[Path, str]:
    path = tmp_path / "blob.bin"
    path.write_bytes(content)
    return path, hash_file(path)


def _run_record(tmp_path: Path) -> bytes:
    (record,) = (tmp_path / "wandb").rglob("offline-run-*/run-*.wandb")
    return record.read_bytes()


def test_offline_upload_lands_in_the_offline_run(tmp_path: Path, offline_run: Any) -> None:
    path, digest = _blob(tmp_path)
    backend = WandBStorageBackend()
    backend.set_run(offline_run)
    where = backend.upload(path, digest, aliases=["checkpoint-v3"])
    assert where.endswith(f"repro-blobs/{artifact_name(digest)}:latest")
    offline_run.finish()
    record = _run_record(tmp_path)
    assert artifact_name(digest).encode() in record  # the artifact, for `wandb sync`
    assert b"checkpoint-v3" in record and digest.encode() in record  # alias and metadata
    staged = [p for p in (tmp_path / "data").rglob("*") if p.is_file()]
    assert any(p.read_bytes() == path.read_bytes() for p in staged), staged


def test_a_file_that_is_not_the_digest_is_refused(tmp_path: Path, offline_run: Any) -> None:
    path, _ = _blob(tmp_path)
    other = "blake3:" + "0" * 64
    with pytest.raises(IntegrityError, match="nothing was uploaded"):
        WandBStorageBackend(offline_run).upload(path, other)
    offline_run.finish()
    assert artifact_name(other).encode() not in _run_record(tmp_path)


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
    with pytest.raises(FileNotFoundError, match="no file"):  # (MissingFileError)
        WandBStorageBackend(run=object()).upload(tmp_path / "missing", digest)
    for bad in ("sha1:abc", "blake3:../../etc/passwd", "blake3:" + "g" * 64):
        with pytest.raises(InvalidArgumentError):
            WandBStorageBackend().upload(path, bad)
        with pytest.raises(InvalidArgumentError):
            artifact_name(bad)


# -- the online read path, with a stand-in for wandb.Api --------------------------------------


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
