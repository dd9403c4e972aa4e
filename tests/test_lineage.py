"""Lineage graph: seed semantics, scale, persistence, exports, and a graph from a real store."""

from __future__ import annotations

import ast
import graphlib
import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from repro_core import ArtifactManager, ArtifactType
from repro_core import lineage as lineage_package
from repro_core.errors import (
    ArtifactNotFoundError,
    InvalidArgumentError,
    MissingFileError,
    SerializationError,
    StoreNotFoundError,
)
from repro_core.lineage import LineageNode, LineageTracker, run_node_id
from repro_core.lineage.render import back_edges, label_lines, layers, render_svg
from repro_core.registry import Registry
from repro_core.store.local import LocalStorageBackend

SVG = "{http://www.w3.org/2000/svg}"
NASTY = 'say "hi" [x] (y) {z} a:b; c|d #quot; <b>&amp; `t`\nline2\\end'


def _add(t: LineageTracker, aid: str, parents: list[str] | None = None, *,
         type_: str = "dataset", run: str | None = None, **meta: Any) -> LineageNode:
    return t.add_artifact(aid, aid, type_, "v0", run_id=run, parent_ids=parents, metadata=meta)


@pytest.fixture
def diamond() -> LineageTracker:
    """a → b, a → c, b → d, c → d."""
    t = LineageTracker()
    _add(t, "a")
    _add(t, "b", ["a"], type_="model", run="r1")
    _add(t, "c", ["a"], type_="model", run="r1")
    _add(t, "d", ["b", "c"], type_="evaluation", run="r2")
    return t


# -- nodes ------------------------------------------------------------------------------------


def test_node_defaults_and_dict_round_trip() -> None:
    # The seed passed metadata=None explicitly; it still means "no metadata".
    node = LineageNode("x:v1", "x", "model", "v1", "t", metadata=None)  # type: ignore[arg-type]
    assert node.metadata == {} and node.kind == "artifact" and node.run_id is None
    full = LineageNode("run:1", "train", "run", "", "t", run_id="1", metadata={"k": [1]},
                       kind="run")
    assert LineageNode.from_dict(full.to_dict()) == full
    assert LineageNode.from_dict({**full.to_dict(), "future_field": 1}) == full
    with pytest.raises(InvalidArgumentError):
        LineageNode("x", "x", "model", "v1", "t", kind="dataset")


def test_add_artifact_records_node_and_parent_edges(diamond: LineageTracker) -> None:
    node = diamond.get_node("d")
    assert (node.artifact_name, node.artifact_type, node.run_id) == ("d", "evaluation", "r2")
    assert node.created_at.endswith("+00:00")
    assert set(diamond.graph.predecessors("d")) == {"b", "c"}
    assert diamond.graph.number_of_edges() == 4


def test_add_artifact_copies_metadata_and_rejects_bad_arguments() -> None:
    t = LineageTracker()
    meta = {"lr": 0.1}
    t.add_artifact("a", "a", "dataset", "v0", metadata=meta)
    meta["lr"] = 99
    assert t.get_node("a").metadata == {"lr": 0.1}
    with pytest.raises(InvalidArgumentError, match="wrap one id"):
        t.add_artifact("b", "b", "model", "v0", parent_ids="a")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError):
        t.add_artifact("", "b", "model", "v0")
    assert "b" not in t.graph  # nothing half-added


def test_artifact_type_enum_is_stored_as_its_string() -> None:
    t = LineageTracker()
    t.add_artifact("m", "m", ArtifactType.MODEL, "v0")
    t.add_artifact("n", "n", "model", "v0")
    assert type(t.get_node("m").artifact_type) is str
    assert t.validate_lineage()["stats"]["artifacts_by_type"] == {"model": 2}


def test_readding_keeps_existing_edges_and_replaces_record() -> None:
    t = LineageTracker()
    _add(t, "a")
    _add(t, "b", ["a"])
    t.add_artifact("b", "b", "model", "v1", parent_ids=["z"])
    assert set(t.graph.predecessors("b")) == {"a", "z"}
    assert t.get_node("b").artifact_type == "model"


# -- traversal --------------------------------------------------------------------------------


