"""Keeps Lightning's vendored tests (``tests_pytorch/``) out of a plain ``pytest tests`` run.

They run only through ``test_upstream_with_repro.py``, in subprocesses, once per
``REPRO_UPSTREAM_CALLBACK`` mode. Naming that folder (or a file or test in it) on the command
line collects it directly, e.g.
``REPRO_UPSTREAM_CALLBACK=torch pytest tests/lightning_upstream/tests_pytorch -p no:cacheprovider``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

VENDORED = Path(__file__).resolve().parent / "tests_pytorch"


def _named_on_command_line(config: pytest.Config) -> bool:
    base = Path(config.invocation_params.dir)
    for arg in config.args:
        target = (base / arg.split("::", 1)[0]).resolve()
        if target == VENDORED or VENDORED in target.parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.resolve() == VENDORED and not _named_on_command_line(config):
        return True
    return None
