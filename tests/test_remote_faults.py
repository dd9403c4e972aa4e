"""The S3 server dies in the middle of a ``repro push`` (moto in a child process, SIGKILL).

The push fails with one ``StorageError`` after its bounded retries; the local store is
untouched; when a server is back, the next push completes and a pull from it restores
everything, digest-verified. (moto keeps objects in memory: a restarted server is empty, as a
remote that lost data is — so the case where the server dies after some versions were
claimed is repaired with ``repro push --check``, which does not trust what this store
recorded of the remote.)
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from s3_support import MotoProcess, moto_process  # noqa: F401 (a fixture)

from repro_core import ArtifactManager, StorageError, constants, remote
from repro_core.maintenance import verify_store

MIB = 1024 * 1024


@pytest.fixture
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("REPRO_REMOTE_RETRIES", "2")
    monkeypatch.setenv("REPRO_REMOTE_BACKOFF", "0.05")
    # the 96 MiB checkpoint must stay one blob (one multipart upload to kill the server in);
    # chunked, it would be 8 MiB content-defined chunks, each a single PUT
    monkeypatch.setenv("REPRO_CHUNK_MIN_BYTES", "off")
    constants.reload()
    yield
    constants.reload()


def _store(root: Path) -> dict[str, bytes]:
    """A run with a big checkpoint (a multipart upload) and two small versions."""
    manager = ArtifactManager.reset_instance()
    manager.init_run("train", root=root)
    manager.log_artifact("data", "dataset", data=b"rows" * 1000)
    big = root.parent / "weights.bin"
    with open(big, "wb") as fh:
        for i in range(96):
            fh.write(bytes([i % 251]) * MIB)
    manager.log_artifact("model", "model", file_path=big, parent_artifacts=["data:v1"])
    manager.log_artifact("notes", "dataset", data=b"notes")
    manager.finalize_run()
    ArtifactManager.reset_instance()
    return {"data": b"rows" * 1000, "notes": b"notes", "model": big.read_bytes()}


def _push_in_thread(url: str, root: Path) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def push() -> None:
        try:
            remote.push(url, root=root, show_progress=False)
        except BaseException as exc:  # examined by the test
            errors.append(exc)

    thread = threading.Thread(target=push)
    thread.start()
    return thread, errors


def _wait_for_a_multipart_upload(client: Any, bucket: str, thread: threading.Thread) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and thread.is_alive():
        uploads = client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        if uploads and client.list_parts(Bucket=bucket, Key=uploads[0]["Key"],
                                         UploadId=uploads[0]["UploadId"]).get("Parts"):
            return
        time.sleep(0.02)
    pytest.fail("the push never started its multipart upload")


def _check_pulled(url: str, root: Path, expected: dict[str, bytes]) -> None:
    report = remote.pull(url, root=root, show_progress=False)
    assert sorted(report.versions) == ["default/data:v1", "default/model:v1",
                                       "default/notes:v1"]
    assert verify_store(root).ok
    manager = ArtifactManager.reset_instance()
    manager.set_root(root)
    try:
        assert manager.load_artifact("data:v1") == expected["data"]
        assert manager.load_artifact("notes:v1") == expected["notes"]
        assert manager.load_artifact("model:v1").read_bytes() == expected["model"]
        assert manager.get_lineage("model:v1")["parents"] == ["default/data:v1"]
    finally:
        ArtifactManager.reset_instance()


def test_server_dies_mid_push_and_the_next_push_completes(
        moto_process: MotoProcess, tmp_path: Path, quick_retries: Any) -> None:  # noqa: F811
    client = moto_process.client()
    client.create_bucket(Bucket="dies")
    url = "s3://dies/team"
    src = tmp_path / "src"
    expected = _store(src)
    thread, errors = _push_in_thread(url, src)
    _wait_for_a_multipart_upload(client, "dies", thread)
    moto_process.kill()  # mid-upload of the checkpoint
    thread.join(120)
    assert not thread.is_alive() and len(errors) == 1, errors
    assert isinstance(errors[0], StorageError), errors[0]
    assert verify_store(src).ok  # the local store is whole
    assert not list((src / "tmp").iterdir())  # nothing of the push left on this side

    moto_process.start()  # a new (empty) server on the same port
    client.create_bucket(Bucket="dies")
    done = remote.push(url, root=src, show_progress=False)
    assert len(done.versions) == 3 and not done.problems
    _check_pulled(url, tmp_path / "dst", expected)


def test_a_remote_that_came_back_empty_is_repaired_by_push_check(
        moto_process: MotoProcess, tmp_path: Path, quick_retries: Any) -> None:  # noqa: F811
    client = moto_process.client()
    client.create_bucket(Bucket="lost")
    url = "s3://lost/team"
    src = tmp_path / "src"
    expected = _store(src)
    remote.push(url, root=src, show_progress=False)
    moto_process.kill()
    moto_process.start()  # everything it held is gone
    client.create_bucket(Bucket="lost")
    assert not remote.push(url, root=src, show_progress=False).transferred  # trusts its notes
    repaired = remote.push(url, root=src, show_progress=False, check=True)
    assert len(repaired.versions) == 3 and repaired.blobs >= 3
    _check_pulled(url, tmp_path / "dst", expected)
    assert os.path.exists(src / "registry.sqlite")