def test_diamond_ancestors_and_descendants(diamond: LineageTracker) -> None:
    assert diamond.get_ancestors("d") == {"a", "b", "c"}
    assert diamond.get_descendants("a") == {"b", "c", "d"}
    assert diamond.get_ancestors("a") == set()
    assert diamond.get_descendants("b") == {"d"}


def test_max_depth_counts_edges(diamond: LineageTracker) -> None:
    assert diamond.get_ancestors("d", max_depth=1) == {"b", "c"}
    assert diamond.get_ancestors("d", max_depth=2) == {"a", "b", "c"}
    assert diamond.get_descendants("a", max_depth=0) == set()
    t = LineageTracker()
    for i in range(10):
        _add(t, f"n{i}", [f"n{i - 1}"] if i else None)
    assert t.get_ancestors("n9", max_depth=3) == {"n6", "n7", "n8"}
    assert t.get_descendants("n0", max_depth=2) == {"n1", "n2"}


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_invalid_max_depth_is_refused(diamond: LineageTracker, bad: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="max_depth"):
        diamond.get_ancestors("d", max_depth=bad)


def test_get_node_of_unknown_id_raises_artifact_not_found(diamond: LineageTracker) -> None:
    # Traversals are lenient with unknown ids (test_lineage_compat.py); get_node has no empty
    # answer, so it raises, catchable as the built-in LookupError too.
    with pytest.raises(ArtifactNotFoundError, match="no artifact") as info:
        diamond.get_node("nope")
    assert info.value.key == "nope"
    assert isinstance(info.value, LookupError)


def test_lineage_path_is_undirected(diamond: LineageTracker) -> None:
    assert diamond.get_lineage_path("a", "d") in (["a", "b", "d"], ["a", "c", "d"])
    assert diamond.get_lineage_path("d", "a") in (["d", "b", "a"], ["d", "c", "a"])
    assert diamond.get_lineage_path("b", "c") in (["b", "a", "c"], ["b", "d", "c"])
    assert diamond.get_lineage_path("b", "b") == ["b"]
    _add(diamond, "island")
    assert diamond.get_lineage_path("a", "island") is None


def test_multiple_parents_and_disconnected_components() -> None:
    t = LineageTracker()
    _add(t, "x")
    _add(t, "y")
    _add(t, "z", ["x", "y"], type_="model")
    _add(t, "p")
    _add(t, "q", ["p"])
    assert t.get_ancestors("z") == {"x", "y"}
    assert t.get_descendants("p") == {"q"}
    assert t.get_lineage_path("z", "q") is None
    assert t.validate_lineage()["stats"]["connected_components"] == 2


def test_get_run_lineage_shape(diamond: LineageTracker) -> None:
    lineage = diamond.get_run_lineage("r1")
    assert set(lineage) == {"run_id", "artifacts", "edges"}
    assert lineage["run_id"] == "r1"
    # The run's own artifacts, then what they directly descend from outside the run.
    assert [a["artifact_id"] for a in lineage["artifacts"]] == ["b", "c", "a"]
    assert lineage["artifacts"][0] == diamond.get_node("b").to_dict()
    assert sorted((e["from"], e["to"]) for e in lineage["edges"]) == [("a", "b"), ("a", "c")]
    assert diamond.get_run_lineage("no-such-run") == {
        "run_id": "no-such-run", "artifacts": [], "edges": []}


# -- cycles and validation --------------------------------------------------------------------


def test_injected_cycles_are_detected(diamond: LineageTracker) -> None:
    assert diamond.detect_cycles() == []
    diamond.add_artifact("a", "a", "dataset", "v0", parent_ids=["d"])  # d → a closes loops
    _add(diamond, "self", ["self"])
    cycles = diamond.detect_cycles()
    assert ["self"] in cycles
    assert sorted(c for c in cycles if c != ["self"]) == [["a", "b", "d"], ["a", "c", "d"]]
    assert len(diamond.detect_cycles(max_cycles=1)) == 1
    report = diamond.validate_lineage()
    assert not report["is_valid"]
    issue = next(i for i in report["issues"] if i["type"] == "cycles")
    assert issue["severity"] == "error" and issue["count"] == 3
    # finite despite cycles: a, b, c, d collapse into one node and "self" into another, so no
    # edge is left between them
    assert report["stats"]["max_depth"] == 0


