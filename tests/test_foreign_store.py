"""A store written by someone else: planted symlinks, forged columns and terminal escapes are
refused or shown harmlessly; nothing outside the store is deleted, renamed or written."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from repro_core import ArtifactManager, IntegrityError, collect_garbage
from repro_core.cli import main


def _tree(path: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(path)): (p.lstat().st_size, p.lstat().st_mtime)
            for p in sorted(path.rglob("*"))}


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A user's directory next to the store, with an old file a sweep would take as stale."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    (home / "train_log.jsonl").write_text('{"my": "log"}\n')
    old = home / ".old.tmp"
    old.write_text("x")
    os.utime(old, (time.time() - 5 * 86400,) * 2)
    return home


@pytest.fixture
def populated(manager: ArtifactManager, store_root: Path) -> Path:
    manager.init_run("r")
    manager.log_artifact("ds", "dataset", data=b"data")
    manager.finalize_run()
    ArtifactManager.reset_instance()
    return store_root


def _plant(store: Path, name: str, target: Path) -> None:
    path = store / name
    if path.is_dir() and not path.is_symlink():
        for child in sorted(path.rglob("*"), reverse=True):
            child.chmod(0o700) if child.is_dir() else child.unlink()
            if child.is_dir():
                child.rmdir()
        path.rmdir()
    path.symlink_to(target, target_is_directory=True)


def _reopen(store: Path) -> Callable[[], object]:
    def run() -> object:
        manager = ArtifactManager.reset_instance()
        manager.init_run("again", root=store)
        return manager.finalize_run()
    return run


@pytest.mark.parametrize("planted", ["tmp", "spill", "runs", "cache"])
def test_a_planted_directory_link_is_refused_and_its_target_untouched(
        populated: Path, victim: Path, planted: str) -> None:
    _plant(populated, planted, victim)
    before = _tree(victim)
    with pytest.raises(IntegrityError, match="symlink or not a directory"):
        _reopen(populated)()
    assert _tree(victim) == before
    result = CliRunner().invoke(main, ["gc", "--delete", "--grace", "0", "--root",
                                       str(populated)])
    assert _tree(victim) == before, result.output
    ArtifactManager.reset_instance()


def test_a_planted_blob_shard_link_is_never_deleted_through(populated: Path,
                                                           victim: Path) -> None:
    """``blobs/blake3/aa -> /elsewhere`` holding a file named like a blob: gc must neither list
    nor delete it, and writers refuse the store."""
    (victim / ("b" * 62)).write_text("not a blob")
    os.utime(victim / ("b" * 62), (time.time() - 86400 * 30,) * 2)
    shard = populated / "blobs" / "blake3" / "aa"
    shard.rmdir()
    shard.symlink_to(victim, target_is_directory=True)
    before = _tree(victim)
    report = collect_garbage(populated, dry_run=True, grace_seconds=0)
    assert all(not d.startswith("blake3:aa") for d in report.blobs)  # never listed
    with pytest.raises(IntegrityError, match="symlink"):  # deleting: the store is refused
        collect_garbage(populated, dry_run=False, grace_seconds=0)
    assert _tree(victim) == before
    with pytest.raises(IntegrityError, match="symlink"):
        _reopen(populated)()
    ArtifactManager.reset_instance()


def test_lineage_output_into_the_store_is_refused(populated: Path) -> None:
    registry = populated / "registry.sqlite"
    before = registry.read_bytes()
    result = CliRunner().invoke(main, ["lineage", "ds:v1", "--format", "svg", "-o",
                                       str(registry), "--root", str(populated)])
    assert result.exit_code == 2 and "inside the store" in result.stderr
    assert registry.read_bytes() == before


def test_lineage_format_follows_the_output_extension(populated: Path, tmp_path: Path) -> None:
    out = tmp_path / "graph.dot"
    result = CliRunner().invoke(main, ["lineage", "ds:v1", "-o", str(out), "--root",
                                       str(populated)])
    assert result.exit_code == 0 and out.read_text().startswith("digraph lineage {")


def _forge(store: Path, sql: str) -> None:
    conn = sqlite3.connect(store / "registry.sqlite")
    conn.execute(sql)
    conn.commit()
    conn.close()


@pytest.mark.parametrize("sql", [
    "UPDATE versions SET metadata = '[1, 2]'",
    "UPDATE versions SET version = 'v1'",
    "UPDATE artifacts SET type = 'weird'",
    "UPDATE aliases SET alias = '../x'",
    "UPDATE runs SET created_at = 'yesterday'",
])
def test_forged_columns_are_integrity_errors(populated: Path, sql: str) -> None:
    _forge(populated, sql)
    manager = ArtifactManager.reset_instance()
    manager.set_root(populated)
    with pytest.raises(IntegrityError):
        manager.list_artifacts() if "runs" not in sql else manager.get_run(
            manager.registry().list_runs()[0].id)
    ArtifactManager.reset_instance()
    for command in (["artifacts"], ["runs"], ["lineage", "default/ds:v1"]):
        result = CliRunner().invoke(main, [*command, "--root", str(populated)])
        assert result.exit_code in (0, 2), result.output
        if result.exit_code == 2:
            assert result.stderr.count("\n") == 1 and "unexpected" not in result.stderr


def test_terminal_escapes_in_a_foreign_store_are_shown_not_obeyed(populated: Path) -> None:
    _forge(populated, "UPDATE runs SET name = 'ok' || char(27) || ']0;PWNED' || char(7) ||"
                      " char(10) || 'forged row'")
    run_id = sqlite3.connect(populated / "registry.sqlite").execute(
        "SELECT id FROM runs").fetchone()[0]
    for command in (["runs"], ["show", run_id]):
        result = CliRunner().invoke(main, [*command, "--root", str(populated)])
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\x07" not in result.output
        assert "\\x1b]0;PWNED" in result.output


@pytest.mark.parametrize("name", ["ok\x1b]0;PWNED\x07", "two\nlines", "tab\there"])
def test_control_characters_in_run_names_are_refused(manager: ArtifactManager,
                                                     name: str) -> None:
    from repro_core import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="printable"):
        manager.init_run(name)
