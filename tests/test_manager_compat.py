"""The manager keeps the original's promises and gives typed errors for what slipped through
(issue 8 items 4 and 12, issue 9 "original ArtifactManager" and "one config path")."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repro_core import (
    ArtifactManager,
    ExperimentContext,
    InvalidArgumentError,
    InvalidNameError,
    LocalStorageBackend,
    RunState,
    checkpoint,
    constants,
)
from repro_core.errors import ReproError


def test_read_only_state_of_the_original_manager(manager: ArtifactManager,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPRO_OFFLINE", "1")
    constants.reload()
    assert (manager.run, manager.run_id, manager.run_state) == (None, None, None)
    assert manager.offline_mode is True
    assert (manager.rank, manager.world_size, manager.is_distributed) == (0, 1, False)
    assert isinstance(manager.storage_backend, LocalStorageBackend)
    assert manager.storage_backend.root == manager.root
    run = manager.init_run("r", config={"_repro": {"offline": False}})
    assert manager.run is run and manager.run_id == run.id
    assert manager.run_state is RunState.RUNNING
    assert manager.offline_mode is False  # what the run recorded wins
    manager.set_run_state("failed")
    assert manager.run_state is RunState.FAILED
    for name in ("run", "run_id", "run_state", "offline_mode", "rank", "world_size",
                 "is_distributed", "storage_backend"):
        with pytest.raises(AttributeError):
            setattr(manager, name, None)
    manager.finalize_run()
    constants.reload()


def test_init_run_config_takes_the_same_path_as_the_context(manager: ArtifactManager,
                                                           store_root: Path) -> None:
    config = {"data": Path("/data/train"), "loss_floor": float("nan"),
              "api_key": "sk-live-123", "db": "postgresql://bob:hunter2@db/x", "lr": 0.1}
    direct = manager.init_run("direct", config=config)
    manager.finalize_run()
    with ExperimentContext(config=config, name="ctx", root=store_root, monitor_hardware=False,
                           capture_level=1) as ctx:
        pass
    stored_direct = manager.get_run(direct.id or "")["config"]
    assert ctx.run is not None
    stored_ctx = manager.get_run(ctx.run.id or "")["config"]
    stored_ctx.pop("_repro")
    assert stored_direct == stored_ctx
    assert stored_direct["data"] == "/data/train" and stored_direct["loss_floor"] == "nan"
    assert stored_direct["api_key"] == "<redacted>" and "hunter2" not in stored_direct["db"]
    exported = (store_root / "runs" / (direct.id or "") / "config.json").read_text()
    assert "sk-live-123" not in exported and "hunter2" not in exported


@pytest.mark.parametrize("bad", ["bad\ud800name", "nul\x00", "", "x" * 300])
def test_run_names_that_sql_text_cannot_hold_are_refused(manager: ArtifactManager,
                                                         bad: str) -> None:
    with pytest.raises(InvalidArgumentError):
        manager.init_run(bad)
    with pytest.raises(InvalidArgumentError):
        manager.init_run("ok", tags=[bad])
    assert manager.current_run is None and not (manager.root / "registry.sqlite").exists()


@pytest.mark.parametrize("key", ["ab:v99999999999999999999", "ab:99999999999999999999",
                                 "ab:v9223372036854775808"])
def test_huge_version_numbers_are_a_typed_error(manager: ArtifactManager, run: object,
                                                key: str) -> None:
    manager.log_artifact("ab", "dataset", data=b"x")
    with pytest.raises(InvalidNameError, match="versions are numbered"):
        manager.use_artifact(key)
    assert manager.use_artifact("ab:v1").version == "v1"  # and nothing else broke


@pytest.mark.parametrize(("var", "value"), [("REPRO_HASH", "md5"), ("REPRO_VERIFY", "always"),
                                            ("REPRO_BARRIER_TIMEOUT", "soon"),
                                            ("REPRO_BARRIER_TIMEOUT", "-1"),
                                            ("REPRO_FSYNC", "sometimes"),
                                            ("REPRO_STALE_TMP_SECONDS", "nan"),
                                            ("REPRO_PROGRESS", "maybe")])
def test_bad_settings_fail_at_first_use_naming_the_variable(var: str, value: str,
                                                            tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", var: value}
    imported = subprocess.run([sys.executable, "-c", "import repro_core"], env=env,
                              capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr  # importing never fails on a setting
    used = subprocess.run(
        [sys.executable, "-c", f"from repro_core import constants; constants.{var}"],
        env=env, capture_output=True, text=True)
    assert used.returncode == 1 and f"{var}={value!r}" in used.stderr
    assert "InvalidArgumentError" in used.stderr
    # `repro init` reads every store setting: one line naming the variable, no traceback.
    cli = subprocess.run([sys.executable, "-m", "repro_core.cli", "init", "--root",
                          str(tmp_path / "s")], env=env, capture_output=True, text=True)
    if var in ("REPRO_HASH", "REPRO_FSYNC", "REPRO_STALE_TMP_SECONDS"):
        assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and var in cli.stderr, \
            cli.stderr


def test_settings_parse_and_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPRO_BARRIER_TIMEOUT", "2.5")
    monkeypatch.setenv("REPRO_VERIFY", " SIZE ")
    monkeypatch.setenv("REPRO_PROGRESS", "0")
    constants.reload()
    try:
        assert constants.REPRO_BARRIER_TIMEOUT == 2.5
        assert constants.REPRO_VERIFY == "size" and constants.REPRO_PROGRESS is False
    finally:
        monkeypatch.undo()
        constants.reload()
    assert constants.REPRO_VERIFY == "full" and math.isclose(constants.REPRO_BARRIER_TIMEOUT,
                                                             300.0)


class _Frozen(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)


def test_same_checkpoint_twice_returns_the_existing_version(manager: ArtifactManager,
                                                            store_root: Path,
                                                            tmp_path: Path) -> None:
    """A frozen model (or a retry) checkpointed twice in a row: the second call names the
    first as its parent; it must return that version, not fail the run with a cycle."""
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"frozen weights")
    with ExperimentContext(name="frozen", root=store_root, monitor_hardware=False,
                           capture_level=1) as ctx:
        first = ctx.log_model_checkpoint(weights, step=1)
        second = ctx.log_model_checkpoint(weights, step=2)
        assert second.key == first.key

        @checkpoint(frequency=1, metric="loss")
        def train(model: torch.nn.Module) -> dict[str, float]:
            return {"loss": 1.0}

        model = _Frozen()
        keys = {train(model) and manager.list_artifacts("checkpoint")[-1].key for _ in range(3)}
        assert len(keys) == 1
    assert ctx.run is not None
    assert manager.get_run(ctx.run.id or "")["state"] == "completed"


def test_every_public_error_is_a_repro_error() -> None:
    import repro_core

    for name in repro_core.__all__:
        obj = getattr(repro_core, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, ReproError), name


def test_deeply_nested_metadata_is_scrubbed_without_recursion(manager: ArtifactManager,
                                                              run: object) -> None:
    """Metadata up to the JSON depth limit (500) is stored; its scrubbing must not hit
    Python's recursion limit on the way (a RecursionError is no typed error)."""
    metadata: dict[str, object] = {}
    node = metadata
    for _ in range(240):  # dict + list: two JSON levels each
        child: dict[str, object] = {"password": "hunter2"}
        node["next"] = [child]
        node = child
    meta = manager.log_artifact("deep", "dataset", data=b"x", metadata=metadata)
    node = meta.metadata
    for _ in range(240):  # dict + list: two JSON levels each
        node = node["next"][0]  # type: ignore[index]
        assert node["password"] == "<redacted>"  # type: ignore[index]


