"""Background mirroring (``remote=`` of ``init_run``, ``ExperimentContext``, ``ReproCallback``
and ``ReproTracker``; ``$REPRO_REMOTE``) against real remotes: a directory, moto S3 on loopback,
an endpoint that never answers or refuses every connection, a remote that cannot be written,
and a process killed with SIGKILL.

What is checked is what a user relies on: after the run, the remote holds what the run logged
(pulled into a fresh store, it reads back as the source does); logging never waits for the
network (the queue row is there, untried, while the worker is stuck in a request); a failing
remote is one warning and errors on the queue rows, never an exception, and the local store
keeps everything; the queue survives a crash and ``repro push`` or the next run finishes it;
a bad ``remote=`` is refused before a run exists (by the adapters, before any file
exists). No timings are asserted: a deadline only bounds how long a broken build hangs.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import pytest
import torch
from accelerate import Accelerator
from accelerate_support import PROJECT as ACC_PROJECT
from accelerate_support import (  # noqa: F401 (fresh_accelerate: an autouse fixture)
    fresh_accelerate,
    make_tracker,
)
from click.testing import CliRunner
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_scripts.common import TinyModel, trainer_kwargs

import repro_lightning
from repro_core import ArtifactManager, ArtifactType, constants, remote
from repro_core.cli import main as repro_cli
from repro_core.context import ExperimentContext
from repro_core.errors import ArtifactNotFoundError, InvalidArgumentError
from repro_core.registry import Registry
from repro_core.remote import QueueItem
from repro_lightning import ReproCallback, ReproTracker

SCRIPTS = Path(__file__).resolve().parent / "remote_scripts"
LIT_PROJECT = "lit"
# Generous: a deadline only bounds how long a broken build takes to fail, it is not a timing.
DEADLINE = 60.0
_SETTINGS = ("REPRO_REMOTE", "REPRO_REMOTE_TIMEOUT", "REPRO_REMOTE_RETRIES",
             "REPRO_REMOTE_BACKOFF")

T = TypeVar("T")


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _remote_settings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No remote setting leaks in from the environment, and none set here leaks out."""
    for name in _SETTINGS:
        monkeypatch.delenv(name, raising=False)
    constants.reload()
    yield
    constants.reload()  # (monkeypatch restores the environment right after)