def test_validate_clean_graph_stats(diamond: LineageTracker) -> None:
    report = diamond.validate_lineage()
    assert report["is_valid"] is True and report["issues"] == []
    assert report["stats"] == {
        "total_artifacts": 4, "total_runs": 0, "total_edges": 4,
        "artifacts_by_type": {"dataset": 1, "evaluation": 1, "model": 2},
        "artifacts_by_run": {"r1": 2, "r2": 1}, "max_depth": 2, "connected_components": 1,
    }


def test_validate_reports_orphans_as_warning_and_dangling_parents_as_error() -> None:
    t = LineageTracker()
    _add(t, "alone")
    report = t.validate_lineage()
    assert report["is_valid"] is True
    assert [(i["type"], i["severity"], i["items"]) for i in report["issues"]] == [
        ("orphaned", "warning", ["alone"])]
    _add(t, "child", ["not-yet"])
    report = t.validate_lineage()
    assert report["is_valid"] is False
    missing = next(i for i in report["issues"] if i["type"] == "missing_references")
    assert missing["items"] == [{"id": "not-yet", "referenced_by": ["child"]}]
    assert report["stats"]["total_artifacts"] == 2 and report["stats"]["total_edges"] == 1


def test_dangling_parent_is_traversable_and_resolves_when_added() -> None:
    t = LineageTracker()
    _add(t, "model", ["data"])
    assert t.get_ancestors("model") == {"data"}
    assert t.get_descendants("data") == {"model"}
    with pytest.raises(ArtifactNotFoundError, match="only referenced"):
        t.get_node("data")
    _add(t, "data")
    assert t.validate_lineage()["is_valid"] is True
    assert set(t.graph.predecessors("model")) == {"data"}


def test_empty_graph_validates() -> None:
    report = LineageTracker().validate_lineage()
    assert report["is_valid"] and report["stats"]["total_artifacts"] == 0
    assert report["stats"]["max_depth"] == 0 and report["stats"]["connected_components"] == 0


def test_100k_chain_has_no_recursion_limit() -> None:
    t = LineageTracker()
    n = 100_000
    # Bulk insert (add_artifact per node works too, but is ~10x slower than this test needs).
    t.graph.add_edges_from((f"c{i}", f"c{i + 1}") for i in range(n - 1))
    t.nodes.update((f"c{i}", LineageNode(f"c{i}", "c", "dataset", f"v{i}", "t")) for i in range(n))
    assert len(t.get_ancestors(f"c{n - 1}")) == n - 1
    assert len(t.get_descendants("c0")) == n - 1
    assert t.get_ancestors(f"c{n - 1}", max_depth=5) == {f"c{n - 1 - k}" for k in range(1, 6)}
    path = t.get_lineage_path("c0", f"c{n - 1}")
    assert path is not None and len(path) == n
    report = t.validate_lineage()
    assert report["is_valid"] and report["stats"]["max_depth"] == n - 1
    assert t.detect_cycles() == []


# -- persistence ------------------------------------------------------------------------------


def _snapshot(t: LineageTracker) -> tuple[dict[str, LineageNode], set[tuple[str, str]], set[str]]:
    return dict(t.nodes), set(t.graph.edges), set(t.graph.nodes) - set(t.nodes)


def test_save_load_exact_round_trip(diamond: LineageTracker, tmp_path: Path) -> None:
    _add(diamond, "e", ["d", "dangling:v3"], type_="checkpoint", run="r2",
         nested={"a": [1, 2.5, None, True], "ü": "日本"}, text=NASTY)
    diamond.nodes["run:r2"] = LineageNode("run:r2", "train", "run", "", "t", run_id="r2",
                                          kind="run")
    diamond.graph.add_edge("run:r2", "e")
    path = tmp_path / "sub" / "lineage.json"
    diamond.save(path)
    loaded = LineageTracker()
    _add(loaded, "stale")  # load replaces, it does not merge
    loaded.load(path)
    assert _snapshot(loaded) == _snapshot(diamond)
    assert loaded.get_node("e").metadata["nested"] == {"a": [1, 2.5, None, True], "ü": "日本"}
    assert loaded.get_node("run:r2").kind == "run"
    assert "dangling:v3" in loaded.graph and "dangling:v3" not in loaded.nodes
    # Deterministic bytes: saving the loaded graph gives the identical file.
    again = tmp_path / "again.json"
    loaded.save(again)
    assert again.read_bytes() == path.read_bytes()
    assert not list(path.parent.glob(".*.tmp"))  # no temp file left behind


