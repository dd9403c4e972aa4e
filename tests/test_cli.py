"""The `repro` CLI on a real store, through click's runner and as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from repro_core import ArtifactManager
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
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_runs_and_show(populated: dict[str, str], store_root: Path) -> None:
    code, out = invoke("runs", "--root", str(store_root), "--json")
    assert code == 0
    runs = json.loads(out)
    assert [r["name"] for r in runs] == ["train", "evaluate"]
    assert [r["artifacts"] for r in runs] == [2, 1]
    assert all(r["state"] == "completed" for r in runs)
    code, out = invoke("show", populated["b"], "--root", str(store_root), "--json")
    detail = json.loads(out)
    assert code == 0 and detail["inputs"] == ["model:v0"]
    assert detail["outputs"] == ["evaluation:v0"]
    code, out = invoke("show", populated["a"], "--root", str(store_root))
    assert code == 0 and "train" in out and '"lr": 0.1' in out


def test_artifacts_listing(populated: dict[str, str], store_root: Path) -> None:
    code, out = invoke("artifacts", "model", "--root", str(store_root), "--json")
    rows = json.loads(out)
    assert code == 0 and [r["key"] for r in rows] == ["model:v0"]
    assert rows[0]["aliases"] == ["best", "latest"] and rows[0]["size"] == 700
    code, out = invoke("artifacts", "--root", str(store_root))
    assert code == 0 and "evaluation" in out and "dataset" in out


@pytest.mark.parametrize(
    "args",
    [("show", "nope"), ("artifacts", "nope"), ("verify", "nope:v0"), ("verify", "../x")],
)
def test_bad_input_is_one_line_exit_2(populated: dict[str, str], store_root: Path,
                                      args: tuple[str, ...]) -> None:
    code, out = invoke(*args, "--root", str(store_root))
    assert code == 2
    assert out.startswith("repro: error:") and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1


def test_missing_store_is_not_created(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for command in ("runs", "artifacts", "verify", "gc"):
        code, out = invoke(command, "--root", str(missing))
        assert code == 2 and "no repro store" in out
    assert not missing.exists()


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
    assert model.hash
    _flip_first_byte(manager.use_artifact("model", verify=False).path)  # type: ignore[arg-type]
    code, out = invoke("verify", "--root", str(store_root), "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert [(p["digest"], p["kind"], p["versions"]) for p in report["problems"]] == [
        (model.hash, "digest", ["model:v0"])]
    code, out = invoke("verify", "model:v0", "--root", str(store_root))
    assert code == 1 and "DIGEST" in out and model.hash in out
    code, _ = invoke("verify", "dataset:v0", "--root", str(store_root))
    assert code == 0  # only the named version's blobs are checked


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
    bad = subprocess.run([sys.executable, "-m", "repro_core.cli", "show", "zzz"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("repro: error:")


def test_lineage_formats(populated: dict[str, str], store_root: Path, tmp_path: Path) -> None:
    import xml.etree.ElementTree as ET

    root = ["--root", str(store_root)]
    code, out = invoke("lineage", "evaluation", *root, "--format", "json")
    data = json.loads(out)
    assert code == 0 and data["node"] == "evaluation:v0" and data["descendants"] == []
    assert set(data["ancestors"]) == {"dataset:v0", "model:v0", f"run:{populated['a']}",
                                      f"run:{populated['b']}"}
    code, out = invoke("lineage", "evaluation:v0", *root, "--format", "json", "--depth", "1")
    assert json.loads(out)["ancestors"] == [f"run:{populated['b']}"]
    code, out = invoke("lineage", "dataset", *root, "--down", "--format", "json")
    assert set(json.loads(out)["descendants"]) >= {"model:v0", "evaluation:v0"}
    assert json.loads(out)["ancestors"] == []

    code, out = invoke("lineage", "evaluation", *root)
    assert code == 0 and "came from" in out and "dataset:v0" in out
    code, out = invoke("lineage", f"run:{populated['b']}", *root, "--format", "mermaid")
    assert code == 0 and out.startswith("flowchart TD")
    code, out = invoke("lineage", "model", *root, "--format", "dot")
    assert code == 0 and out.lstrip().startswith("digraph") and '"model:v0"' in out
    svg = tmp_path / "lineage.svg"
    code, _ = invoke("lineage", "evaluation", *root, "--format", "svg", "-o", str(svg))
    assert code == 0 and ET.parse(svg).getroot().tag.endswith("svg")

    code, out = invoke("lineage", "nope", *root)
    assert code == 2 and out.startswith("repro: error:")
    code, out = invoke("lineage", "run:nope", *root)
    assert code == 2 and "no run with id 'nope'" in out


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
    assert bad.returncode == 1 and "DIGEST" in bad.stdout and "dataset:v0" in bad.stdout
    gc = subprocess.run([*cli, "gc", "--delete", "--grace", "0", *root, "--json"],
                        capture_output=True, text=True, check=True)
    assert json.loads(gc.stdout)["blobs"] == []  # corrupt but referenced: gc never hides it
