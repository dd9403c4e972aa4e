"""The Lightning quickstart and the Lightning overhead benchmark run as users run them: a
fresh interpreter, the store from ``REPRO_HOME``, files only where they say."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from repro_core import ArtifactManager

ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path, store: Path, timeout: int) -> str:
    """Run with its own temp dir, which it must leave empty."""
    scratch = cwd.parent / f"{cwd.name}-tmpdir"
    scratch.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout,
                          env={**os.environ, "REPRO_HOME": str(store), "TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # (torch itself keeps a compile cache there, torchinductor_<user>: not ours to remove)
    left = [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")]
    assert left == [], f"left in the temp dir: {left}"
    return proc.stdout


def _predictions(out: str) -> str:
    match = re.search(r"; predictions (\[.*\])$", out, re.MULTILINE)
    assert match, out
    return match.group(1)


def _quickstart(cwd: Path, store: Path) -> tuple[str, str]:
    out = _run([str(ROOT / "examples" / "lightning_quickstart.py")], cwd, store, timeout=150)
    match = re.search(r"^run ([0-9a-f]{12}): completed$", out, re.MULTILINE)
    assert match, out
    return match.group(1), out


@pytest.mark.slow
@pytest.mark.timeout(320)
def test_lightning_quickstart_twice(manager: ArtifactManager, store_root: Path,
                                    tmp_path: Path) -> None:
    first, out = _quickstart(tmp_path, store_root)
    assert "dataset: quickstart/dataset:v1" in out
    assert re.search(r"^  quickstart/checkpoint:v5 +best +step 42 +epoch=2-step=42\.ckpt$", out,
                     re.MULTILINE), out
    assert re.search(r"^  quickstart/checkpoint:v6 +latest +step 42 +last\.ckpt$", out,
                     re.MULTILINE), out
    assert "the stored blob itself (a read-only link, no second copy)" in out
    assert "$ repro lineage quickstart/checkpoint:best --up --depth 1\nquickstart/checkpoint:v5\n" \
        in out
    assert re.search(r"^loaded Regressor\(hidden=32\) from quickstart/checkpoint:best", out,
                     re.MULTILINE), out
    # Only the store and Lightning's named folder are written in the working directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning_quickstart_logs", "store"]

    # Again: a new run, the same dataset version, checkpoint versions continue, and the same
    # model (seeded, deterministic).
    predictions = _predictions(out)
    second, out = _quickstart(tmp_path, store_root)
    assert _predictions(out) == predictions
    assert second != first
    assert "dataset: quickstart/dataset:v1" in out
    assert re.search(r"^  quickstart/checkpoint:v11 +best +step 42 ", out, re.MULTILINE), out
    assert "6 more from earlier runs" in out

    # The store agrees with what the example printed.
    registry = manager.registry()
    runs = {r.id: r for r in registry.list_runs()}
    assert runs[first].state == runs[second].state == "completed"
    best = manager.use_artifact("quickstart/checkpoint:best")
    assert best.key == "quickstart/checkpoint:v11"
    assert best.metadata["run_id"] == second and best.metadata["global_step"] == 42
    ancestors = manager.get_lineage("quickstart/checkpoint:best")["ancestors"]
    assert "quickstart/dataset:v1" in ancestors and f"run:{second}" in ancestors
    ckpts = sorted((tmp_path / "lightning_quickstart_logs" / "checkpoints").iterdir())
    assert [p.name for p in ckpts] == ["epoch=2-step=42.ckpt", "last.ckpt"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_lightning_overhead_benchmark_quick(store_root: Path, tmp_path: Path) -> None:
    out = _run([str(ROOT / "benchmarks" / "lightning_overhead.py"), "--quick"], tmp_path,
               store_root, timeout=280)
    for row in ("| (a) Trainer + ModelCheckpoint | ", "| (b) (a) + ReproCallback | ",
                "| (c) (a) + WandbLogger offline, checkpoints as W&B artifacts | ",
                "| `safetensors.torch.save_file` | ",
                "| **SafetensorsCheckpointIO + ReproCallback**, REPRO_FSYNC=full | "):
        assert row in out, out
    assert re.search(r"^\(b\)/\(a\) = [\d.]+ \(target ≤ 1\.03: (met|NOT met)\)", out,
                     re.MULTILINE), out
    assert "Big checkpoint: 0.02 GB of float32" in out
    assert list(tmp_path.iterdir()) == []  # everything it wrote was in its temp dir
