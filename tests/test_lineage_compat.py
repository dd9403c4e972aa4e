"""Compatibility with the seed's original ``LineageTracker`` (issue 9).

Code written against the original tests results, not exceptions: unknown ids give empty
answers, ``validate_lineage`` issues carry ``details`` (at most 10), ``get_run_lineage`` shows
where a run's artifacts came from one step back, and the DOT export starts the way scripts
that post-process it expect. See SEED_API.md, "Behaviour of the original".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from repro_core import ArtifactManager
from repro_core.errors import ArtifactNotFoundError, InvalidArgumentError
from repro_core.lineage import LineageTracker
from repro_core.registry import Registry

SEED_STATS = {"total_artifacts", "total_edges", "artifacts_by_type", "artifacts_by_run",
              "max_depth", "connected_components"}


@pytest.fixture
def diamond() -> LineageTracker:
    """a (run r0) → b, c (run r1) → d (run r2)."""
    t = LineageTracker()
    t.add_artifact("a", "a", "dataset", "v1", run_id="r0")
    t.add_artifact("b", "b", "model", "v1", run_id="r1", parent_ids=["a"])
    t.add_artifact("c", "c", "model", "v2", run_id="r1", parent_ids=["a"])
    t.add_artifact("d", "d", "evaluation", "v1", run_id="r2", parent_ids=["b", "c"])
    return t


# -- unknown ids ------------------------------------------------------------------------------


def test_ancestors_and_descendants_of_unknown_ids_are_empty_sets(diamond: LineageTracker) -> None:
    assert diamond.get_ancestors("nope") == set()
    assert diamond.get_descendants("nope") == set()
    assert diamond.get_ancestors("nope", max_depth=2) == set()
    assert diamond.get_descendants("nope", max_depth=0) == set()
    assert isinstance(LineageTracker().get_ancestors("x"), set)


def test_lineage_path_from_or_to_an_unknown_id_is_none(diamond: LineageTracker) -> None:
    assert diamond.get_lineage_path("a", "nope") is None
    assert diamond.get_lineage_path("nope", "a") is None
    assert diamond.get_lineage_path("nope", "nope") is None


def test_leniency_does_not_swallow_bad_arguments_or_get_node(diamond: LineageTracker) -> None:
    # An unknown id has an empty answer; a bad max_depth or a missing record does not.
    with pytest.raises(InvalidArgumentError, match="max_depth"):
        diamond.get_ancestors("nope", max_depth=-1)
    with pytest.raises(ArtifactNotFoundError):
        diamond.get_node("nope")


def test_lineage_path_treats_edges_as_undirected(diamond: LineageTracker) -> None:
    assert diamond.get_lineage_path("b", "c") in (["b", "a", "c"], ["b", "d", "c"])
    assert diamond.get_lineage_path("d", "a") in (["d", "b", "a"], ["d", "c", "a"])


# -- run lineage ------------------------------------------------------------------------------


def test_run_lineage_includes_direct_parents_from_other_runs(diamond: LineageTracker) -> None:
    lineage = diamond.get_run_lineage("r2")
    assert lineage["run_id"] == "r2"
    assert [a["artifact_id"] for a in lineage["artifacts"]] == ["d", "b", "c"]
    assert lineage["artifacts"][1] == diamond.get_node("b").to_dict()
    assert sorted((e["from"], e["to"]) for e in lineage["edges"]) == [("b", "d"), ("c", "d")]
    # One step back only: a is d's grandparent.
    assert "a" not in {a["artifact_id"] for a in lineage["artifacts"]}


def test_run_lineage_lists_a_shared_parent_once(diamond: LineageTracker) -> None:
    lineage = diamond.get_run_lineage("r1")
    assert [a["artifact_id"] for a in lineage["artifacts"]] == ["b", "c", "a"]
    assert sorted((e["from"], e["to"]) for e in lineage["edges"]) == [("a", "b"), ("a", "c")]


def test_run_lineage_keeps_same_run_parents_and_dangling_edges() -> None:
    t = LineageTracker()
    t.add_artifact("x", "x", "dataset", "v1", run_id="r")
    t.add_artifact("y", "y", "model", "v1", run_id="r", parent_ids=["x", "ghost"])
    lineage = t.get_run_lineage("r")
    assert [a["artifact_id"] for a in lineage["artifacts"]] == ["x", "y"]  # nothing twice
    assert {(e["from"], e["to"]) for e in lineage["edges"]} == {("x", "y"), ("ghost", "y")}


# -- validate_lineage -------------------------------------------------------------------------


def test_orphans_are_one_warning_issue_in_the_seed_shape() -> None:
    t = LineageTracker()
    ids = [f"o{i:02d}" for i in range(15)]
    for aid in ids:
        t.add_artifact(aid, aid, "dataset", "v1")
    report = t.validate_lineage()
    assert report["is_valid"] is True  # a lone dataset is legitimate
    [issue] = report["issues"]
    assert issue["type"] == "orphaned" and "orphaned" in issue["message"]
    assert issue["details"] == ids[:10]
    assert issue["count"] == 15 and issue["items"] == ids  # the full list stays available


def test_missing_references_are_one_error_issue_with_details_capped() -> None:
    t = LineageTracker()
    ghosts = [f"p{i:02d}" for i in range(12)]
    t.add_artifact("child", "child", "model", "v1", parent_ids=ghosts)
    report = t.validate_lineage()
    assert report["is_valid"] is False
    [issue] = [i for i in report["issues"] if i["type"] == "missing_references"]
    assert issue["details"] == ghosts[:10]
    assert issue["count"] == 12
    assert issue["items"][0] == {"id": "p00", "referenced_by": ["child"]}
    assert [i["type"] for i in report["issues"]] == ["missing_references"]


def test_cycles_are_one_error_issue_with_details_capped() -> None:
    t = LineageTracker()
    for i in range(12):
        t.add_artifact(f"s{i:02d}", "s", "model", "v1", parent_ids=[f"s{i:02d}"])
    report = t.validate_lineage()
    assert report["is_valid"] is False
    [issue] = report["issues"]
    assert issue["type"] == "cycles"
    assert issue["details"] == [[f"s{i:02d}"] for i in range(10)]
    assert issue["count"] == 12


def test_validate_stats_have_the_seed_keys(diamond: LineageTracker) -> None:
    stats = diamond.validate_lineage()["stats"]
    assert set(stats) >= SEED_STATS
    assert (stats["total_artifacts"], stats["total_edges"], stats["max_depth"],
            stats["connected_components"]) == (4, 4, 2, 1)
    assert stats["artifacts_by_run"] == {"r0": 1, "r1": 2, "r2": 1}


# -- export -----------------------------------------------------------------------------------


def test_dot_export_is_named_lineage_and_laid_out_left_to_right(diamond: LineageTracker) -> None:
    lines = diamond.export_to_dot().splitlines()
    assert lines[0] == "digraph lineage {"
    assert lines[1].strip() == "rankdir=LR;"
    assert lines[-1] == "}"


# -- store-backed entry points still raise ----------------------------------------------------


def test_store_backed_lookups_of_unknown_keys_raise(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Leniency is the in-memory tracker's; reading a store for a key that is not there is a
    typed error (the caller named something that does not exist)."""
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    m = ArtifactManager.reset_instance()
    root = tmp_path / "store"
    try:
        m.init_run("make", root=root)
        m.log_artifact("data", "dataset", data={"x": 1})
        m.finalize_run()
        with pytest.raises(ArtifactNotFoundError):
            m.get_lineage("nope")
    finally:
        ArtifactManager.reset_instance()
    registry = Registry(root / "registry.sqlite")
    try:
        with pytest.raises(ArtifactNotFoundError):
            LineageTracker.from_registry(registry, around="nope")
    finally:
        registry.close()
