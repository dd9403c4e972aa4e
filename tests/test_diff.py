"""diff_runs / `repro diff`: two real runs differing in config, one package and the seed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from click.testing import CliRunner

from repro_core import ArtifactManager, capture_environment, diff_runs, seed_everything
from repro_core.cli import main


def _run(manager: ArtifactManager, name: str, config: dict[str, object],
         env: dict[str, object], metrics: dict[str, float]) -> str:
    run = manager.init_run(name, config=config)
    manager.log_artifact("environment", "environment", data=env)
    manager.log_metrics(metrics)
    manager.finalize_run()
    assert run is not None and run.id is not None
    return run.id


def test_diff_names_exactly_the_differences(manager: ArtifactManager, store_root: Path) -> None:
    seed_everything(1)
    env_a = capture_environment(2)
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
                                "removed": {"old": True}}
    assert result["packages"] == {
        "changed": {package: [env_a["packages"][package], "999.0"]}, "added": {}, "removed": {}}
    assert list(result["seeds"]["changed"]) != [] and not result["seeds"]["added"]
    assert all("seed" in key.lower() for key in result["seeds"]["changed"])
    for section in ("git", "cuda", "gpu", "determinism"):
        assert result[section] == {"changed": {}, "added": {}, "removed": {}}, section
    assert result["metrics"] == {"acc": [0.8, None], "loss": [0.5, 0.4]}

    out = CliRunner().invoke(main, ["diff", a, b, "--root", str(store_root)])
    assert out.exit_code == 0
    assert "~ lr: 0.1 -> 0.2" in out.output and f"~ {package}:" in out.output
    assert "git: same" in out.output and "final metrics" in out.output
    as_json = CliRunner().invoke(main, ["diff", a, b, "--root", str(store_root), "--json"])
    assert json.loads(as_json.output)["config"]["changed"] == {"lr": [0.1, 0.2]}
    bad = CliRunner().invoke(main, ["diff", a, "nope", "--root", str(store_root)])
    assert bad.exit_code == 2 and bad.output.startswith("repro: error:")


def test_diff_of_identical_runs_is_empty(manager: ArtifactManager, store_root: Path) -> None:
    env = capture_environment(1)
    a = _run(manager, "a", {"x": 1}, env, {"m": float("nan")})
    b = _run(manager, "b", {"x": 1}, env, {"m": 1.0})
    result = diff_runs(a, b, root=store_root)
    assert all(result[s] == {"changed": {}, "added": {}, "removed": {}}
               for s in ("config", "packages", "git", "seeds"))
    out = CliRunner().invoke(main, ["diff", a, b, "--root", str(store_root), "--json"])
    assert json.loads(out.output)["metrics"]["m"] == ["nan", 1.0]  # strict JSON, NaN kept
