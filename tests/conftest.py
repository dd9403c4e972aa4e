"""Shared fixtures: every test gets a fresh ArtifactManager on a store under tmp_path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from repro_core import ArtifactManager


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def manager(store_root: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ArtifactManager]:
    """A fresh singleton pointed at an empty store; any run left active is abandoned after."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    mgr = ArtifactManager.reset_instance()
    mgr.set_root(store_root)
    yield mgr
    ArtifactManager.reset_instance()


@pytest.fixture
def run(manager: ArtifactManager):  # type: ignore[no-untyped-def]
    """An active run on the fresh store."""
    return manager.init_run("test-run", config={"lr": 0.1})
