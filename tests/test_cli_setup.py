"""`repro init` and `repro recover`: the only commands that write a registry, and never over
one they would lose (an old registry is moved aside with its WAL, never deleted)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from repro_core import ArtifactManager
from repro_core.cli import main
from repro_core.errors import StorageError
from repro_core.registry import Registry


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def logged(manager: ArtifactManager, store_root: Path) -> Path:
    """A store with one run and one artifact, every connection closed."""
    manager.init_run("train", project="vision")
    manager.log_artifact("model", "model", data=b"weights")
    manager.finalize_run()
    ArtifactManager.reset_instance()
    return store_root / "registry.sqlite"


def _backups(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("registry.sqlite.bak-*"))


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_init_creates_an_empty_store(tmp_path: Path, algorithm: str) -> None:
    root = tmp_path / "new"
    result = cli("init", "--root", str(root), "--hash", algorithm)
    assert result.exit_code == 0 and "initialized" in result.stdout
    assert (root / "CACHEDIR.TAG").is_file() and (root / "tmp").is_dir()
    assert (root / "blobs" / algorithm).is_dir()
    registry = Registry(root / "registry.sqlite", readonly=True)
    assert registry.hash_algorithm() == algorithm and registry.list_runs() == []
    registry.close()
    assert json.loads(cli("runs", "--root", str(root), "--json").stdout) == []
    before = (root / "registry.sqlite").read_bytes()
    again = cli("init", "--root", str(root), "--force")
    assert again.exit_code == 0 and "already a repro store" in again.stdout
    assert (root / "registry.sqlite").read_bytes() == before and _backups(root) == []


def test_init_refuses_a_store_that_lost_its_registry(logged: Path) -> None:
    root = logged.parent
    for suffix in ("", "-wal", "-shm"):
        Path(f"{logged}{suffix}").unlink(missing_ok=True)
    refused = cli("init", "--root", str(root))
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert "repro recover" in refused.stderr and "--force" in refused.stderr
    assert not logged.exists()
    forced = cli("init", "--root", str(root), "--force")
    assert forced.exit_code == 0 and logged.is_file()


def test_init_force_moves_a_damaged_registry_aside(logged: Path) -> None:
    root = logged.parent
    for suffix in ("-wal", "-shm"):
        Path(f"{logged}{suffix}").unlink(missing_ok=True)
    logged.write_bytes(b"not sqlite" * 100)
    assert cli("init", "--root", str(root)).exit_code == 2
    forced = cli("init", "--root", str(root), "--force")
    assert forced.exit_code == 0 and "kept at" in forced.stdout
    (backup,) = _backups(root)
    assert (root / backup).read_bytes() == b"not sqlite" * 100
    assert json.loads(cli("runs", "--root", str(root), "--json").stdout) == []


def test_recover_rebuilds_a_lost_registry(logged: Path) -> None:
    root = logged.parent
    for suffix in ("", "-wal", "-shm"):
        Path(f"{logged}{suffix}").unlink(missing_ok=True)
    assert cli("runs", "--root", str(root)).exit_code == 2  # lost: says `repro recover`
    (root / "runs" / "not.a.run").mkdir()  # (run ids: letters, digits, _ and -)
    result = cli("recover", "--root", str(root))
    assert result.exit_code == 0, result.output
    assert "1 run(s), 1 version(s)" in result.stdout and "1 problem(s):" in result.stdout
    assert "  - skipped runs/'not.a.run'" in result.stdout and "not recoverable:" in result.stdout
    runs = json.loads(cli("runs", "--root", str(root), "--json").stdout)
    assert [(r["name"], r["project"]) for r in runs] == [("train", "vision")]


def test_recover_refuses_a_readable_registry_unless_forced(logged: Path) -> None:
    root = logged.parent
    refused = cli("recover", "--root", str(root))
    assert refused.exit_code == 2 and "--force" in refused.stderr
    assert _backups(root) == []
    Path(f"{logged}-wal").write_bytes(b"stale WAL of the old registry")
    forced = cli("recover", "--root", str(root), "--force", "--json")
    assert forced.exit_code == 0, forced.output
    report = json.loads(forced.stdout)
    assert (report["runs"], report["versions"], report["problems"]) == (1, 1, [])
    backup = Path(report["moved_aside"])
    assert backup.is_file() and Path(f"{backup}-wal").read_bytes().startswith(b"stale WAL")
    assert not Path(f"{logged}-wal").exists() or b"stale" not in Path(f"{logged}-wal").read_bytes()
    assert json.loads(cli("runs", "--root", str(root), "--json").stdout)[0]["name"] == "train"


def test_recover_moves_a_damaged_registry_aside(logged: Path) -> None:
    root = logged.parent
    for suffix in ("-wal", "-shm"):
        Path(f"{logged}{suffix}").unlink(missing_ok=True)
    logged.write_bytes(b"\x00garbage" * 512)
    result = cli("recover", "--root", str(root))
    assert result.exit_code == 0 and "the old registry is kept at" in result.stdout
    (backup,) = _backups(root)
    assert (root / backup).read_bytes() == b"\x00garbage" * 512


def test_failed_recovery_puts_the_old_registry_back(logged: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import repro_core.recover

    def broken(root: object) -> None:
        raise StorageError("disk full while rebuilding")

    monkeypatch.setattr(repro_core.recover, "recover_store", broken)
    before = logged.read_bytes()
    result = cli("recover", "--root", str(logged.parent), "--force")
    assert result.exit_code == 2 and "disk full" in result.stderr
    assert logged.read_bytes() == before and _backups(logged.parent) == []


def test_init_and_recover_messages_are_one_line(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store should be")
    for args in (("init",), ("recover",)):
        result = cli(*args, "--root", str(blocked))
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert "Traceback" not in result.stderr and "unexpected" not in result.stderr
    assert os.path.isfile(blocked)
