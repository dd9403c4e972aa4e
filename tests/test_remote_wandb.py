"""A ``wandb://project`` remote: push-only mirroring into W&B Artifacts, offline for real.

What the remote engine adds on top of ``WandBStorageBackend.mirror_version`` (tested in
``test_wandb_backend.py``): which versions a push mirrors, that a second push mirrors nothing,
that a run mirrors what it logs in the background, and that a W&B failure leaves the local
store whole, reported (a warning, the queue's last error) and never raised into the loop.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from test_wandb_suite import logged_artifacts, offline_env

from repro_core import ArtifactManager, InvalidArgumentError, constants, remote


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return offline_env(tmp_path, monkeypatch)


def _log(manager: ArtifactManager, **init: object) -> None:
    manager.init_run("train", **init)  # type: ignore[arg-type]
    manager.log_artifact("data", "dataset", data={"rows": [1, 2]})
    manager.log_artifact("model", "model", data=b"w" * 256, parent_artifacts=["data:v1"],
                         aliases=["best"])
    manager.finalize_run()


def _aliases(root: Path) -> list[set[str]]:
    return sorted((set(a.aliases) for a in logged_artifacts(root)), key=sorted)


def test_push_mirrors_each_version_once(manager: ArtifactManager, store_root: Path,
                                        wandb_env: Path) -> None:
    _log(manager)
    first = remote.push("wandb://repro-mirror", root=store_root, show_progress=False)
    assert sorted(first.versions) == ["default/data:v1", "default/model:v1"]
    aliases = _aliases(wandb_env)
    # (W&B adds its own "latest" to every artifact version it logs)
    assert {"data-v1", "data-latest", "latest"} in aliases
    assert {"model-v1", "model-best", "model-latest", "latest"} in aliases
    again = remote.push("wandb://repro-mirror", root=store_root, show_progress=False)
    assert not again.transferred and again.skipped == 2
    assert len(logged_artifacts(wandb_env)) == 2  # nothing logged the second time
    with pytest.raises(InvalidArgumentError, match="push-only"):
        remote.pull("wandb://repro-mirror", root=store_root, show_progress=False)


def test_a_run_mirrors_what_it_logs(manager: ArtifactManager, store_root: Path,
                                    wandb_env: Path) -> None:
    _log(manager, remote="wandb://repro-mirror")
    assert remote.status(root=store_root) == {}  # no named remote, nothing left queued
    assert {"model-v1", "model-best", "model-latest", "latest"} in _aliases(wandb_env)


def test_a_wandb_failure_keeps_the_local_copy_and_is_reported(
        manager: ArtifactManager, store_root: Path, wandb_env: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "disabled")  # W&B refuses to mirror into a disabled run
    monkeypatch.setattr(constants, "REPRO_REMOTE_TIMEOUT", 5.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _log(manager, remote="wandb://repro-mirror")
    messages = [str(w.message) for w in caught]
    assert any("pushing to remote" in m and "failed" in m for m in messages), messages
    assert any("stay queued" in m for m in messages), messages
    left = remote.status(root=store_root)["wandb://repro-mirror"]["pending"]
    assert left and any(item.last_error for item in left)  # type: ignore[attr-defined]
    assert manager.load_artifact("model:best") == b"w" * 256  # the local copy is whole
    monkeypatch.setenv("WANDB_MODE", "offline")
    report = remote.push("wandb://repro-mirror", root=store_root, show_progress=False)
    assert sorted(report.versions) == ["default/data:v1", "default/model:v1"]
    assert remote.status(root=store_root) == {}  # the queue is empty: push finished it