def test_save_refuses_unserializable_metadata_before_writing(tmp_path: Path) -> None:
    t = LineageTracker()
    _add(t, "a", score=math.nan)
    with pytest.raises(SerializationError, match="score"):
        t.save(tmp_path / "l.json")
    assert not (tmp_path / "l.json").exists()


def test_load_rejects_bad_files_and_leaves_tracker_alone(diamond: LineageTracker,
                                                         tmp_path: Path) -> None:
    before = _snapshot(diamond)
    bad = tmp_path / "bad.json"
    for content in ("{not json", json.dumps({"format": "other"}),
                    json.dumps({"format": "repro-lineage", "format_version": 99}),
                    json.dumps({"format": "repro-lineage", "format_version": 1,
                                "nodes": [{"artifact_id": "x"}], "edges": []})):
        bad.write_text(content)
        with pytest.raises(SerializationError):
            diamond.load(bad)
    assert _snapshot(diamond) == before
    with pytest.raises(MissingFileError):
        diamond.load(tmp_path / "absent.json")


# -- Mermaid ----------------------------------------------------------------------------------

_MERMAID_LINE = re.compile(
    r"flowchart TD"
    r"|    (n\d+)(\[\"[^\"]*\"\]|\(\[\"[^\"]*\"\]\))"
    r"|    n\d+ --> n\d+"
    r"|    classDef c\d+ [a-z-]+:[#0-9a-z]+(,[a-z-]+:[#0-9a-z]+)*"
    r"|    class n\d+(,n\d+)* c\d+"
)


def _mermaid_decode(label: str) -> list[str]:
    def entity(m: re.Match[str]) -> str:
        name = m.group(1)
        named = {"quot": '"', "amp": "&", "lt": "<", "gt": ">"}
        return named[name] if name in named else chr(int(name))

    return [re.sub(r"#(\w+);", entity, part) for part in label.split("<br/>")]


@pytest.fixture
def nasty() -> LineageTracker:
    t = LineageTracker()
    t.add_artifact("weird", NASTY, "my type", "v1")
    t.add_artifact("m", "model", "model", "v2", parent_ids=["weird", 'ghost"]'])
    t.nodes["run:1"] = LineageNode("run:1", "tr[ai]n", "run", "", "t", run_id="1", kind="run")
    t.graph.add_edge("m", "run:1")
    return t


def test_mermaid_is_valid_flowchart_and_labels_survive(nasty: LineageTracker) -> None:
    text = nasty.export_to_mermaid()
    lines = text.splitlines()
    assert lines[0] == "flowchart TD"
    for line in lines:
        assert _MERMAID_LINE.fullmatch(line), line
    labels = {}
    for line in lines:
        m = re.fullmatch(r"    (n\d+)\(?\[\"([^\"]*)\"\]\)?", line)
        if m:
            labels[m.group(1)] = _mermaid_decode(m.group(2))
            bare = re.sub(r"#\w+;", "", m.group(2))  # entity codes are the escaped form
            assert not re.search(r"[\[\](){}:;|`#<>&]", bare.replace("<br/>", "")), bare
    assert len(labels) == nasty.graph.number_of_nodes()
    order = list(nasty.graph.nodes)
    # A newline inside a name becomes a line break; everything else comes back verbatim.
    assert labels[f"n{order.index('weird')}"] == [*f"{NASTY}:v1".split("\n"), "my type"]
    ghost = 'ghost"]'
    assert labels[f"n{order.index(ghost)}"] == [ghost, "(missing)"]
    assert [line for line in lines if line.startswith(f"    n{order.index('run:1')}(")]
    assert sum(" --> " in line for line in lines) == nasty.graph.number_of_edges()
    classed = {n for line in lines if line.startswith("    class ")
               for n in line.split()[1].split(",")}
    assert classed == set(labels)


