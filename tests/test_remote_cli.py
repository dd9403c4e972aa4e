"""``repro remote``, ``repro push``, ``repro pull``, ``repro status``: the terminal side of remotes.

Each command keeps the CLI's contract (one ``repro: error:`` line and exit 2 on bad input, no
traceback), prints a report a person can read and ``--json`` a script can, and a pull into a
new directory makes a store that verifies.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from repro_core import ArtifactManager
from repro_core.cli import main


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def ok(*args: str) -> Result:
    result = cli(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def one_line_error(result: Result, needle: str) -> None:
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("repro: error:") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    assert needle in result.stderr, result.stderr


@pytest.fixture
def logged(manager: ArtifactManager, store_root: Path) -> str:
    run = manager.init_run("train", {"lr": 0.1})
    manager.log_artifact("data", "dataset", data={"rows": [1, 2, 3]})
    manager.log_artifact("model", "model", data=b"w" * 64, parent_artifacts=["data:v1"],
                         aliases=["best"])
    manager.log_metrics({"loss": 0.5}, step=1)
    manager.finalize_run()
    ArtifactManager.reset_instance()
    assert run.id is not None
    return run.id


def test_remote_add_list_remove(logged: str, store_root: Path, tmp_path: Path) -> None:
    root = ("--root", str(store_root))
    assert "remote origin -> file://" in ok("remote", "add", "origin", str(tmp_path / "r"),
                                            *root).output
    ok("remote", "add", "backup", "s3://bucket-one/prefix", *root)
    listed = json.loads(ok("remote", "list", "--json", *root).output)
    assert listed == {"backup": "s3://bucket-one/prefix", "origin": f"file://{tmp_path / 'r'}"}
    one_line_error(cli("remote", "add", "origin", "s3://bucket-two/x", *root), "--replace")
    ok("remote", "add", "origin", "s3://bucket-two/x", "--replace", *root)
    one_line_error(cli("remote", "add", "x", "s3://key:secret@bucket-one/p", *root),
                   "credentials")
    one_line_error(cli("remote", "add", "x", "ftp://host/p", *root), "scheme")
    one_line_error(cli("remote", "add", "../x", "s3://bucket-one/p", *root), "remote name")
    ok("remote", "remove", "backup", *root)
    assert "no remote named" in cli("remote", "remove", "backup", *root).output
    assert json.loads(ok("remote", "list", "--json", *root).output) == {
        "origin": "s3://bucket-two/x"}


def test_push_pull_status_round_trip(logged: str, store_root: Path, tmp_path: Path) -> None:
    remote, fresh = tmp_path / "remote", tmp_path / "fresh"
    root = ("--root", str(store_root))
    ok("remote", "add", "origin", str(remote), *root)
    first = json.loads(ok("push", "--json", *root).output)
    assert sorted(first["versions"]) == ["default/data:v1", "default/model:v1"]
    assert first["runs"] == [logged] and first["blobs"] >= 2 and first["problems"] == []
    assert "up to date" in ok("push", *root).output  # idempotent
    pulled = json.loads(ok("--root", str(fresh), "pull", str(remote), "--json").output)
    assert sorted(pulled["versions"]) == sorted(first["versions"])
    assert ok("--root", str(fresh), "verify").exit_code == 0
    lineage = ok("--root", str(fresh), "lineage", "model:best", "--format", "json").output
    assert "data" in lineage and logged in lineage
    assert json.loads(ok("--root", str(fresh), "remote", "list", "--json").output) == {
        "origin": f"file://{remote}"}  # a pull into a new store names its source origin
    status = json.loads(ok("status", "--json", *root).output)
    assert status == {"origin": {"url": f"file://{remote}", "pending": [], "unpushed": 0}}
    assert "up to date" in ok("--root", str(fresh), "pull").output


def test_push_one_key_and_one_run(logged: str, store_root: Path, tmp_path: Path) -> None:
    remote = tmp_path / "remote"
    root = ("--root", str(store_root))
    ok("remote", "add", "origin", str(remote), *root)
    report = json.loads(ok("push", "origin", "data:v1", "--json", *root).output)
    assert report["versions"] == ["default/data:v1"]  # data has no parents
    report = json.loads(ok("push", "--run", logged[:6], "--json", *root).output)
    assert report["versions"] == ["default/model:v1"] and report["runs"] == [logged]


def test_bad_input_is_one_line(logged: str, store_root: Path, tmp_path: Path) -> None:
    root = ("--root", str(store_root))
    one_line_error(cli("push", *root), "no remote given")
    ok("remote", "add", "origin", str(tmp_path / "r"), *root)
    one_line_error(cli("push", "model", "--run", logged, *root), "one of")
    one_line_error(cli("push", "nosuch", "nope:v1", *root), "no remote named")
    one_line_error(cli("push", "nope:v1", *root), "nope")
    one_line_error(cli("pull", "origin", "model:v1", *root), "not on")
    one_line_error(cli("--root", str(tmp_path / "new"), "pull", "origin"), "no named remotes")
    assert not (tmp_path / "new").exists()


def test_push_and_pull_draw_a_bytes_bar_on_a_terminal(
        logged: str, store_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from repro_core import _progress

    buffer = io.StringIO()
    monkeypatch.setattr(_progress, "_stderr_console",
                        lambda: Console(file=buffer, force_terminal=True, width=100))
    root = ("--root", str(store_root))
    ok("remote", "add", "origin", str(tmp_path / "remote"), *root)
    ok("push", *root)
    assert "push → origin" in buffer.getvalue() and "bytes" in buffer.getvalue()
    ok("--root", str(tmp_path / "fresh"), "pull", str(tmp_path / "remote"))
    assert "pull ← origin" in buffer.getvalue()
    buffer.truncate(0)
    ok("push", "--json", *root)  # --json: a report for scripts, no bar
    assert buffer.getvalue().strip("\x00") == ""
