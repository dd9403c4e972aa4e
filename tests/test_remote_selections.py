"""What a selection moves: ``repro push KEY`` sends its upstream closure only; a key
(``:v2``, ``:best``, ``:latest``, ``@digest``) or a run pulls a working closure into a fresh
store; a partial push of a TTRL run never mislinks its online updates.

Helpers (snapshots, comparisons) are ``test_remote_sync``'s.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_remote_sync import (  # noqa: F401 (_no_stray_manager: an autouse fixture)
    _no_stray_manager,
    _pull,
    _push,
    _without_path,
    canon,
    differences,
    snapshot,
    verify,
)

from repro_core import ArtifactManager, remote
from repro_core.remote import Remote
from repro_core.ttrl import TTRLContext, run_updates

# -- selections ---------------------------------------------------------------------------------


@pytest.fixture
def chain(manager: ArtifactManager, tmp_path: Path) -> dict[str, str]:
    """run1: data, unrelated -> run2 (uses data): ckpt v1 <- v2 (best) <- v3 -> run3 (uses
    ckpt:v2): eval."""
    root = tmp_path / "src"
    run1 = manager.init_run("prep", root=root)
    manager.log_artifact("data", "dataset", data={"rows": [1, 2]})
    manager.log_artifact("unrelated", "dataset", data=b"never used")
    manager.finalize_run()
    run2 = manager.init_run("train", root=root)
    manager.use_artifact("data:v1")
    for i in range(3):
        manager.log_artifact("ckpt", "checkpoint", data=f"w{i}".encode() * 100,
                             parent_artifacts=[f"ckpt:v{i}"] if i else ["data:v1"],
                             aliases=["best"] if i == 1 else None)
        manager.log_metrics({"loss": 1.0 / (i + 1)}, step=i)
    manager.finalize_run()
    run3 = manager.init_run("evaluate", root=root)
    manager.use_artifact("ckpt:v2")
    manager.log_artifact("eval", "evaluation", data={"acc": 1.0})
    manager.finalize_run()
    ArtifactManager.reset_instance()
    return {"run1": run1.id or "", "run2": run2.id or "", "run3": run3.id or "",
            "root": str(root)}


def test_push_key_sends_its_upstream_closure_only(chain: dict[str, str], tmp_path: Path) -> None:
    url = str(tmp_path / "remote")
    report = _push(url, Path(chain["root"]), "ckpt:v2")
    assert sorted(report.versions) == ["default/ckpt:v1", "default/ckpt:v2", "default/data:v1"]
    assert sorted(report.runs) == sorted([chain["run1"], chain["run2"]])
    target = Remote.open("t", remote.normalize_url(url))
    assert target.records.list("versions") == [
        "versions/default/ckpt/000000000001.json", "versions/default/ckpt/000000000002.json",
        "versions/default/data/000000000001.json"]
    assert target.records.list("runs") == sorted(
        f"runs/{chain[r]}.json" for r in ("run1", "run2"))
    assert target.records.list("aliases") == ["aliases/default/ckpt/best.json"]
    assert len(list(target.backend.iter_digests())) == 3 + len(report.runs)  # + bundles


@pytest.mark.parametrize("key", ["ckpt:v2", "ckpt:best", "ckpt:latest", "digest"])
def test_pull_key_brings_a_working_closure(chain: dict[str, str], tmp_path: Path,
                                           key: str) -> None:
    src, url, dst = Path(chain["root"]), str(tmp_path / "remote"), tmp_path / "dst"
    _push(url, src)
    manager = ArtifactManager.reset_instance()
    manager.set_root(src)
    wanted = "v3" if key == "ckpt:latest" else "v2"
    source_meta = manager.use_artifact(f"ckpt:{wanted}")
    if key == "digest":
        key = f"ckpt@{source_meta.hash[:19]}"  # blake3:<12 hex>
    lineage = manager.get_lineage(f"ckpt:{wanted}")
    report = _pull(url, dst, key)
    assert not report.problems
    # the upstream closure: the version, its parents, their runs and what those used — not
    # the runs' other outputs (ckpt:v3, unrelated) nor anything downstream (eval, run3)
    upstream = {f"default/ckpt:v{i}" for i in range(1, int(wanted[1]) + 1)} | {"default/data:v1"}
    assert set(report.versions) == upstream
    assert sorted(report.runs) == sorted([chain["run1"], chain["run2"]])
    verify(dst)
    manager = ArtifactManager.reset_instance()
    manager.set_root(dst)
    meta = manager.use_artifact(key)
    assert _without_path(meta) | {"aliases": []} == _without_path(source_meta) | {"aliases": []}
    assert manager.load_artifact(key) == f"w{int(wanted[1]) - 1}".encode() * 100
    got = manager.get_lineage(f"ckpt:{wanted}")
    for part in ("ancestors", "produced_by", "run_inputs", "parents"):
        assert canon(got[part]) == canon(lineage[part]), part
    # (``latest`` is each store's highest number: v2 here when only v1..v2 came)
    assert got["artifact"] | {"aliases": []} == lineage["artifact"] | {"aliases": []}
    assert ("best" in got["artifact"]["aliases"]) is (wanted == "v2")
    assert "run:" + chain["run3"] not in got["descendants"]
    if wanted == "v2":  # the rest of run2 later: its edges and metrics come with it
        ArtifactManager.reset_instance()
        later = _pull(url, dst, "ckpt:v3")
        assert later.versions == ["default/ckpt:v3"] and not later.problems
        manager = ArtifactManager.reset_instance()
        manager.set_root(dst)
        assert [v.key for v in manager.registry().outputs_of(chain["run2"])] == [
            f"default/ckpt:v{i}" for i in (1, 2, 3)]
        assert manager.get_lineage("ckpt:v3")["produced_by"]["id"] == chain["run2"]


def test_pull_run_brings_its_outputs_inputs_and_metrics(chain: dict[str, str],
                                                        tmp_path: Path) -> None:
    src, url, dst = Path(chain["root"]), str(tmp_path / "remote"), tmp_path / "dst"
    _push(url, src)
    manager = ArtifactManager.reset_instance()
    manager.set_root(src)
    metrics = manager.get_metrics(chain["run2"])
    report = _pull(url, dst, run=chain["run2"])
    assert {"default/ckpt:v1", "default/ckpt:v2", "default/ckpt:v3",
            "default/data:v1"} <= set(report.versions)
    assert chain["run2"] in report.runs and chain["run3"] not in report.runs
    verify(dst)
    manager = ArtifactManager.reset_instance()
    manager.set_root(dst)
    assert manager.get_metrics(chain["run2"]) == metrics
    assert manager.use_artifact("ckpt:best").version == "v2"
    assert [v.key for v in manager.registry().inputs_of(chain["run2"])] == ["default/data:v1"]


def test_partial_push_of_a_ttrl_run_never_mislinks_its_updates(manager: ArtifactManager,
                                                               tmp_path: Path) -> None:
    """``push ckpt:v1`` sends part of a TTRL run: the updates made under v2 must not come
    back as made "before any checkpoint" (they used to, their model written as null); they
    are left out, said so, and arrive with v2 on the next push and pull."""
    src, dst, url = tmp_path / "src", tmp_path / "dst", str(tmp_path / "remote")

    def updates(root: Path, run_id: str) -> list[tuple[str, str | None]]:
        reader = ArtifactManager.reset_instance()
        reader.set_root(root)
        registry = reader.registry()
        return [(u["experience_id"], None if u["model_version_id"] is None
                 else registry.get_version(u["model_version_id"]).key)
                for u in run_updates(registry, run_id)]

    with TTRLContext(root=src, name="online", monitor_hardware=False, capture_level=1) as ctx:
        ctx.log_online_update("before", 0.1, 0.5)
        for i in range(2):
            weights = tmp_path / f"w{i}"
            weights.write_bytes(f"weights {i}".encode() * 10)
            ctx.log_model_checkpoint(weights, step=i, name="ckpt")
            ctx.log_online_update(f"under-v{i + 1}", 0.2, 0.5)
        run_id = ctx.run.id if ctx.run else ""
    ArtifactManager.reset_instance()
    assert updates(src, run_id) == [("before", None), ("under-v1", "default/ckpt:v1"),
                                    ("under-v2", "default/ckpt:v2")]
    _push(url, src, "ckpt:v1")
    report = _pull(url, dst)
    assert "default/ckpt:v2" not in report.versions
    assert any("1 online update(s)" in p for p in report.problems)
    assert updates(dst, run_id) == [("before", None), ("under-v1", "default/ckpt:v1")]
    _push(url, src)
    again = _pull(url, dst)
    assert "default/ckpt:v2" in again.versions and not again.problems
    assert updates(dst, run_id) == updates(src, run_id)
