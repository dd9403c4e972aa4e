"""The examples run as users run them (a fresh interpreter, ``--root DIR``) and record what
they say they record."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from repro_core import ArtifactManager

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run_example(name: str, store: Path, cwd: Path, *args: str) -> str:
    """Run an example in a fresh interpreter with its own temp dir, which it must leave empty."""
    scratch = cwd.parent / f"{cwd.name}-tmpdir"
    scratch.mkdir()
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), "--root", str(store), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=100,
                          env={**os.environ, "TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # (torch itself keeps a compile cache there, torchinductor_<user>: not ours to remove)
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]
    assert left == [], "the example left files in the temp dir"
    return proc.stdout


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_quickstart(manager: ArtifactManager, store_root: Path, tmp_path: Path) -> None:
    out = _run_example("quickstart.py", store_root, tmp_path)
    assert ("lineage of toy-eval: parents=['quickstart/toy-model:v1'] produced_by=evaluate"
            in out)
    assert f"look at it: repro runs --root {store_root}" in out
    assert re.search(r"^verify: \d+ blobs, \d+ bytes, OK$", out, re.MULTILINE)
    runs = manager.registry().list_runs()
    assert [(r.name, r.state) for r in runs] == [("train", "completed"),
                                                 ("evaluate", "completed")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]  # nothing written in cwd


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ttrl_loop(manager: ArtifactManager, store_root: Path, tmp_path: Path) -> None:
    out = _run_example("ttrl_loop.py", store_root, tmp_path)
    lines = out.splitlines()
    assert ("default/checkpoint:v8 was produced by 50 updates (u351..u400) made on "
            "default/checkpoint:v7") in lines
    assert "updates made after default/checkpoint:v8: 0" in lines
    assert "stored: 400 experiences, 400 online updates" in lines
    assert any(line.startswith("aggregates: update_count=400, experience_count=400, "
                               "mean_reward=") for line in lines)
    assert any(line.startswith("experience buffer: default/experience_buffer:v")
               for line in lines)
    match = re.search(r"^run ([0-9a-f]+): completed;", out, re.MULTILINE)
    assert match, out

    # The store agrees with what the example printed.
    run_id = match.group(1)
    record = manager.get_run(run_id)
    assert record["state"] == "completed" and record["name"].startswith("ttrl_")
    assert record["config"]["updates"] == 400
    registry = manager.registry()
    assert len(registry.online_updates(run_id, None)) == 50
    assert len(registry.online_updates(run_id, manager.version_id("checkpoint:v7"))) == 50
    assert len(registry.experiences(run_id)) == 400
    metrics = manager.get_metrics(run_id, keys=["online/reward", "online/update_count"])
    assert len(metrics["online/reward"]) == 400
    assert metrics["online/update_count"][-1][1] == 400.0
    before, after = (_sample_accuracy(lines, prefix) for prefix in ("before TTRL", "after TTRL"))
    assert after > before  # test-time training without labels helped on this toy task


def _sample_accuracy(lines: list[str], prefix: str) -> float:
    line = next(line for line in lines if line.startswith(prefix))
    match = re.search(r"sample_accuracy ([\d.]+)", line)
    assert match, line
    return float(match.group(1))