def _settings(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    constants.reload()


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(repro_cli, list(args))
    return result.exit_code, result.output


def _make_store(root: Path, url: str) -> None:
    """``repro init`` and ``repro remote add origin URL``, as a user sets a store up."""
    assert invoke("init", "--root", str(root))[0] == 0
    code, out = invoke("remote", "add", "origin", url, "--root", str(root))
    assert code == 0, out


def _status(root: Path) -> dict[str, Any]:
    """``repro status --json``."""
    code, out = invoke("status", "--root", str(root), "--json")
    assert code == 0, out
    return json.loads(out)  # type: ignore[no-any-return]


def _pull(url: str, into: Path) -> Path:
    remote.pull(url, root=into, show_progress=False)
    return into


def _describe(root: Path) -> dict[str, Any]:
    """Everything a reader of ``root`` sees of its versions: their rows (but the local path),
    lineage, the runs that made them and those runs' metrics. Points the singleton at
    ``root`` (a fresh one)."""
    manager = ArtifactManager.reset_instance()
    manager.set_root(root)
    versions = {}
    for meta in manager.list_artifacts():
        row = meta.to_dict()
        row.pop("path")
        versions[meta.key] = row
    runs = sorted({str(v["run_id"]) for v in versions.values()})
    return {"versions": versions,
            "lineage": {key: manager.get_lineage(key) for key in versions},
            "runs": {r: manager.get_run(r) for r in runs},
            "metrics": {r: manager.get_metrics(r) for r in runs}}


def _hashes(root: Path, name: str) -> dict[str, str | None]:
    """``version -> digest`` of ``name``'s versions in the store at ``root``."""
    manager = ArtifactManager.reset_instance()
    manager.set_root(root)
    return {m.version: m.hash for m in manager.list_artifacts(name)}


def _wait_for(what: str, probe: Callable[[], T | None]) -> T:
    """Poll ``probe`` until it returns something truthy (within ``DEADLINE``)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {DEADLINE:g} s")
        time.sleep(0.05)


def _messages(caught: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in caught
            if issubclass(w.category, RuntimeWarning) and text in str(w.message)]


@pytest.fixture(params=["directory", "s3"])
def remote_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty remote: a directory, or a fresh bucket on the moto S3 server."""
    if request.param == "directory":
        return str(tmp_path / "remote")
    return f"s3://{request.getfixturevalue('s3_bucket')}/team/repro"


@pytest.fixture
def black_hole() -> Iterator[socket.socket]:
    """A loopback port that accepts connections (the kernel does) and never answers: a request
    to it hangs until it is closed, after which every connection is refused."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    yield listener
    listener.close()


def _unreachable_s3(monkeypatch: pytest.MonkeyPatch, port: int) -> str:
    """Point botocore at ``port`` on loopback (credentials set, so nothing looks further)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    _settings(monkeypatch, REPRO_REMOTE_RETRIES="1", REPRO_REMOTE_BACKOFF="0.05")
    return "s3://repro-unreachable/prefix"


def _run_names(root: Path) -> list[str]:
    registry = Registry(root / "registry.sqlite", readonly=True)
    registry.open()
    try:
        return [r.name for r in registry.list_runs()]
    finally:
        registry.close()


def _row(manager: ArtifactManager, key: str) -> QueueItem:
    """The queue row of version ``key`` (fails if there is none)."""
    rows = {(i.kind, i.ref): i for i in manager.pending_pushes()}
    vid = str(manager.version_id(key))
    assert ("version", vid) in rows, f"no queue row for {key}: {rows}"
    return rows["version", vid]


# -- a run with a remote: everything lands there -------------------------------------------------


def test_a_run_mirrors_its_versions_lineage_and_metrics(
        manager: ArtifactManager, store_root: Path, tmp_path: Path, remote_url: str) -> None:
    _make_store(store_root, remote_url)
    run = manager.init_run("mirrored", config={"lr": 0.1}, tags=["remote"], remote="origin")
    data = manager.log_artifact("data", ArtifactType.DATASET, data={"rows": [1, 2, 3]},
                                metadata={"rows": 3})
    first = manager.log_artifact("model", ArtifactType.MODEL, data={"w": [0.0]},
                                 parent_artifacts=[data.key])
    manager.log_metrics({"loss": 1.0, "acc": 0.5}, step=0)
    second = manager.log_artifact("model", ArtifactType.MODEL, data={"w": [1.0]},
                                  parent_artifacts=[first.key], aliases=["best"])
    manager.log_metrics({"loss": 0.5}, step=1)
    manager.finalize_run()

    status = _status(store_root)
    assert list(status) == ["origin"] and status["origin"]["pending"] == []
    assert remote.status(root=store_root)["origin"]["pending"] == []

    fresh = _pull(remote_url, tmp_path / "fresh")
    source, pulled = _describe(store_root), _describe(fresh)
    assert set(source["versions"]) == {data.key, first.key, second.key}
    assert source["metrics"][run.id]["loss"][1][:2] == (1, 0.5)
    assert pulled == source
    assert pulled["runs"][run.id]["state"] == "completed"  # the final state, not the first


def test_repro_remote_names_the_remote_of_a_run_that_gives_none(
        manager: ArtifactManager, store_root: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "remote")
    _make_store(store_root, url)
    _settings(monkeypatch, REPRO_REMOTE="origin")
    with ExperimentContext(name="from-env", capture_level=1, monitor_hardware=False,
                           root=store_root) as ctx:
        key = ctx.log_artifact("model", ArtifactType.MODEL, data={"w": [2.0]}).key
    assert _status(store_root)["origin"]["pending"] == []
    assert _hashes(_pull(url, tmp_path / "fresh"), "default/model") == \
        _hashes(store_root, "default/model")
    assert key == "default/model:v1"


# -- an unreachable remote: training never waits, never fails -----------------------------------


def test_logging_never_waits_for_an_unreachable_remote_and_the_store_keeps_everything(
        manager: ArtifactManager, store_root: Path, black_hole: socket.socket,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = _unreachable_s3(monkeypatch, black_hole.getsockname()[1])
    _settings(monkeypatch, REPRO_REMOTE_TIMEOUT="2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = manager.init_run("train", remote=url)
        keys = []
        for step in range(3):
            keys.append(manager.log_artifact("model", ArtifactType.MODEL,
                                             data={"w": [float(step)]}).key)
            # The worker is inside its first request, which hangs until the port is closed:
            # the call returned all the same, leaving a row no push has tried yet.
            row = _row(manager, keys[-1])
            assert (row.attempts, row.last_error) == (0, None)
            manager.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        assert _messages(caught, "") == []

        black_hole.close()  # from now on, every connection is refused
        # A round stops at its first failure (the remote is down: one attempt counted, not
        # one per item, so an outage does not park everything): the first item fails twice.
        items = _wait_for("the first push failed twice", lambda: (
            rows if len(rows := manager.pending_pushes()) == 3
            and rows[0].last_error and rows[0].attempts >= 2 else None))
        assert {i.ref for i in items} == {str(manager.version_id(k)) for k in keys}
        assert "s3://repro-unreachable/prefix" in str(items[0].last_error)
        assert [i.attempts for i in items[1:]] == [0, 0]
        failed = _messages(caught, "pushing to remote")
        assert len(failed) == 1, failed  # one warning for repeated failures of three items
        assert f"pushing to remote {url!r} failed" in failed[0]
        assert "EndpointConnectionError" in failed[0]
        assert "local store keeps everything" in failed[0]

        manager.finalize_run()  # returns: REPRO_REMOTE_TIMEOUT bounds the wait
        left = _messages(caught, "stay queued")
        assert len(left) == 1
        assert "4 push(es)" in left[0]  # 3 versions + the run
        assert "within 2 s" in left[0] or "failed again" in left[0]  # (the worker gave up)
        assert f"`repro push {url}`" in left[0] and "stay queued" in left[0]
        assert len(_messages(caught, "pushing to remote")) == 1

    status = _status(store_root)
    assert list(status) == [url]  # an unnamed remote: listed by its URL
    pending = status[url]["pending"]
    assert sorted((i["kind"], i["ref"]) for i in pending) == sorted(
        [("run", run.id)] + [("version", str(manager.version_id(k))) for k in keys])
    assert pending[0]["last_error"] and pending[0]["what"] == keys[0]  # (by key, for people)

    manager.init_run("evaluate")  # the local store has it all
    used = manager.use_artifact(keys[-1])
    assert used.path is not None and json.loads(Path(used.path).read_text()) == {"w": [2.0]}
    assert [m.key for m in manager.list_artifacts("model")] == keys
    assert manager.get_run(run.id)["state"] == "completed"
    assert [v for _, v, _ in manager.get_metrics(run.id)["loss"]] == [1.0, 0.5, 1.0 / 3]
    manager.finalize_run()


def test_finishing_a_run_is_bounded_while_the_remote_hangs(
        manager: ArtifactManager, store_root: Path, black_hole: socket.socket,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = _unreachable_s3(monkeypatch, black_hole.getsockname()[1])
    _settings(monkeypatch, REPRO_REMOTE_TIMEOUT="1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = manager.init_run("train", remote=url)
        key = manager.log_artifact("model", ArtifactType.MODEL, data={"w": [1.0]}).key
        manager.finalize_run()  # the worker is still inside its first request
        left = _messages(caught, "did not finish")
        assert len(left) == 1 and "within 1 s (last error: none)" in left[0]
        assert manager.get_run(run.id)["state"] == "completed"
        pending = _status(store_root)[url]["pending"]
        assert sorted((i["kind"], i["ref"]) for i in pending) == sorted(
            [("run", run.id), ("version", str(manager.version_id(key)))])

        black_hole.close()  # the hung request fails; the stopping worker gives up and exits
        _wait_for("the mirror thread ended", lambda: not any(
            t.name.startswith("repro-mirror-") for t in threading.enumerate()))
    assert len(_status(store_root)[url]["pending"]) == 2  # still queued for `repro push`


# -- a crash: the queue survives -----------------------------------------------------------------


def _crash_with_queue(store: Path, tmp_path: Path) -> tuple[dict[str, Any], Path, str]:
    """A subprocess logs three versions to remote ``origin`` = ``file://<tmp>/blocker/remote``
    while ``blocker`` is a regular file (so even root cannot make the remote), waits for the
    first push to fail, then SIGKILLs itself. Returns what it printed, ``blocker`` and the URL."""
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the remote's parent directory should be\n")
    url = f"file://{blocker}/remote"
    _make_store(store, url)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "crash_with_queue.py"), str(store)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), blocker, url


def _unblock(blocker: Path) -> None:
    blocker.unlink()
    blocker.mkdir()


def test_a_crashed_runs_queue_survives_and_repro_push_finishes_it(
        manager: ArtifactManager, store_root: Path, tmp_path: Path) -> None:
    crashed, blocker, url = _crash_with_queue(store_root, tmp_path)
    ids = [str(manager.version_id(k)) for k in crashed["keys"]]
    pending = _status(store_root)["origin"]["pending"]
    assert [(i["kind"], i["ref"]) for i in pending] == [("version", i) for i in ids]
    assert pending[0]["attempts"] >= 1 and "blocker" in pending[0]["last_error"]

    _unblock(blocker)
    code, out = invoke("push", "origin", "--root", str(store_root), "--json")
    assert code == 0, out
    assert set(crashed["keys"]) <= set(json.loads(out)["versions"])
    assert _status(store_root)["origin"]["pending"] == []

    fresh = _pull(url, tmp_path / "fresh")
    source, pulled = _describe(store_root), _describe(fresh)
    assert set(source["versions"]) == set(crashed["keys"])
    assert pulled["versions"] == source["versions"]
    assert pulled["lineage"] == source["lineage"]
    assert list(pulled["runs"]) == [crashed["run"]]


def test_the_next_run_with_the_remote_finishes_a_crashed_runs_queue(
        manager: ArtifactManager, store_root: Path, tmp_path: Path) -> None:
    crashed, blocker, url = _crash_with_queue(store_root, tmp_path)
    _unblock(blocker)
    run = manager.init_run("next", remote="origin")
    key = manager.log_artifact("model", ArtifactType.MODEL, data={"w": [9.0]}).key
    manager.finalize_run()
    assert _status(store_root)["origin"]["pending"] == []

    fresh = _pull(url, tmp_path / "fresh")
    source, pulled = _describe(store_root), _describe(fresh)
    assert set(source["versions"]) == {*crashed["keys"], key}
    assert pulled["versions"] == source["versions"]
    assert pulled["lineage"] == source["lineage"]
    assert set(pulled["runs"]) == {crashed["run"], run.id}
    assert pulled["runs"][run.id] == source["runs"][run.id]


# -- the adapters --------------------------------------------------------------------------------


def test_repro_callback_mirrors_every_checkpoint(store_home: Path, tmp_path: Path) -> None:
    url = str(tmp_path / "remote")
    _make_store(store_home, url)
    callback = ReproCallback(project=LIT_PROJECT, monitor_hardware=False, remote="origin")
    # val_epoch rises: "best" stays on v1 while "latest" moves on (both aliases must travel)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1,
                                 monitor="val_epoch", mode="min")
    pl.seed_everything(1234)
    trainer = pl.Trainer(callbacks=[callback, checkpoint], **trainer_kwargs(
        max_epochs=2, limit_train_batches=2, limit_val_batches=1))
    trainer.fit(TinyModel())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["epoch=0.ckpt",
                                                                     "epoch=1.ckpt"]
    assert _status(store_home)["origin"]["pending"] == []

    fresh = _pull(url, tmp_path / "fresh")
    local = _hashes(store_home, f"{LIT_PROJECT}/checkpoint")
    assert sorted(local) == ["v1", "v2"] and all(local.values())
    assert _hashes(fresh, f"{LIT_PROJECT}/checkpoint") == local
    source, pulled = _describe(store_home), _describe(fresh)
    checkpoints = {k: v["aliases"] for k, v in source["versions"].items() if "checkpoint" in k}
    assert checkpoints == {f"{LIT_PROJECT}/checkpoint:v1": ["best"],
                           f"{LIT_PROJECT}/checkpoint:v2": ["latest"]}
    assert pulled == source
    assert pulled["runs"][str(callback.run_id)]["state"] == "completed"


def test_repro_tracker_mirrors_every_saved_state(store_home: Path, tmp_path: Path) -> None:
    url = str(tmp_path / "remote")
    _make_store(store_home, url)
    tracker = make_tracker(remote="origin")
    accelerator = Accelerator(cpu=True, log_with=[tracker])
    accelerator.init_trackers(ACC_PROJECT, config={"lr": 0.1})
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    for step in (1, 2):
        accelerator.backward(model(torch.randn(8, 4)).pow(2).mean())
        optimizer.step()
        optimizer.zero_grad()
        accelerator.log({"loss": float(step)}, step=step)
        repro_lightning.save_state(accelerator, tmp_path / f"state{step}", step=step)
    accelerator.end_training()
    assert _status(store_home)["origin"]["pending"] == []

    fresh = _pull(url, tmp_path / "fresh")
    local = _hashes(store_home, f"{ACC_PROJECT}/state")
    assert sorted(local) == ["v1", "v2"] and local["v1"] != local["v2"]
    assert _hashes(fresh, f"{ACC_PROJECT}/state") == local
    source, pulled = _describe(store_home), _describe(fresh)
    assert pulled == source


# -- bad input -----------------------------------------------------------------------------------


def test_an_unknown_remote_name_is_refused_before_the_run_exists(
        manager: ArtifactManager, store_root: Path) -> None:
    with pytest.raises(ArtifactNotFoundError, match="no remote named 'nosuch'"):
        manager.init_run("train", remote="nosuch")
    assert manager.current_run is None
    assert _run_names(store_root) == []
    with pytest.raises(ArtifactNotFoundError, match="nosuch"):
        ExperimentContext(name="train", capture_level=1, monitor_hardware=False,
                          root=store_root, remote="nosuch").__enter__()
    assert manager.current_run is None
    assert _run_names(store_root) == []
    manager.init_run("train")  # nothing was left half-open
    manager.finalize_run()
    assert _run_names(store_root) == ["train"]


def test_an_unknown_remote_name_stops_an_adapters_run_before_it_exists(
        store_home: Path, tmp_path: Path) -> None:
    """The adapters take a name at construction (the store may not exist yet) and resolve it
    when the run starts: an unknown one is raised there, and no run is recorded."""
    assert invoke("init", "--root", str(store_home))[0] == 0
    trainer = pl.Trainer(callbacks=[ReproCallback(monitor_hardware=False, remote="nosuch")],
                         **trainer_kwargs(max_epochs=1, limit_train_batches=1,
                                          limit_val_batches=0))
    with pytest.raises(ArtifactNotFoundError, match="no remote named 'nosuch'"):
        trainer.fit(TinyModel())
    assert _run_names(store_home) == []

    accelerator = Accelerator(cpu=True, log_with=[make_tracker(remote="nosuch")])
    accelerator.init_trackers(ACC_PROJECT)
    with pytest.raises(ArtifactNotFoundError, match="no remote named 'nosuch'"):
        accelerator.log({"loss": 1.0}, step=0)
    assert _run_names(store_home) == []


_ADAPTERS: dict[str, Callable[[Any], object]] = {
    "ExperimentContext": lambda r: ExperimentContext(name="x", monitor_hardware=False,
                                                     remote=r),
    "ReproCallback": lambda r: ReproCallback(monitor_hardware=False, remote=r),
    "ReproTracker": lambda r: ReproTracker(monitor_hardware=False, remote=r),
}


@pytest.mark.parametrize("value", [123, "", "   ", "ftp://x", "no such"],
                         ids=["int", "empty", "blank", "ftp", "bad-name"])
@pytest.mark.parametrize("adapter", sorted(_ADAPTERS))
def test_a_bad_remote_is_refused_at_construction(store_home: Path, tmp_path: Path,
                                                 adapter: str, value: object) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InvalidArgumentError, match=r"remote|URL|url") as info:
        _ADAPTERS[adapter](value)
    assert info.value.argument in ("remote", "url", "name")
    assert not store_home.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
