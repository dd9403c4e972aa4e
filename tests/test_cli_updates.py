"""`repro updates RUN [--checkpoint KEY]`: a TTRL run's online updates from the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from repro_core import ArtifactManager
from repro_core.cli import main
from repro_core.ttrl import TTRLContext


@pytest.fixture
def ttrl_run(manager: ArtifactManager, store_root: Path, tmp_path: Path) -> dict[str, Any]:
    """a0 a1 | checkpoint v1 | b0 b1 (one reward NaN) | checkpoint v2 | c0."""
    def weights(i: int) -> Path:
        path = tmp_path / f"policy-{i}.pt"
        path.write_bytes(f"weights {i}".encode() * 50)
        return path

    with TTRLContext(root=store_root, monitor_hardware=False, capture_level=1) as ctx:
        ctx.log_online_update("a0", 0.1, 0.5)
        ctx.log_online_update("a1", 0.2, 0.5, kl_divergence=0.01)
        first = ctx.log_model_checkpoint(weights(1), step=2)
        ctx.log_online_update("b0", float("nan"), 0.6)
        ctx.log_online_update("b1", 0.5, 0.6)
        second = ctx.log_model_checkpoint(weights(2), step=4)
        ctx.log_online_update("c0", 0.9, 0.9)
    assert ctx.run is not None and ctx.run.id is not None
    return {"run": ctx.run.id, "first": first.key, "second": second.key,
            "root": ["--root", str(store_root)]}


def _json(*args: str) -> Any:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_all_updates_of_a_run(ttrl_run: dict[str, Any]) -> None:
    rows = _json("updates", ttrl_run["run"][:6], *ttrl_run["root"], "--json")
    assert [r["experience_id"] for r in rows] == ["a0", "a1", "b0", "b1", "c0"]
    assert [r["model_version"] for r in rows] == [None, None, ttrl_run["first"],
                                                 ttrl_run["first"], ttrl_run["second"]]
    assert rows[1]["kl_divergence"] == 0.01 and rows[2]["reward"] == "nan"  # strict JSON
    assert all(r["update_id"].startswith(ttrl_run["run"]) and r["time"][:2] == "20"
               for r in rows)


def test_updates_that_produced_a_checkpoint(ttrl_run: dict[str, Any]) -> None:
    second = _json("updates", ttrl_run["run"], "--checkpoint", ttrl_run["second"],
                   *ttrl_run["root"], "--json")
    assert [r["experience_id"] for r in second] == ["b0", "b1"]
    first = _json("updates", ttrl_run["run"], "--checkpoint", ttrl_run["first"].split("/")[1],
                  *ttrl_run["root"], "--json")
    assert [r["experience_id"] for r in first] == ["a0", "a1"]


def test_table_output(ttrl_run: dict[str, Any], manager: ArtifactManager) -> None:
    result = CliRunner().invoke(main, ["updates", ttrl_run["run"], *ttrl_run["root"]])
    assert result.exit_code == 0
    for text in ("update", "experience", "reward", "confidence", "model version", "b1", "nan",
                 ttrl_run["second"]):
        assert text in result.stdout, text
    plain = manager.init_run("plain").id
    manager.finalize_run()
    assert plain is not None
    result = CliRunner().invoke(main, ["updates", plain, *ttrl_run["root"]])
    assert result.exit_code == 0 and "has no online updates" in result.stdout


def test_checkpoint_of_another_run_is_refused(ttrl_run: dict[str, Any],
                                              manager: ArtifactManager) -> None:
    other = manager.init_run("other").id
    manager.finalize_run()
    assert other is not None
    result = CliRunner().invoke(main, ["updates", other, "--checkpoint", ttrl_run["second"],
                                       *ttrl_run["root"]])
    assert result.exit_code == 2 and f"repro updates {ttrl_run['run']}" in result.stderr