# -- DOT --------------------------------------------------------------------------------------

_DOT_STRING = r'"((?:[^"\\]|\\.)*)"'
_DOT_NODE = re.compile(rf"  {_DOT_STRING} \[label={_DOT_STRING}, shape=(box|ellipse), "
                       rf"style={_DOT_STRING}, fillcolor={_DOT_STRING}\];")
_DOT_EDGE = re.compile(rf"  {_DOT_STRING} -> {_DOT_STRING};")


def _dot_unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), text)


def test_dot_parses_back_to_the_same_graph(nasty: LineageTracker, tmp_path: Path) -> None:
    out = tmp_path / "g.dot"
    text = nasty.export_to_dot(out)
    assert out.read_text(encoding="utf-8") == text
    lines = text.splitlines()
    assert lines[0] == "digraph lineage {" and lines[-1] == "}"
    nodes: dict[str, tuple[str, str]] = {}
    edges: set[tuple[str, str]] = set()
    for line in lines[1:-1]:
        if node := _DOT_NODE.fullmatch(line):
            nodes[_dot_unescape(node.group(1))] = (_dot_unescape(node.group(2)), node.group(3))
        elif edge := _DOT_EDGE.fullmatch(line):
            edges.add((_dot_unescape(edge.group(1)), _dot_unescape(edge.group(2))))
        else:
            assert re.fullmatch(r"  (rankdir=LR|(node|edge) \[[^\]]*\]);", line), line
    assert set(nodes) == set(nasty.graph.nodes)
    assert edges == set(nasty.graph.edges)
    assert nodes["weird"][0] == f"{NASTY}:v1\nmy type"
    assert nodes["run:1"][1] == "ellipse"


# -- SVG --------------------------------------------------------------------------------------


def test_python_svg_is_well_formed_with_one_element_per_node(nasty: LineageTracker,
                                                             tmp_path: Path) -> None:
    nasty.add_artifact("ctl", "bad\x01char\ud800", "model", "v0", parent_ids=["m"])
    out = tmp_path / "g.svg"
    svg = render_svg(nasty, out, engine="python")
    assert out.read_text(encoding="utf-8") == svg
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    groups = root.findall(f"{SVG}g")
    node_groups = [g for g in groups if g.get("class") == "node"]
    assert len(node_groups) == nasty.graph.number_of_nodes()
    assert len([g for g in groups if g.get("class") == "edge"]) == nasty.graph.number_of_edges()
    assert len(root.findall(f".//{SVG}ellipse")) == 1  # the one run
    titles = {g.findtext(f"{SVG}title") for g in node_groups}
    assert titles == set(nasty.graph.nodes)
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert NASTY.split("\n")[0] in texts and "bad\ufffdchar\ufffd:v0" in texts
    assert render_svg(nasty, engine="python") == svg  # deterministic


def test_python_svg_handles_cycles_and_self_loops() -> None:
    t = LineageTracker()
    _add(t, "a", ["c"])
    _add(t, "b", ["a"])
    _add(t, "c", ["b"])
    _add(t, "s", ["s", "a"])
    svg = render_svg(t, engine="python")
    root = ET.fromstring(svg)
    assert len([g for g in root.iter(f"{SVG}g") if g.get("class") == "node"]) == 4
    dashed = [p for p in root.iter(f"{SVG}path") if p.get("stroke-dasharray")]
    assert len(dashed) == 2  # one reversed cycle edge + the self-loop
    assert back_edges(t.graph) == back_edges(t.graph.copy())


def test_layers_are_longest_path(diamond: LineageTracker) -> None:
    _add(diamond, "late", ["a", "d"])
    assert layers(diamond.graph, set()) == [["a"], ["b", "c"], ["d"], ["late"]]
    assert label_lines("ghost", None) == ["ghost", "(missing)"]