@pytest.mark.parametrize("root", ["", "   ", None, 123])
def test_a_store_root_must_be_a_non_empty_path(manager: ArtifactManager, root: object,
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidArgumentError, match="root"):
        manager.set_root(root)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_a_new_store_is_never_made_among_other_files(manager: ArtifactManager,
                                                     tmp_path: Path) -> None:
    project = tmp_path / "my-project"
    project.mkdir()
    (project / "train.py").write_text("print('hi')")
    with pytest.raises(InvalidArgumentError, match="already holds other files"):
        manager.init_run("r", root=project)
    assert sorted(p.name for p in project.iterdir()) == ["train.py"]  # no CACHEDIR.TAG
    run = manager.init_run("r", root=project, create=True)  # explicit: allowed
    assert run.id is not None
    manager.finalize_run()


@pytest.mark.parametrize("kwargs", [{"verify": "yes"}, {"copy": 1}, {"copy": False,
                                                                       "copy_to": "x"}])
def test_yes_no_arguments_take_bools(manager: ArtifactManager, run: object,
                                     kwargs: dict[str, object], tmp_path: Path) -> None:
    manager.log_artifact("a", "dataset", data=b"a")
    if "copy_to" in kwargs:
        kwargs = {**kwargs, "copy_to": tmp_path / "out"}
    with pytest.raises(InvalidArgumentError):
        manager.use_artifact("a", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="create"):
        manager.init_run("other", create="yes")  # type: ignore[arg-type]


def test_writing_to_a_read_only_store_says_so(manager: ArtifactManager, store_root: Path) -> None:
    """Not "damaged, run repro recover": the registry is fine, this user may not write."""
    import subprocess
    import sys

    manager.init_run("r")
    manager.finalize_run()
    ArtifactManager.reset_instance()
    for path in [store_root, *store_root.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    code = ("from repro_core import ArtifactManager as M; "
            f"M().init_run('x', root={str(store_root)!r})")
    try:
        proc = subprocess.run(["setpriv", "--bounding-set=-all", "--inh-caps=-all",
                               sys.executable, "-c", code], capture_output=True, text=True)
    finally:
        for path in [store_root, *store_root.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "read-only" in last and "recover" not in last, last
