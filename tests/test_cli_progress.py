"""Progress bars (`repro_core._progress`): drawn on a terminal, never in logs or pipes, off with
REPRO_PROGRESS=0, and `repro verify` / `repro gc` use them."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from repro_core import ArtifactManager, _progress, constants
from repro_core.cli import main


def _terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=100), buffer


def test_bar_is_drawn_on_a_terminal() -> None:
    console, buffer = _terminal()
    with _progress.progress(3 << 30, "hashing", console=console) as advance:
        assert advance is not _progress._noop
        for _ in range(3):
            advance(1 << 30)
    drawn = buffer.getvalue()
    assert "hashing" in drawn and "GB" in drawn  # description, bytes done / total


@pytest.mark.parametrize("total", [None, 10])
def test_items_and_unknown_totals(total: int | None) -> None:
    console, buffer = _terminal()
    with _progress.progress(total, "scanning", min_total=0, unit="items",
                            console=console) as advance:
        advance(1)
    assert "scanning" in buffer.getvalue()


def test_off_with_repro_progress_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "REPRO_PROGRESS", False)
    console, buffer = _terminal()
    with _progress.progress(1 << 40, "hashing", console=console) as advance:
        advance(1 << 40)
    assert advance is _progress._noop and buffer.getvalue() == ""


def test_off_when_stderr_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = io.StringIO()  # isatty() is False, as for a log file or a CI job
    monkeypatch.setattr(sys, "stderr", fake)
    with _progress.progress(1 << 40, "hashing") as advance:
        advance(1 << 40)
    assert advance is _progress._noop and fake.getvalue() == ""


def test_off_below_the_threshold() -> None:
    """Library callers get no bar for small work (it would only flicker)."""
    console, buffer = _terminal()
    with _progress.progress(_progress.MIN_TOTAL - 1, "hashing", console=console) as advance:
        advance(1)
    assert advance is _progress._noop and buffer.getvalue() == ""


@pytest.fixture
def stored(manager: ArtifactManager, store_root: Path) -> list[str]:
    manager.init_run("train")
    manager.log_artifact("model", "model", data=b"w" * 4096)
    manager.finalize_run()
    return ["--root", str(store_root)]


@pytest.mark.parametrize("command", [["verify"], ["gc"]])
def test_cli_shows_a_bar_on_a_terminal(stored: list[str], command: list[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    console, buffer = _terminal()
    monkeypatch.setattr(_progress, "_stderr_console", lambda: console)
    result = CliRunner().invoke(main, [*command, *stored])
    assert result.exit_code == 0, result.output
    assert command[0] in buffer.getvalue()
    monkeypatch.setattr(constants, "REPRO_PROGRESS", False)
    quiet, quiet_buffer = _terminal()
    monkeypatch.setattr(_progress, "_stderr_console", lambda: quiet)
    assert CliRunner().invoke(main, [*command, *stored]).exit_code == 0
    assert quiet_buffer.getvalue() == ""


def test_cli_draws_nothing_when_piped(stored: list[str]) -> None:
    """CliRunner's stderr is not a terminal: stdout and stderr carry only the report."""
    result = CliRunner().invoke(main, ["verify", *stored])
    assert result.exit_code == 0 and result.stderr == ""
    assert result.stdout.strip().endswith("verified: OK")


def test_logging_and_checking_a_big_file_show_bytes(manager: ArtifactManager, run: object,
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`log_artifact` of a multi-GB file and `use_artifact` (which re-hashes it) report the
    bytes they have done; small files draw nothing (the threshold is lowered here so the
    test does not need gigabytes)."""
    big = tmp_path / "weights.bin"
    big.write_bytes(b"\x01" * (3 << 20))
    console, buffer = _terminal()
    monkeypatch.setattr(_progress, "_stderr_console", lambda: console)
    monkeypatch.setattr(_progress, "MIN_TOTAL", 1 << 20)
    meta = manager.log_artifact("weights", "model", file_path=big)
    logged = buffer.getvalue()
    assert "logging weights.bin" in logged and "3.1 MB" in logged
    buffer.truncate(0)
    buffer.seek(0)
    manager.use_artifact(meta.key)
    assert f"checking {meta.key}" in buffer.getvalue()
    monkeypatch.setattr(_progress, "MIN_TOTAL", 16 << 20)
    buffer.truncate(0)
    buffer.seek(0)
    manager.use_artifact(meta.key)
    assert buffer.getvalue() == ""
