"""diff_runs / `repro diff`: two real runs differing in config, one package and the seed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from repro_core import ArtifactManager, capture_environment, diff_runs, seed_everything
from repro_core.cli import main

_SAME = {"changed": {}, "added": {}, "removed": {}, "captured": {"a": True, "b": True}}
_GIT: dict[str, object] = {"root": "/src/repro", "commit": "c" * 40, "branch": "main",
                           "remote": None, "remotes": {}, "dirty": False, "errors": []}


def _run(manager: ArtifactManager, name: str, config: dict[str, object],
         env: dict[str, object] | None, metrics: dict[str, float]) -> str:
    run = manager.init_run(name, config=config)
    if env is not None:
        manager.log_artifact("environment", "environment", data=env)
    manager.log_metrics(metrics)
    manager.finalize_run()
    assert run is not None and run.id is not None
    return run.id


def test_diff_names_exactly_the_differences(manager: ArtifactManager, store_root: Path) -> None:
    seed_everything(1)
    env_a = capture_environment(2)
    env_a["git"] = _GIT  # not the checkout's: a source tree without .git must pass too
    seed_everything(2)
    env_b = copy.deepcopy(env_a)
    env_b["seeds"] = capture_environment(2)["seeds"]
    package = sorted(env_a["packages"])[0]
    env_b["packages"][package] = "999.0"  # a faked upgrade of one package
    config_a = {"lr": 0.1, "model": {"depth": 4, "act": "relu"}, "old": True}
    config_b = {"lr": 0.2, "model": {"depth": 4, "act": "relu"}, "new": 1}
    a = _run(manager, "a", config_a, env_a, {"loss": 0.5, "acc": 0.8})
    b = _run(manager, "b", config_b, env_b, {"loss": 0.4})

    result = diff_runs(a, b, root=store_root)
    assert result["config"] == {"changed": {"lr": [0.1, 0.2]}, "added": {"new": 1},
                                "removed": {"old": True}, "captured": {"a": True, "b": True}}
    assert result["packages"] == {**_SAME,
                                  "changed": {package: [env_a["packages"][package], "999.0"]}}
    assert list(result["seeds"]["changed"]) != [] and not result["seeds"]["added"]
    assert all("seed" in key.lower() for key in result["seeds"]["changed"])
    for section in ("git", "cuda", "gpu", "determinism"):
        assert result[section] == _SAME, section
    assert result["metrics"] == {"acc": [0.8, None], "loss": [0.5, 0.4]}

    out = CliRunner().invoke(main, ["diff", a, b, "--root", str(store_root)])
    assert out.exit_code == 0
    assert "~ lr: 0.1 -> 0.2" in out.output and f"~ {package}:" in out.output
    assert "git: same" in out.output and "final metrics" in out.output
    as_json = CliRunner().invoke(main, ["diff", a, b, "--root", str(store_root), "--json"])
    assert json.loads(as_json.output)["config"]["changed"] == {"lr": [0.1, 0.2]}
    bad = CliRunner().invoke(main, ["diff", a, "nope", "--root", str(store_root)])
    assert bad.exit_code == 2 and bad.stderr.startswith("repro: error:")


def test_diff_of_identical_runs_is_empty(manager: ArtifactManager, store_root: Path) -> None:
    env = {**capture_environment(1), "git": _GIT}
    a = _run(manager, "a", {"x": 1}, env, {"m": float("nan")})
    b = _run(manager, "b", {"x": 1}, env, {"m": 1.0})
    result = diff_runs(a, b, root=store_root)
    assert all(result[s] == _SAME for s in ("config", "git"))
    out = CliRunner().invoke(main, ["diff", a, b, "--root", str(store_root), "--json"])
    assert json.loads(out.output)["metrics"]["m"] == ["nan", 1.0]  # strict JSON, NaN kept


def test_uncaptured_sections_are_said_so(manager: ArtifactManager, store_root: Path) -> None:
    """Runs that captured nothing used to show `packages: same`, `git: same`, `cuda: same`,
    and a stray `+ : {}` line when only one side had a section."""
    bare_a = _run(manager, "bare-a", {"x": 1}, None, {})
    bare_b = _run(manager, "bare-b", {"x": 1}, None, {})
    result = diff_runs(bare_a, bare_b, root=store_root)
    for section in ("packages", "git", "cuda", "gpu", "determinism", "seeds"):
        assert result[section]["captured"] == {"a": False, "b": False}, section
    out = CliRunner().invoke(main, ["diff", bare_a, bare_b, "--root", str(store_root)]).output
    assert "packages: not captured" in out and "git: not captured" in out
    assert "cuda: not captured" in out and ": same" not in out.replace("config: same", "")

    env = capture_environment(2)
    env["cuda"] = {}  # captured, but empty: no `"": {}` entry either
    full = _run(manager, "full", {"x": 1}, env, {})
    result = diff_runs(bare_a, full, root=store_root)
    assert result["packages"] == {"changed": {}, "added": {}, "removed": {},
                                  "captured": {"a": False, "b": True}}
    out = CliRunner().invoke(main, ["diff", full, bare_a, "--root", str(store_root)]).output
    assert "packages: not captured in b" in out and "+ :" not in out and "- :" not in out
    assert diff_runs(full, full, root=store_root)["cuda"] == _SAME


def test_diff_uses_the_managers_store(manager: ArtifactManager, store_root: Path,
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without root=, diff_runs reads the store the manager uses (it read ./repro_store)."""
    a = _run(manager, "a", {"x": 1}, None, {})
    b = _run(manager, "b", {"x": 2}, None, {})
    monkeypatch.chdir(tmp_path)  # no ./repro_store here
    result = diff_runs(a[:6], b[:6])  # prefixes, too
    assert result["runs"]["a"]["id"] == a and result["config"]["changed"] == {"x": [1, 2]}
    assert not (tmp_path / "repro_store").exists()


