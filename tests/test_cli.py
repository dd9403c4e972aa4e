"""The `repro` CLI on a real store, through click's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from repro_core import ArtifactManager, hash_bytes
from repro_core.cli import main


@pytest.fixture
def populated(manager: ArtifactManager, store_root: Path) -> dict[str, str]:
    """dataset -> run A -> model -> run B (uses model) -> evaluation."""
    a = manager.init_run("train", config={"lr": 0.1}, tags=["x"])
    manager.log_artifact("dataset", "dataset", data={"rows": [1, 2, 3]})
    manager.log_artifact("model", "model", data=b"weights" * 100, parent_artifacts=["dataset"],
                         aliases=["best"])
    manager.finalize_run()
    b = manager.init_run("evaluate")
    manager.use_artifact("model:best")
    manager.log_artifact("evaluation", "evaluation", data={"acc": 0.9})
    manager.finalize_run()
    assert a.id and b.id
    return {"a": a.id, "b": b.id}


def invoke(*args: str) -> tuple[int, str]:
    """Exit code and stdout + stderr, as a terminal user would see them."""
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_runs_and_show(populated: dict[str, str], store_root: Path) -> None:
    code, out = invoke("runs", "--root", str(store_root), "--json")
    assert code == 0
    runs = json.loads(out)
    assert [r["name"] for r in runs] == ["train", "evaluate"]
    assert [r["artifacts"] for r in runs] == [2, 1]
    assert all(r["state"] == "completed" and r["project"] == "default" for r in runs)
    code, out = invoke("show", populated["b"], "--root", str(store_root), "--json")
    detail = json.loads(out)
    assert code == 0 and detail["inputs"] == ["default/model:v1"]
    assert detail["outputs"] == ["default/evaluation:v1"] and detail["project"] == "default"
    code, out = invoke("show", populated["a"], "--root", str(store_root))
    assert code == 0 and "train" in out and '"lr": 0.1' in out and "project=default" in out


def _table_rows(out: str) -> list[list[str]]:
    """The cells of a rich table as printed (header row first)."""
    return [[cell.strip() for cell in line.strip()[1:-1].split(line.strip()[0])]
            for line in out.splitlines() if line.strip()[:1] in ("┃", "│")]


def test_runs_and_show_columns(populated: dict[str, str], store_root: Path) -> None:
    """`repro runs`: id, name, project, state, start, duration, artifacts, in that order and
    filled from the run; `repro show`: the header line, config, states, inputs, outputs."""
    root = ["--root", str(store_root)]
    code, out = invoke("runs", *root)
    rows = _table_rows(out)
    assert code == 0 and rows[0] == ["id", "name", "project", "state", "start", "duration",
                                     "artifacts"]
    by_id = {row[0]: row for row in rows[1:]}
    assert sorted(by_id) == sorted(populated.values())
    for key, name, artifacts in (("a", "train", "2"), ("b", "evaluate", "1")):
        row = by_id[populated[key]]
        assert row[1:4] == [name, "default", "completed"] and row[6] == artifacts
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", row[4]), row
        assert re.fullmatch(r"\d+\.\ds", row[5]), row
    listed = json.loads(invoke("runs", *root, "--json")[1])
    assert {"id", "name", "project", "state", "created_at", "ended_at", "artifacts", "config",
            "tags", "host"} <= set(listed[0])

    code, out = invoke("show", populated["a"], *root)
    lines = out.splitlines()
    assert code == 0 and re.fullmatch(
        rf"train  id={populated['a']}  project=default  state=completed  host=\S+  "
        r"duration=\d+\.\ds", lines[0]), lines[0]
    assert lines[1] == 'config: {"lr": 0.1}'
    assert [line.split()[-1] for line in lines[2:4]] == ["running", "completed"]
    assert lines[4:] == ["inputs:  -", "outputs: default/dataset:v1 (16 B, 16 B new), "
                         "default/model:v1 (700 B, 700 B new)"]
    code, out = invoke("show", populated["b"], *root)
    assert out.splitlines()[4:] == ["inputs:  default/model:v1",
                                    "outputs: default/evaluation:v1 (11 B, 11 B new)"]


def test_runs_counts_deduplicated_outputs(manager: ArtifactManager, store_root: Path) -> None:
    """A run whose every output deduplicated to an existing version logged artifacts too: the
    old count (versions.run_id) said 0 while `show` listed them."""
    manager.init_run("first")
    manager.log_artifact("model", "model", data=b"same")
    manager.finalize_run()
    second = manager.init_run("second")
    manager.log_artifact("model", "model", data=b"same")  # dedup: no new version
    manager.finalize_run()
    runs = json.loads(invoke("runs", "--root", str(store_root), "--json")[1])
    assert {r["name"]: r["artifacts"] for r in runs} == {"first": 1, "second": 1}
    shown = json.loads(invoke("show", str(second.id), "--root", str(store_root), "--json")[1])
    assert shown["outputs"] == ["default/model:v1"]


def test_run_id_prefixes(populated: dict[str, str], store_root: Path) -> None:
    """show / diff / verify --run / lineage run: take a unique prefix, as git short hashes."""
    root = ["--root", str(store_root)]
    prefix = populated["b"][:6]
    code, out = invoke("show", prefix, *root, "--json")
    detail = json.loads(out)
    assert code == 0 and detail["id"] == populated["b"]
    assert detail["inputs"] == ["default/model:v1"]  # the old code queried inputs by prefix
    assert [s["state"] for s in detail["states"]] == ["running", "completed"]
    code, out = invoke("diff", populated["a"][:5], prefix, *root, "--json")
    assert code == 0 and json.loads(out)["runs"]["b"]["id"] == populated["b"]
    code, out = invoke("lineage", f"run:{prefix}", *root, "--format", "json")
    assert code == 0 and json.loads(out)["node"] == f"run:{populated['b']}"
    code, out = invoke("verify", "--run", populated["a"][:4], *root, "--json")
    assert code == 0 and json.loads(out)["blobs_checked"] == 2


def test_projects_are_shown_and_filtered(manager: ArtifactManager, store_root: Path) -> None:
    manager.init_run("v", project="vision")
    manager.log_artifact("model", "model", data=b"v")
    manager.finalize_run()
    manager.init_run("n", project="nlp")
    manager.log_artifact("model", "model", data=b"n")
    manager.finalize_run()
    root = ["--root", str(store_root)]
    runs = json.loads(invoke("runs", *root, "--project", "nlp", "--json")[1])
    assert [(r["name"], r["project"]) for r in runs] == [("n", "nlp")]
    rows = json.loads(invoke("artifacts", *root, "--project", "vision", "--json")[1])
    assert [(r["key"], r["project"]) for r in rows] == [("vision/model:v1", "vision")]
    rows = json.loads(invoke("artifacts", "nlp/model", *root, "--json")[1])
    assert [r["key"] for r in rows] == ["nlp/model:v1"]
    code, out = invoke("artifacts", *root)
    assert code == 0 and "project" in out and "vision" in out and "nlp" in out
    code, out = invoke("runs", *root)
    assert code == 0 and "vision" in out
    code, out = invoke("show", runs[0]["id"], *root)
    assert code == 0 and "project=nlp" in out
    code, out = invoke("artifacts", "nlp/model", "--project", "vision", *root)
    assert code == 2 and "--project" in out
    code, out = invoke("lineage", "model", *root)  # in two projects: ambiguous, said so
    assert code == 2 and "ambiguous" in out and "nlp" in out


def test_artifacts_listing(populated: dict[str, str], store_root: Path) -> None:
    code, out = invoke("artifacts", "model", "--root", str(store_root), "--json")
    rows = json.loads(out)
    assert code == 0 and [r["key"] for r in rows] == ["default/model:v1"]
    assert rows[0]["aliases"] == ["best", "latest"] and rows[0]["size"] == 700
    assert rows[0]["project"] == "default"
    code, out = invoke("artifacts", "--root", str(store_root))
    assert code == 0 and "evaluation" in out and "dataset" in out


def test_global_root_option(populated: dict[str, str], store_root: Path,
                            tmp_path: Path) -> None:
    """`repro --root X runs` (as git -C users type it) works; the command's --root wins."""
    code, out = invoke("--root", str(store_root), "runs", "--json")
    assert code == 0 and len(json.loads(out)) == 2
    code, out = invoke("--root", str(tmp_path / "elsewhere"), "runs", "--root", str(store_root),
                       "--json")
    assert code == 0 and len(json.loads(out)) == 2
    code, out = invoke("--root", str(tmp_path / "elsewhere"), "runs")
    assert code == 2 and "elsewhere" in out


