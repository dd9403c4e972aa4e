"""``ReproCallback`` under DDP: two CPU processes on gloo, started the way Lightning does.

``tests/lightning_scripts/train.py --devices 2`` builds ``Trainer(accelerator="cpu",
devices=2, strategy="ddp")``; Lightning's subprocess launcher re-runs the script for rank 1.
Each rank records its process id, its view of the run and every ``sqlite3.connect`` it made.
The same script with ``--devices 1`` is the reference for what should be saved.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lightning_scripts import launch

from repro_core import ArtifactManager, RunState
from repro_core.registry import Registry

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

BARRIER_TIMEOUT = 20  # REPRO_BARRIER_TIMEOUT given to every rank
STARTUP = 40.0  # starting two interpreters that import torch + Lightning, on a busy 2-core box
JOB_TIMEOUT = 2 * BARRIER_TIMEOUT + STARTUP
PROJECT = "lit"


@dataclass
class Jobs:
    root: Path
    single: launch.Fit
    ddp: launch.Fit

    def store(self, name: str) -> Path:
        return self.root / name / "store"


def _job(root: Path, name: str, *args: str) -> tuple[Path, Path, str, list[str]]:
    return (root / name / "out", root / name / "store", name,
            ["--ckpt-dir", str(root / name / "ckpt"), "--max-steps", "4", "--every", "2",
             *args])


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Jobs]:
    root = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REPRO_BARRIER_TIMEOUT", str(BARRIER_TIMEOUT))
        single, ddp = launch.run_together([_job(root, "single", "--devices", "1"),
                                           _job(root, "ddp", "--devices", "2")],
                                          timeout=JOB_TIMEOUT + 60)
    yield Jobs(root, single.check(), ddp.check())


def _runs(store: Path) -> list[tuple[str, str]]:
    registry = Registry(store / "registry.sqlite", readonly=True)
    try:
        return [(r.id, r.state) for r in registry.list_runs()]
    finally:
        registry.close()


StoreReader = Callable[[Path], ArtifactManager]


@pytest.fixture
def read_store() -> Iterator[StoreReader]:
    def open_store(store: Path) -> ArtifactManager:
        manager = ArtifactManager.reset_instance()
        manager.set_root(store)
        return manager

    yield open_store
    ArtifactManager.reset_instance()


def test_one_run_every_rank_knows_and_only_rank_zero_writes(jobs: Jobs,
                                                            read_store: StoreReader) -> None:
    run_id = jobs.ddp.result(0)["run_id"]
    assert run_id and jobs.ddp.result(1)["run_id"] == run_id
    assert _runs(jobs.store("ddp")) == [(run_id, RunState.COMPLETED.value)]
    manager = read_store(jobs.store("ddp"))
    logged = manager.list_artifacts(f"{PROJECT}/checkpoint")
    assert logged and {m.run_id for m in logged} == {run_id}
    assert {m.run_id for m in manager.list_artifacts()} == {run_id}
    # rank 1 never opened the registry to write (it asks rank 0 for everything)
    writes = [c for c in jobs.ddp.result(1)["registry_connections"] if not c["readonly"]]
    assert writes == []
    assert any(not c["readonly"] for c in jobs.ddp.result(0)["registry_connections"])
    assert jobs.ddp.result(0)["global_step"] == jobs.ddp.result(1)["global_step"] == 4


def test_ddp_saves_the_same_checkpoint_versions_as_one_process(jobs: Jobs,
                                                               read_store: StoreReader) -> None:
    def saved(name: str) -> list[tuple[str, int, list[str]]]:
        manager = read_store(jobs.store(name))
        found = sorted(manager.list_artifacts(f"{PROJECT}/checkpoint"),
                       key=lambda m: int(m.version[1:]))
        return [(m.metadata["filename"], m.metadata["global_step"], sorted(m.aliases))
                for m in found]

    single = saved("single")
    assert [f for f, _, _ in single] == ["step=2.ckpt", "last.ckpt", "step=4.ckpt", "last.ckpt"]
    assert saved("ddp") == single
    assert sorted(p.name for p in (jobs.root / "ddp" / "ckpt").iterdir()) == \
        sorted(p.name for p in (jobs.root / "single" / "ckpt").iterdir())


def test_ddp_finishes_without_hanging(jobs: Jobs) -> None:
    assert jobs.ddp.seconds < JOB_TIMEOUT
    out = jobs.root / "ddp" / "out"
    for rank in (0, 1):
        assert launch.wait_gone(launch.pid_of(out, "ddp", rank), 10.0), rank


def test_a_rank_failing_fails_the_run_and_every_rank_exits(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv("REPRO_BARRIER_TIMEOUT", str(BARRIER_TIMEOUT))
    out, store, tag, args = _job(tmp_path, "failing", "--devices", "2", "--max-steps", "8",
                                 "--fail-at-step", "3", "--fail-rank", "1")
    fit = launch.run(out, store, tag, *args, timeout=JOB_TIMEOUT)
    assert fit.returncode != 0
    assert "boom at step 3 on rank 1" in fit.log
    left = JOB_TIMEOUT - fit.seconds
    assert launch.wait_gone(launch.pid_of(out, tag, 1), max(left, 1.0)), "rank 1 still running"
    runs = _runs(store)
    assert len(runs) == 1 and runs[0][1] == RunState.FAILED.value
    assert not (out / f"{tag}.rank0.json").exists()  # fit raised on rank 0 too
