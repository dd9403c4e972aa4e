"""Every command keeps the CLI's promise on bad input: exit 2, exactly one line on stderr
starting ``repro: error:``, no traceback — and no command but ``init`` ever creates a store."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from repro_core import ArtifactManager
from repro_core.cli import main
from repro_core.registry import Registry, RunRow
from repro_core.types import utc_now

# Two runs share the prefix "abcd": "abcd" is ambiguous, "abcd0000000" is not.
_TWINS = ("abcd00000001", "abcd00000002")


@pytest.fixture
def store(manager: ArtifactManager, store_root: Path) -> dict[str, str]:
    run = manager.init_run("train")
    manager.log_artifact("model", "model", data=b"w" * 64)
    manager.finalize_run()
    ArtifactManager.reset_instance()  # close every connection (some tests damage the file)
    registry = Registry(store_root / "registry.sqlite")
    for twin in _TWINS:
        registry.create_run(RunRow(id=twin, name="twin", project="default", state="completed",
                                   tags=[], config={}, created_at=utc_now(), ended_at=None,
                                   host=None, pid=None, world_size=None))
    registry.close()
    assert run.id is not None
    return {"run": run.id}


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result: Result, *needles: str, typed: bool = True) -> None:
    """Exit 2, one ``repro: error:`` line; ``typed``: from a ReproError or click, not the
    boundary's catch-all for exceptions nobody expected."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert not typed or "unexpected" not in result.stderr, result.stderr
    assert result.stdout == "", result.stdout
    assert result.stderr.startswith("repro: error:"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


BAD_INPUT = [
    (("show", "ffff99"), "no run with id"),
    (("show", "abc"), "at least 4"),
    (("show", "abcd"), "ambiguous"),
    (("diff", "{run}", "abcd"), "ambiguous"),
    (("diff", "ffff99", "{run}"), "no run with id"),
    (("updates", "abcd"), "ambiguous"),
    (("updates", "{run}", "--checkpoint", "nope"), "nope"),
    (("updates", "{run}", "--checkpoint", "model"), "checkpoint"),
    (("verify", "--run", "abcd"), "ambiguous"),
    (("verify", "--run", "ffff99"), "no run with id"),
    (("verify", "nope:v1"), "nope"),
    (("verify", "../x"), "name"),
    (("verify", "model", "--run", "{run}"), "one of"),
    (("verify", "model", "--all"), "one of"),
    (("artifacts", "nope"), "no artifact named"),
    (("artifacts", "../x"), "name"),
    (("artifacts", "--project", "a/b"), "project"),
    (("lineage", "nope"), "nope"),
    (("lineage", "run:abcd"), "ambiguous"),
    (("lineage", "model", "--up", "--down"), "--up and --down"),
    (("lineage", "model", "-o", "/nonexistent-dir/x.svg"), "does not exist"),
    (("lineage", "model", "--format", "svg", "-o", "{root}"), "is a directory"),
    (("lineage", "model", "--depth", "-1"), "--depth"),
    (("lineage", "model", "--format", "png"), "--format"),
    (("gc", "--grace", "nan"), "--grace"),
    (("runs", "--bogus"), "--bogus"),
    (("show",), "RUN"),
    (("nosuchcommand",), "nosuchcommand"),
    (("recover",), "--force"),
    (("init", "--hash", "md5"), "md5"),
]


@pytest.mark.parametrize(("args", "needle"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2(store: dict[str, str], store_root: Path,
                                      args: tuple[str, ...], needle: str) -> None:
    filled = [a.format(run=store["run"], root=store_root) for a in args]
    result = cli(*filled, "--root", str(store_root))
    assert_one_line_error(result, needle)


# (command, needs a run id) for every command that reads a store
READERS = [("runs",), ("show", "{run}"), ("artifacts",), ("lineage", "model"),
           ("diff", "{run}", "{run}"), ("updates", "{run}"), ("verify",),
           ("verify", "model"), ("verify", "--run", "{run}"), ("gc",), ("du",),
           ("report", "{run}"),
           ("gc", "--delete", "--grace", "0"), ("remote", "list"),
           ("remote", "add", "origin", "s3://bucket/prefix"), ("push",), ("push", "model"),
           ("pull",), ("pull", "origin"), ("status",), ("migrate", "--to", "sqlite"),
           ("migrate", "--to", "postgresql://u@127.0.0.1:1/db"), ("db", "upgrade")]


@pytest.mark.parametrize("args", [*READERS, ("recover",), ("recover", "--force")],
                         ids=lambda a: " ".join(a))
def test_no_command_creates_a_store(tmp_path: Path, args: tuple[str, ...]) -> None:
    """Against an empty directory and a missing one: one line, and nothing is created."""
    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.mkdir()
    for root in (empty, missing):
        filled = [a.format(run="0123456789ab") for a in args]
        assert_one_line_error(cli(*filled, "--root", str(root)), str(root))
    assert list(empty.iterdir()) == [] and not missing.exists()


def test_every_command_but_init_is_checked_above() -> None:
    """A new command joins READERS (or the recover cases), or this fails: only `init` may
    create a store."""
    assert {args[0] for args in READERS} | {"recover"} == set(main.commands) - {"init"}


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:3000])


def _no_tables(path: Path) -> None:
    path.unlink()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE unrelated (x)")
    conn.close()


def _sql(statement: str) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        conn = sqlite3.connect(path)
        with conn:
            conn.execute(statement)
        conn.close()
    return damage


DAMAGES: dict[str, tuple[Callable[[Path], None], list[tuple[str, ...]]]] = {
    "garbage": (_garbage, [*READERS]),
    "truncated": (_truncated, [*READERS]),
    "version-json": (_sql("UPDATE versions SET metadata = '{not json'"),
                     [("verify",), ("artifacts",), ("show", "{run}"), ("lineage", "model")]),
    "version-int": (_sql("UPDATE versions SET size = 'big', version = 'x'"),
                    [("verify",), ("artifacts",), ("verify", "--run", "{run}")]),
    "run-json": (_sql("UPDATE runs SET config = '[[['"), [("runs",), ("show", "{run}")]),
    "blob-size": (_sql("UPDATE version_blobs SET size = 'abc'"), [("verify",), ("gc",)]),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_malformed_registry_is_one_line(store: dict[str, str], store_root: Path,
                                        damage: str) -> None:
    """verify and gc printed a 51-line traceback (exit 1) on these. (gc reads only digests, so
    forged columns it never reads do not stop it.)"""
    registry = store_root / "registry.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{registry}{suffix}").unlink(missing_ok=True)
    spoil, commands = DAMAGES[damage]
    spoil(registry)
    for args in commands:
        filled = [a.format(run=store["run"]) for a in args]
        assert_one_line_error(cli(*filled, "--root", str(store_root)))


def test_registry_without_our_tables_is_damaged(store: dict[str, str],
                                                store_root: Path) -> None:
    registry = store_root / "registry.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(f"{registry}{suffix}").unlink(missing_ok=True)
    _no_tables(registry)
    for args in (("runs",), ("artifacts",), ("verify",), ("gc", "--delete", "--grace", "0")):
        assert_one_line_error(cli(*args, "--root", str(store_root)), "repro recover")


def test_debug_shows_the_traceback(store: dict[str, str], store_root: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Registry) -> list[tuple[str, int | None]]:
        raise ValueError("a bug, not bad input")

    monkeypatch.setattr(Registry, "blob_references", broken)  # an unexpected error
    quiet = cli("verify", "--root", str(store_root))
    assert_one_line_error(quiet, "--debug", typed=False)
    loud = cli("--debug", "verify", "--root", str(store_root))
    assert loud.exit_code == 1 and type(loud.exception) is ValueError
    assert str(loud.exception) == "a bug, not bad input"


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "repro_core.cli", *args], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def _assert_one_line(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith("repro: error:") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert all(n in proc.stderr for n in needles), proc.stderr


def test_subprocess_bad_input(store: dict[str, str], store_root: Path, tmp_path: Path) -> None:
    """The real process: what a shell script sees."""
    root = ["--root", str(store_root)]
    _assert_one_line(_run_cli("show", "abcd", *root), "ambiguous")
    _assert_one_line(_run_cli("lineage", "model", "-o", str(tmp_path / "no" / "x.svg"), *root))
    _assert_one_line(_run_cli("runs", "--root", str(tmp_path / "nowhere")), "no repro store")
    _garbage(store_root / "registry.sqlite")
    for command in ("verify", "gc"):
        _assert_one_line(_run_cli(command, *root), "repro recover")


@pytest.mark.parametrize(("variable", "value"), [("REPRO_HASH", "md5"), ("REPRO_VERIFY", "x"),
                                                 ("REPRO_BARRIER_TIMEOUT", "abc"),
                                                 ("REPRO_PROGRESS", "maybe")])
def test_bad_setting_is_one_line_naming_it(store: dict[str, str], store_root: Path,
                                           variable: str, value: str) -> None:
    proc = _run_cli("runs", "--root", str(store_root), env={variable: value})
    _assert_one_line(proc, variable, value)


def test_benchmark_missing_dir_is_one_line(tmp_path: Path) -> None:
    """`hash_throughput.py --dir /missing` died in tempfile.mkdtemp with a traceback."""
    script = Path(__file__).parent.parent / "benchmarks" / "hash_throughput.py"
    proc = subprocess.run([sys.executable, str(script), "--dir", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--dir" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "missing").exists()