def _flip_first_byte(path: Path) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_finds_flipped_byte(populated: dict[str, str], manager: ArtifactManager,
                                   store_root: Path) -> None:
    code, out = invoke("verify", "--root", str(store_root))
    assert code == 0 and "OK" in out
    model = manager.list_artifacts("model")[0]
    assert model.hash == hash_bytes(b"weights" * 100)
    _flip_first_byte(manager.use_artifact("model", verify=False).path)  # type: ignore[arg-type]
    code, out = invoke("verify", "--root", str(store_root), "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert [(p["digest"], p["kind"], p["versions"]) for p in report["problems"]] == [
        (model.hash, "digest", ["default/model:v1"])]
    code, out = invoke("verify", "model:v1", "--root", str(store_root))
    assert code == 1 and "DIGEST" in out and model.hash in out
    code, _ = invoke("verify", "dataset:v1", "--root", str(store_root))
    assert code == 0  # only the named version's blobs are checked


def test_verify_size_only_does_not_hash(populated: dict[str, str], manager: ArtifactManager,
                                        store_root: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A flipped byte keeps the size: `--size-only` passes without reading a blob, the full
    verify fails; a truncated blob fails both."""
    from repro_core.store import local

    root = ["--root", str(store_root)]
    model = manager.use_artifact("model", verify=False).path
    assert model is not None
    _flip_first_byte(model)
    hashed: list[object] = []
    real = local.hash_file

    def counted(*args: Any, **kwargs: Any) -> str:
        hashed.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(local, "hash_file", counted)
    code, out = invoke("verify", "--size-only", *root, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["blobs_checked"] == 3 and hashed == []
    code, out = invoke("verify", *root, "--json")
    assert code == 1 and [p["kind"] for p in json.loads(out)["problems"]] == ["digest"]
    assert len(hashed) == 3
    model.write_bytes(model.read_bytes()[:-1])
    code, out = invoke("verify", "--size-only", *root, "--json")
    assert code == 1 and [p["kind"] for p in json.loads(out)["problems"]] == ["size"]


def test_verify_run_checks_only_its_outputs(populated: dict[str, str], manager: ArtifactManager,
                                            store_root: Path) -> None:
    """--run RUN checks the versions the run logged, not what it used: run B used the model,
    so a corrupt model fails `verify --run A` and passes `verify --run B`."""
    root = ["--root", str(store_root)]
    _flip_first_byte(manager.use_artifact("model", verify=False).path)  # type: ignore[arg-type]
    code, out = invoke("verify", "--run", populated["a"], *root, "--json")
    report = json.loads(out)
    assert code == 1 and [p["versions"] for p in report["problems"]] == [["default/model:v1"]]
    code, out = invoke("verify", "--run", populated["b"], *root, "--json")
    assert code == 0 and json.loads(out)["blobs_checked"] == 1
    code, out = invoke("verify", "--help")
    assert "outputs" in out and "not the inputs" in out


def test_gc_frees_orphan_blob(populated: dict[str, str], store_root: Path) -> None:
    from repro_core.store.local import LocalStorageBackend

    store = LocalStorageBackend(store_root)
    with store.open_writer() as writer:  # a blob whose registry row never landed (crash)
        writer.write(b"orphan" * 1000)
        orphan, _ = writer.commit()
    old = time.time() - 7200
    os.utime(store.blob_path(orphan), (old, old))
    (store.tmp_dir / "999999-dead.part").write_bytes(b"partial")

    code, out = invoke("gc", "--root", str(store_root), "--json")
    dry = json.loads(out)
    assert code == 0 and dry["dry_run"] and dry["blobs"] == [orphan] and dry["bytes"] == 6000
    assert dry["temp_files"] == 1 and store.exists(orphan)

    code, out = invoke("gc", "--delete", "--root", str(store_root), "--json")
    done = json.loads(out)
    assert code == 0 and done["blobs"] == [orphan] and not store.exists(orphan)
    assert list(store.tmp_dir.iterdir()) == []
    code, _ = invoke("verify", "--root", str(store_root))
    assert code == 0  # nothing referenced was removed


def test_gc_keeps_young_orphans(populated: dict[str, str], store_root: Path) -> None:
    from repro_core.store.local import LocalStorageBackend

    store = LocalStorageBackend(store_root)
    with store.open_writer() as writer:
        writer.write(b"just published, row not committed yet")
        young, _ = writer.commit()
    code, out = invoke("gc", "--delete", "--root", str(store_root), "--json")
    assert code == 0 and json.loads(out)["kept_young"] == 1 and store.exists(young)


def test_subprocess_with_env_root(populated: dict[str, str], store_root: Path) -> None:
    env = {**os.environ, "REPRO_HOME": str(store_root)}
    out = subprocess.run([sys.executable, "-m", "repro_core.cli", "runs", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert {r["id"] for r in json.loads(out)} == set(populated.values())
    bad = subprocess.run([sys.executable, "-m", "repro_core.cli", "show", "zzzz"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("repro: error:")


def test_lineage_formats(populated: dict[str, str], store_root: Path, tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    root = ["--root", str(store_root)]
    code, out = invoke("lineage", "evaluation", *root, "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["node"] == "default/evaluation:v1" and data["descendants"] == []
    assert set(data["ancestors"]) == {"default/dataset:v1", "default/model:v1",
                                      f"run:{populated['a']}", f"run:{populated['b']}"}
    code, out = invoke("lineage", "evaluation:v1", *root, "--format", "json", "--depth", "1")
    assert json.loads(out)["ancestors"] == [f"run:{populated['b']}"]
    code, out = invoke("lineage", "dataset", *root, "--down", "--format", "json")
    assert set(json.loads(out)["descendants"]) >= {"default/model:v1", "default/evaluation:v1"}
    assert json.loads(out)["ancestors"] == []

    code, out = invoke("lineage", "evaluation", *root)
    assert code == 0 and "came from" in out and "default/dataset:v1" in out
    code, out = invoke("lineage", f"run:{populated['b']}", *root, "--format", "mermaid")
    assert code == 0 and out.startswith("flowchart TD")
    code, out = invoke("lineage", "model", *root, "--format", "dot")
    assert code == 0 and out.lstrip().startswith("digraph") and '"default/model:v1"' in out
    svg = tmp_path / "lineage.svg"
    code, _ = invoke("lineage", "evaluation", *root, "--format", "svg", "-o", str(svg))
    assert code == 0 and ET.parse(svg).getroot().tag.endswith("svg")

    code, out = invoke("lineage", "nope", *root)
    assert code == 2 and out.startswith("repro: error:")
    code, out = invoke("lineage", "run:nope", *root)
    assert code == 2 and "no run with id 'nope'" in out


def test_lineage_tree_output_file_and_headings(populated: dict[str, str], store_root: Path,
                                              tmp_path: Path) -> None:
    """-o is honoured for the default tree too (it used to print to stdout and exit 0), and
    a heading with nothing under it is left out."""
    root = ["--root", str(store_root)]
    target = tmp_path / "tree.txt"
    code, out = invoke("lineage", "evaluation", *root, "-o", str(target))
    assert code == 0 and "came from" not in out and f"wrote {target}" in out
    text = target.read_text()
    assert "came from" in text and "default/dataset:v1" in text and "\x1b[" not in text
    assert "built into" not in text  # evaluation has no descendants: no empty heading
    code, out = invoke("lineage", f"run:{populated['a']}", *root, "--up")  # it used nothing
    assert code == 0 and "came from" not in out and "built into" not in out
    assert "no lineage recorded" in out


@pytest.mark.parametrize("direction", ["--up", "--down", None])
def test_lineage_up_and_down_pick_one_direction(populated: dict[str, str], store_root: Path,
                                                direction: str | None) -> None:
    """dataset -> run A -> model -> run B -> evaluation, seen from the model: --up is only
    where it came from, --down only what was built from it, in every format."""
    root = ["--root", str(store_root), *([direction] if direction else [])]
    up = {"default/dataset:v1", f"run:{populated['a']}"}
    down = {"default/evaluation:v1", f"run:{populated['b']}"}
    code, out = invoke("lineage", "model", *root, "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["node"] == "default/model:v1"
    assert set(data["ancestors"]) == (up if direction != "--down" else set())
    assert set(data["descendants"]) == (down if direction != "--up" else set())
    code, tree = invoke("lineage", "model", *root)
    assert code == 0 and ("came from" in tree) is (direction != "--down")
    assert ("built into" in tree) is (direction != "--up")
    for fmt in ("mermaid", "dot", "tree"):  # the graph itself is loaded in one direction
        code, out = invoke("lineage", "model", *root, "--format", fmt)
        assert code == 0 and ("evaluation" in out) is (direction != "--up"), (fmt, out)
        assert ("dataset" in out) is (direction != "--down"), (fmt, out)


def test_lineage_up_and_down_together_are_refused(populated: dict[str, str],
                                                  store_root: Path) -> None:
    code, out = invoke("lineage", "model", "--up", "--down", "--root", str(store_root))
    assert code == 2 and "--up and --down" in out


def test_subprocess_verify_and_gc(populated: dict[str, str], manager: ArtifactManager,
                                  store_root: Path) -> None:
    """The installed entry point on a real store: exit codes a script can rely on."""
    cli = [sys.executable, "-m", "repro_core.cli"]
    root = ["--root", str(store_root)]
    assert subprocess.run([*cli, "verify", *root], capture_output=True).returncode == 0
    blob = manager.use_artifact("dataset", verify=False).path
    assert blob is not None
    _flip_first_byte(blob)
    bad = subprocess.run([*cli, "verify", *root], capture_output=True, text=True)
    assert bad.returncode == 1 and "DIGEST" in bad.stdout and "default/dataset:v1" in bad.stdout
    gc = subprocess.run([*cli, "gc", "--delete", "--grace", "0", *root, "--json"],
                        capture_output=True, text=True, check=True)
    assert json.loads(gc.stdout)["blobs"] == []  # corrupt but referenced: gc never hides it


def test_console_script_entry_point() -> None:
    """pyproject's `repro = "repro_core.cli:main"` still names the click group."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["repro"] == "repro_core.cli:main"
    code, out = invoke("--help")
    assert code == 0 and all(c in out for c in ("runs", "updates", "init", "recover"))