def test_svg_engine_choice(diamond: LineageTracker, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidArgumentError, match="engine"):
        render_svg(diamond, engine="neato")
    monkeypatch.setattr("repro_core.lineage.render.shutil.which", lambda name: None)
    with pytest.raises(InvalidArgumentError, match="graphviz"):
        render_svg(diamond, engine="dot")
    ET.fromstring(render_svg(diamond))  # auto falls back to the built-in layout


# -- built from a real store ------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(var, raising=False)
    m = ArtifactManager.reset_instance()
    run_a = m.init_run("A", root=tmp_path / "store")
    ds = m.log_artifact("dataset", "dataset", data={"x": 1})
    m.finalize_run()
    train = m.init_run("train")
    m.use_artifact("dataset")
    model = m.log_artifact("model", "model", data=b"weights")
    m.finalize_run()
    ev_run = m.init_run("eval")
    m.use_artifact("model")
    ev = m.log_artifact("evaluation", "evaluation", data={"acc": 0.9})
    m.finalize_run()
    ArtifactManager.reset_instance()  # closes nothing we need; the store is on disk
    assert run_a is not None and train is not None and ev_run is not None
    return {"root": tmp_path / "store", "runs": (run_a.id, train.id, ev_run.id),
            "artifacts": (ds, model, ev)}


def test_store_graph_links_artifacts_through_runs(store: dict[str, Any]) -> None:
    t = LineageTracker.from_store(store["root"])
    run_a, train, ev_run = (run_node_id(r) for r in store["runs"])
    # Graph ids are the artifacts' own keys (whatever the registry calls a version).
    ds, model, ev = (a.key for a in store["artifacts"])
    assert {ds, run_a, train, ev_run, model} <= t.get_ancestors(ev)
    assert ev in t.get_descendants(ds)
    assert t.get_ancestors(ev, max_depth=1) == {ev_run}
    assert {(u, v) for u, v in t.graph.edges} >= {
        (run_a, ds), (ds, train), (train, model), (model, ev_run), (ev_run, ev)}
    node = t.get_node(train)
    assert (node.kind, node.artifact_name, node.run_id) == ("run", "train", store["runs"][1])
    assert t.get_node(model).artifact_type == "model"
    assert t.get_node(model).version == store["artifacts"][1].version
    lineage = t.get_run_lineage(store["runs"][1])
    # Its own model, then the dataset it used (from run A), with the edges between.
    assert [a["artifact_id"] for a in lineage["artifacts"]] == [model, ds]
    assert {"from": ds, "to": train} in lineage["edges"]
    assert {"from": train, "to": model} in lineage["edges"]
    report = t.validate_lineage()
    assert report["is_valid"], report["issues"]
    assert report["stats"]["total_artifacts"] == 3 and report["stats"]["total_runs"] == 3
    assert report["stats"]["max_depth"] == 5


def test_store_graph_reports_missing_blobs(store: dict[str, Any]) -> None:
    model = store["artifacts"][1]
    blob = LocalStorageBackend(store["root"]).blob_path(model.hash)
    blob.chmod(0o644)
    blob.unlink()
    report = LineageTracker.from_store(store["root"]).validate_lineage()
    assert not report["is_valid"]
    issue = next(i for i in report["issues"] if i["type"] == "missing_blobs")
    assert issue["items"] == [{"id": model.key, "digest": model.hash, "path": str(blob)}]
    assert issue["details"] == issue["items"]
    # Without a root there is nothing to check blobs against.
    registry = Registry(store["root"] / "registry.sqlite")
    try:
        plain = LineageTracker.from_registry(registry).validate_lineage()
    finally:
        registry.close()
    assert plain["is_valid"]