def _environment(commit: str, cuda: str, gpu: str, deterministic: bool) -> dict[str, object]:
    """An environment artifact as capture_environment writes its compared sections."""
    return {
        "git": {"commit": commit, "branch": "main", "dirty": False, "remote": None,
                "remotes": {}, "root": f"/checkouts/{commit[:4]}", "errors": []},
        "cuda": {"available": True, "version": cuda, "cudnn": 90100, "nccl": "2.21.5"},
        "gpu": {"count": 1, "devices": [{"index": 0, "name": gpu, "memory_total": 85899345920}]},
        "determinism": {"torch": {"deterministic_algorithms": deterministic,
                                  "cudnn_benchmark": not deterministic}},
        "packages": {"torch": "2.13.0"}, "seeds": {"repro": {"seed": 1}},
    }


def test_diff_reports_each_environment_section(manager: ArtifactManager,
                                               store_root: Path) -> None:
    """git (commit, dirty), CUDA, GPU and determinism each report their change, and only
    theirs; git keys that are not compared (the checkout path) are not reported."""
    env_a = _environment("a" * 40, "12.4", "NVIDIA A100-SXM4-80GB", False)
    env_b = _environment("b" * 40, "12.6", "NVIDIA H100 80GB HBM3", True)
    env_b["git"]["dirty"] = True  # type: ignore[index]
    a = _run(manager, "a", {"x": 1}, env_a, {})
    b = _run(manager, "b", {"x": 1}, env_b, {})
    result = diff_runs(a, b, root=store_root)
    assert result["git"] == {**_SAME, "changed": {"commit": ["a" * 40, "b" * 40],
                                                  "dirty": [False, True]}}
    assert result["cuda"] == {**_SAME, "changed": {"version": ["12.4", "12.6"]}}
    assert result["gpu"] == {**_SAME, "changed": {
        "devices.0.name": ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]}}
    assert result["determinism"] == {**_SAME, "changed": {
        "torch.cudnn_benchmark": [True, False], "torch.deterministic_algorithms": [False, True]}}
    for section in ("config", "packages", "seeds"):
        assert result[section] == _SAME, section
    out = CliRunner().invoke(main, ["diff", a, b, "--root", str(store_root)]).output
    for line in (f'~ commit: "{"a" * 40}" -> "{"b" * 40}"', '~ version: "12.4" -> "12.6"',
                 '~ devices.0.name: "NVIDIA A100-SXM4-80GB" -> "NVIDIA H100 80GB HBM3"',
                 "~ torch.deterministic_algorithms: false -> true", "~ dirty: false -> true"):
        assert line in out, (line, out)
    assert "root" not in out and "/checkouts/" not in out
