"""``repro recover`` rebuilds a store that pushed and pulled: renumbered and pulled versions.

The registry is the truth, the run journal its spare copy: a push that lost the race for
``v1`` of a name moves this store's version to the next free number and journals the move,
so a registry rebuilt from the journals numbers it as the registry did.
"""

from __future__ import annotations

import os
from pathlib import Path

from repro_core import ArtifactManager, remote
from repro_core.recover import recover_store


def _log(root: Path, *contents: bytes) -> None:
    manager = ArtifactManager.reset_instance()
    manager.init_run("train", root=root)
    for content in contents:
        manager.log_artifact("ckpt", "checkpoint", data=content)
    manager.finalize_run()
    ArtifactManager.reset_instance()


def _numbers(root: Path) -> dict[str, bytes]:
    manager = ArtifactManager.reset_instance()
    manager.set_root(root)
    try:
        return {meta.version: manager.load_artifact(meta.key)
                for meta in manager.list_artifacts("ckpt")}
    finally:
        ArtifactManager.reset_instance()


def test_renumbered_version_survives_recover(tmp_path: Path) -> None:
    shared, a, b = tmp_path / "shared", tmp_path / "a", tmp_path / "b"
    _log(a, b"a1")
    _log(b, b"b1", b"b2")
    remote.push(str(shared), root=a, show_progress=False)
    report = remote.push(str(shared), root=b, show_progress=False)
    # B's versions move past A's, in their order: b1 v1 -> v2, b2 v2 -> v3
    assert sorted(report.renumbered) == [("default/ckpt:v1", "default/ckpt:v2"),
                                         ("default/ckpt:v2", "default/ckpt:v3")]
    remote.pull(str(shared), root=b, show_progress=False)
    before = _numbers(b)
    assert before == {"v1": b"a1", "v2": b"b1", "v3": b"b2"}

    os.replace(b / "registry.sqlite", tmp_path / "lost.sqlite")
    for side in ("-wal", "-shm"):
        if (b / f"registry.sqlite{side}").exists():
            os.replace(b / f"registry.sqlite{side}", tmp_path / f"lost.sqlite{side}")
    report_b = recover_store(b)
    assert _numbers(b) == before, report_b.problems