def test_store_graph_uses_a_fixed_number_of_queries(store: dict[str, Any],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    registry = Registry(store["root"] / "registry.sqlite")
    calls: list[str] = []
    real_read = registry._read

    def counting_read(sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
        calls.append(sql)
        return real_read(sql, params)

    monkeypatch.setattr(registry, "_read", counting_read)
    try:
        t = LineageTracker.from_registry(registry, store["root"])
    finally:
        registry.close()
    assert t.graph.number_of_nodes() == 6
    assert len(calls) <= 6, calls  # bulk reads (a fixed six), not one per node


def test_store_graph_round_trips_through_save(store: dict[str, Any], tmp_path: Path) -> None:
    t = LineageTracker.from_store(store["root"])
    t.save(tmp_path / "l.json")
    loaded = LineageTracker()
    loaded.load(tmp_path / "l.json")
    assert _snapshot(loaded) == _snapshot(t)
    svg = render_svg(loaded, engine="python")
    assert ET.fromstring(svg).tag == "{http://www.w3.org/2000/svg}svg"
    labels = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    for artifact in store["artifacts"]:  # every artifact is drawn, labelled name:version
        assert f"{artifact.name}:{artifact.version}" in labels, labels
    for run_id in store["runs"]:  # and every run, by its id
        assert run_id in labels, labels


def test_from_store_without_registry_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(StoreNotFoundError, match="no repro store"):
        LineageTracker.from_store(tmp_path / "empty")
    assert not (tmp_path / "empty").exists()  # no store created as a side effect


def test_focused_load_matches_the_whole_graph(tmp_path: Path) -> None:
    """from_registry(around=…) walks outwards with indexed queries; it must find exactly what
    the whole-graph build finds, for every node, direction and depth."""
    from repro_core import ArtifactManager

    m = ArtifactManager.reset_instance()
    root = tmp_path / "store"
    m.init_run("make", root=root)
    m.log_artifact("raw", "dataset", data={"i": 0})
    m.log_artifact("clean", "dataset", data={"i": 1}, parent_artifacts=["raw"])
    m.finalize_run()
    models = []
    for i in range(3):
        m.init_run(f"train{i}")
        m.use_artifact("clean")
        models.append(m.log_artifact("model", "model", data={"w": i}, parent_artifacts=["clean"]))
        m.log_artifact("raw", "dataset", data={"i": 0})  # dedup: logged-by edge only
        m.finalize_run()
    m.init_run("eval")
    m.use_artifact("model", version=models[1].version)
    m.log_artifact("score", "evaluation", data={"acc": 0.5})
    m.finalize_run()
    registry = Registry(root / "registry.sqlite")
    try:
        whole = LineageTracker.from_registry(registry)
        for node in whole.graph.nodes:
            for depth in (None, 1, 2):
                for direction, query in (("up", "get_ancestors"), ("down", "get_descendants")):
                    focused = LineageTracker.from_registry(registry, around=node, depth=depth,
                                                           direction=direction)
                    expected = getattr(whole, query)(node, depth)
                    assert getattr(focused, query)(node) == expected, (node, depth, direction)
                    assert set(focused.graph.nodes) == expected | {node}
                    sub = whole.subgraph(expected | {node})
                    assert set(focused.graph.edges) == set(sub.graph.edges), (node, depth)
    finally:
        registry.close()
        ArtifactManager.reset_instance()


# -- package layout ---------------------------------------------------------------------------


def _sibling_imports(path: Path, modules: set[str]) -> set[str]:
    """The lineage modules ``path`` imports, anywhere in the file (a function-level import
    closes a cycle as surely as a top-level one, it only hides it until called)."""
    package = "repro_core.lineage"
    imported: list[tuple[str, list[str]]] = []  # (absolute module, names taken from it)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(part for part in (base, node.module) if part)
            imported.append((target, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            imported.extend((alias.name, []) for alias in node.names)
    found: set[str] = set()
    for target, names in imported:
        if target == package:  # from . import x: x is a sibling module or a name in __init__
            found.update(n if n in modules else "__init__" for n in names)
        elif target.startswith(package + "."):
            found.add(target.split(".")[2])
    found.discard(path.stem)
    return found


def test_lineage_modules_import_one_way() -> None:
    package = Path(lineage_package.__file__).parent
    modules = {p.stem for p in package.glob("*.py")}
    graph = {name: _sibling_imports(package / f"{name}.py", modules) for name in modules}
    order = list(graphlib.TopologicalSorter(graph).static_order())  # CycleError on a cycle
    assert order[-1] == "__init__" and graph["nodes"] == set()
    assert all("tracker" not in deps for name, deps in graph.items() if name != "__init__")
