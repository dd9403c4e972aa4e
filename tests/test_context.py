"""ExperimentContext: run states, the user's exception, captured artifacts, monitor, SIGTERM.

What each group proves (the failure it would catch):

- success / exception / KeyboardInterrupt / SystemExit end the run COMPLETED / FAILED /
  INTERRUPTED in the registry, and the user's exception object propagates unchanged;
- ``config``, ``environment``, ``error_trace`` (with the traceback text) and, when monitoring,
  ``hardware_usage`` + ``runs/<id>/hardware.jsonl`` are recorded;
- a failure while finalizing never replaces the user's exception (a RuntimeWarning instead),
  and is raised when there is no user exception;
- SIGTERM in a child process ends the run INTERRUPTED, chaining a previously installed handler
  and restoring it afterwards;
- contexts do not nest; metrics logged through the context are readable after exit.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_capture import git

from repro_core import ArtifactManager, RunStateError
from repro_core.capture import EnvironmentCaptureLevel
from repro_core.context import ExperimentContext, Terminated


def _ctx(root: Path, **kwargs: Any) -> ExperimentContext:
    kwargs.setdefault("monitor_hardware", False)
    kwargs.setdefault("capture_level", 1)
    return ExperimentContext(root=root, **kwargs)


def _state(run_id: str | None) -> str:
    assert run_id is not None
    return str(ArtifactManager().get_run(run_id)["state"])


def _outputs(run_id: str | None) -> list[str]:
    assert run_id is not None
    return list(ArtifactManager().get_run(run_id)["outputs"])


# -- states and the user's exception ----------------------------------------------------------


def test_success_completes_and_records_config_and_environment(
        manager: ArtifactManager, store_root: Path) -> None:
    with _ctx(store_root, config={"lr": 0.1, "layers": [1, 2]}, name="ok",
              tags=["t1"]) as ctx:
        assert manager.current_run is not None and manager.current_run.name == "ok"
        assert ctx.run is not None
        assert _state(ctx.run.id) == "running"
    assert manager.current_run is None
    record = manager.get_run(ctx.run.id or "")
    assert record["state"] == "completed"
    assert record["ended_at"] == record["states"][-1][1] > record["created_at"]
    assert record["tags"] == ["t1"]
    assert record["config"]["lr"] == 0.1
    assert [s[0] for s in record["states"]] == ["running", "completed"]
    outputs = record["outputs"]
    assert any(k.startswith("default/config:") for k in outputs)
    assert any(k.startswith("default/environment:") for k in outputs)
    assert not any(k.startswith("default/error_trace:") for k in outputs)
    assert manager.load_artifact("config") == {"lr": 0.1, "layers": [1, 2]}
    env = manager.load_artifact("environment")
    assert env["capture_level"] == "BASIC"
    assert env["python"]["executable"] == sys.executable


def test_exception_fails_run_propagates_same_object_and_keeps_trace(
        manager: ArtifactManager, store_root: Path) -> None:
    error = ValueError("bad batch 0xC0FFEE")

    def body_that_raises() -> None:
        raise error

    with pytest.raises(ValueError) as info, _ctx(store_root, name="boom") as ctx:
        body_that_raises()
    assert info.value is error and type(info.value) is ValueError
    assert ctx.run is not None
    record = manager.get_run(ctx.run.id or "")
    assert record["state"] == "failed"
    assert ["failed", "ValueError: bad batch 0xC0FFEE"] in [[s, r] for s, _, r in record["states"]]
    assert any(k.startswith("default/error_trace:") for k in record["outputs"])
    trace = manager.load_artifact("error_trace")
    assert isinstance(trace, str)
    assert "Traceback (most recent call last)" in trace
    assert "body_that_raises" in trace and "ValueError: bad batch 0xC0FFEE" in trace


def test_keyboard_interrupt_is_interrupted_without_error_trace(
        manager: ArtifactManager, store_root: Path) -> None:
    with pytest.raises(KeyboardInterrupt), _ctx(store_root) as ctx:
        raise KeyboardInterrupt
    assert ctx.run is not None
    assert _state(ctx.run.id) == "interrupted"
    assert not any(k.startswith("default/error_trace:") for k in _outputs(ctx.run.id))


@pytest.mark.parametrize(("code", "state"), [(0, "completed"), (None, "completed"),
                                             (3, "failed")])
def test_system_exit_state_follows_exit_code(manager: ArtifactManager, store_root: Path,
                                             code: int | None, state: str) -> None:
    with pytest.raises(SystemExit) as info, _ctx(store_root) as ctx:
        raise SystemExit(code)
    assert info.value.code == code
    assert ctx.run is not None
    assert _state(ctx.run.id) == state


def test_context_restores_sigterm_handler(manager: ArtifactManager, store_root: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    with _ctx(store_root):
        inside = signal.getsignal(signal.SIGTERM)
        assert inside is not before and callable(inside)
    assert signal.getsignal(signal.SIGTERM) is before


def test_context_in_worker_thread_leaves_signals_alone(manager: ArtifactManager,
                                                       store_root: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    seen: dict[str, Any] = {}

    def work() -> None:
        with _ctx(store_root) as ctx:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
        seen["run_id"] = ctx.run.id if ctx.run else None

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(30)
    assert seen["handler"] is before
    assert _state(seen["run_id"]) == "completed"


# -- finalize failures never mask the user's exception --------------------------------------


def test_finalize_failure_during_exception_warns_and_keeps_user_error(
        manager: ArtifactManager, store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    error = ValueError("the real problem")
    original = ArtifactManager.finalize_run

    def broken_finalize(self: ArtifactManager, **_: object) -> None:
        raise RuntimeError("disk on fire")

    ctx = _ctx(store_root)
    with pytest.warns(RuntimeWarning, match="disk on fire"), \
            pytest.raises(ValueError) as info, ctx:
        monkeypatch.setattr(ArtifactManager, "finalize_run", broken_finalize)
        raise error
    assert info.value is error
    assert ctx.run is not None
    assert _state(ctx.run.id) == "failed"  # the state is set before finalize is attempted
    monkeypatch.setattr(ArtifactManager, "finalize_run", original)
    manager.finalize_run()
    assert _state(ctx.run.id) == "failed"


def test_error_trace_failure_still_finalizes_failed(manager: ArtifactManager, store_root: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    error = KeyError("x")

    def broken_log(self: ArtifactManager, *args: Any, **kwargs: Any) -> Any:
        raise OSError("read-only store")

    ctx = _ctx(store_root)
    with pytest.warns(RuntimeWarning, match="read-only store"), \
            pytest.raises(KeyError) as info, ctx:
        monkeypatch.setattr(ArtifactManager, "log_artifact", broken_log)
        raise error
    assert info.value is error
    assert manager.current_run is None  # finalize ran despite the error_trace failure
    assert ctx.run is not None
    assert _state(ctx.run.id) == "failed"


def test_finalize_failure_without_user_error_is_raised(
        manager: ArtifactManager, store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_finalize(self: ArtifactManager, **_: object) -> None:
        raise RuntimeError("cannot write run.json")

    with pytest.raises(RuntimeError, match=r"cannot write run\.json"), _ctx(store_root):
        monkeypatch.setattr(ArtifactManager, "finalize_run", broken_finalize)


# -- nesting, names, options --------------------------------------------------------------------


def test_nested_context_raises_and_outer_run_survives(manager: ArtifactManager,
                                                      store_root: Path) -> None:
    with _ctx(store_root, name="outer") as outer:
        with pytest.raises(RunStateError, match="outer"), _ctx(store_root, name="inner"):
            pass  # pragma: no cover - never entered
        assert manager.current_run is not None and manager.current_run.name == "outer"
        outer.log_metrics({"still_logging": 1.0})
    assert outer.run is not None
    assert _state(outer.run.id) == "completed"
    assert [r.name for r in manager.registry().list_runs()] == ["outer"]


def test_nesting_inside_manual_run_is_refused(manager: ArtifactManager, run: Any,
                                              store_root: Path) -> None:
    with pytest.raises(RunStateError), _ctx(store_root):
        pass  # pragma: no cover
    assert manager.current_run is run


def test_default_name_and_level(manager: ArtifactManager) -> None:
    ctx = ExperimentContext(monitor_hardware=False)
    assert re.fullmatch(r"exp_\d{8}_\d{6}", ctx.name)
    assert ctx.capture_level == EnvironmentCaptureLevel.STANDARD == 2
    assert ExperimentContext(name="mine", monitor_hardware=False).name == "mine"


def test_offline_mode_is_recorded(manager: ArtifactManager, store_root: Path) -> None:
    with _ctx(store_root, offline_mode=True, config={"a": 1}) as ctx:
        pass
    assert ctx.run is not None
    assert manager.get_run(ctx.run.id or "")["config"] == {"a": 1, "_repro": {"offline": True}}
    assert manager.load_artifact("config") == {"a": 1}  # the artifact is the user's config


def test_complete_capture_logs_the_git_patch(manager: ArtifactManager, store_root: Path,
                                             tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """At COMPLETE, inside a dirty repository (the process's cwd, as in a training script),
    the uncommitted changes are a ``git_patch`` artifact whose content is the diff, and the
    environment keeps only its size; a clean repository logs no patch."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "train.py").write_text("lr = 0.1\n")
    git(repo, "add", "train.py")
    git(repo, "commit", "-q", "-m", "init")
    monkeypatch.chdir(repo)
    with _ctx(store_root, capture_level=3, name="clean") as clean:
        pass
    assert not any("git_patch" in k for k in _outputs(clean.run.id if clean.run else None))

    (repo / "train.py").write_text("lr = 0.3\n")
    (repo / "model.py").write_text("layers = 4\n")
    git(repo, "add", "model.py")
    diff = git(repo, "-c", "core.quotepath=off", "diff", "--no-ext-diff", "--no-color",
               "--binary", "HEAD")
    with _ctx(store_root, capture_level=3, name="dirty") as ctx:
        pass
    assert ctx.run is not None and "default/git_patch:v1" in _outputs(ctx.run.id)
    patch = manager.use_artifact("git_patch:v1")
    assert patch.type.value == "code" and patch.run_id == ctx.run.id
    assert patch.path is not None and patch.path.read_bytes() == diff
    env = manager.load_artifact("environment:v2")["git"]
    assert "patch" not in env and env["patch_bytes"] == len(diff) and env["dirty"] is True


def test_log_metrics_readable_after_exit(manager: ArtifactManager, store_root: Path) -> None:
    with _ctx(store_root) as ctx:
        for step in range(50):
            ctx.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 50})
        assert ctx.log_metrics({"loss": 0.0}, step=100) == 100
    assert ctx.run is not None and ctx.run.id is not None
    got = ArtifactManager().get_metrics(ctx.run.id)
    assert [s for s, _, _ in got["loss"]] == [*range(50), 100]
    assert [v for _, v, _ in got["loss"]] == [1.0 / (s + 1) for s in range(50)] + [0.0]
    assert len(got["acc"]) == 50 and got["acc"][-1][1] == 49 / 50


def test_log_model_checkpoint_chains_parents(manager: ArtifactManager, store_root: Path,
                                             tmp_path: Path) -> None:
    with _ctx(store_root, config={"lr": 1}) as ctx:
        keys = []
        for step in (10, 20):
            path = tmp_path / f"ckpt{step}.bin"
            path.write_bytes(bytes([step]) * 100)
            keys.append(ctx.log_model_checkpoint(path, step, metrics={"loss": step / 10}).key)
        assert ctx.last_checkpoint is not None and ctx.last_checkpoint.key == keys[1]
    assert keys == ["default/checkpoint:v1", "default/checkpoint:v2"]
    second = manager.use_artifact("checkpoint:v2")
    assert second.metadata == {"step": 20, "metrics": {"loss": 2.0}}
    assert sorted(second.parent_artifacts) == ["default/checkpoint:v1", "default/config:v1"]
    assert manager.use_artifact("checkpoint:v1").parent_artifacts == ["default/config:v1"]


# -- hardware monitor ---------------------------------------------------------------------------


def _wait_for_samples(ctx: ExperimentContext, count: int) -> None:
    """Until the monitor has taken ``count`` samples (bounded: a loaded machine may be slow to
    schedule the sampler, so no fixed sleep is long enough)."""
    assert ctx.monitor is not None
    deadline = time.monotonic() + 30
    while len(ctx.monitor.samples) < count:
        assert time.monotonic() < deadline, "the monitor took no samples in 30 s"
        time.sleep(0.01)


def test_monitor_writes_hardware_usage_and_jsonl(manager: ArtifactManager,
                                                 store_root: Path) -> None:
    with _ctx(store_root, monitor_hardware=True, monitor_interval=0.05) as ctx:
        assert ctx.monitor is not None and ctx.monitor.running
        _wait_for_samples(ctx, 2)
    assert not ctx.monitor.running
    assert ctx.run is not None and ctx.run.dir is not None
    assert any(k.startswith("default/hardware_usage:") for k in _outputs(ctx.run.id))
    usage = manager.load_artifact("hardware_usage")
    assert usage["sample_count"] >= 2
    lines = (ctx.run.dir / "hardware.jsonl").read_text().splitlines()
    assert len(lines) == usage["sample_count"]
    samples = [json.loads(line) for line in lines]
    # the same samples are metric series of the run, indexed by sample number
    series = manager.get_metrics(ctx.run.id, keys=["hardware/t"])["hardware/t"]
    assert [(step, value) for step, value, _ in series] == [
        (i, s["t"]) for i, s in enumerate(samples)]


def test_monitor_off_writes_no_hardware_files(manager: ArtifactManager,
                                              store_root: Path) -> None:
    with _ctx(store_root) as ctx:
        pass
    assert ctx.run is not None and ctx.run.dir is not None
    assert not (ctx.run.dir / "hardware.jsonl").exists()
    assert not any(k.startswith("default/hardware_usage:") for k in _outputs(ctx.run.id))


def test_monitor_data_kept_on_failure(manager: ArtifactManager, store_root: Path) -> None:
    with pytest.raises(ZeroDivisionError), \
            _ctx(store_root, monitor_hardware=True, monitor_interval=0.05) as ctx:
        _wait_for_samples(ctx, 1)
        _ = 1 / 0
    assert ctx.run is not None and ctx.run.dir is not None
    assert (ctx.run.dir / "hardware.jsonl").is_file()
    outputs = _outputs(ctx.run.id)
    assert any(k.startswith("default/hardware_usage:") for k in outputs)
    assert any(k.startswith("default/error_trace:") for k in outputs)


# -- SIGTERM in a child process -----------------------------------------------------------------

_CHILD = textwrap.dedent("""
    import signal, sys, time
    from repro_core.context import ExperimentContext

    root, chain = sys.argv[1], sys.argv[2] == "1"
    previous = None
    if chain:
        def previous(signum, frame):
            print("previous handler called", signum, flush=True)
        signal.signal(signal.SIGTERM, previous)
    try:
        with ExperimentContext(name="sigterm-child", root=root, monitor_hardware=False,
                               capture_level=1) as ctx:
            print("run", ctx.run.id, flush=True)
            print("ready", flush=True)
            for _ in range(1200):
                time.sleep(0.05)
    except SystemExit as exc:
        restored = signal.getsignal(signal.SIGTERM)
        print("exit", exc.code, "restored", restored is previous if chain
              else restored == signal.SIG_DFL, flush=True)
        raise
""")


def _sigterm_child(store_root: Path, chain: bool) -> tuple[str, list[str], int]:
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(store_root), "1" if chain else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.strip() == "ready":
                break
        assert lines and lines[-1] == "ready", proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err  # SystemExit(143): a clean exit, no crash
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines += out.split("\n")
    run_id = next(line.split()[1] for line in lines if line.startswith("run "))
    return run_id, [line for line in lines if line], proc.returncode


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_in_child_ends_run_interrupted(manager: ArtifactManager,
                                               store_root: Path) -> None:
    run_id, lines, code = _sigterm_child(store_root, chain=False)
    assert code == 128 + signal.SIGTERM == Terminated().code
    assert f"exit {128 + signal.SIGTERM} restored True" in lines
    record = manager.get_run(run_id)
    assert record["state"] == "interrupted"
    assert record["ended_at"] == record["states"][-1][1] > record["created_at"]
    assert any(s == "interrupted" and (r or "").startswith("Terminated")
               for s, _, r in record["states"])
    assert any(k.startswith("default/environment:") for k in record["outputs"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigterm_chains_previous_handler(manager: ArtifactManager, store_root: Path) -> None:
    run_id, lines, code = _sigterm_child(store_root, chain=True)
    assert f"previous handler called {int(signal.SIGTERM)}" in lines
    assert lines.index(f"previous handler called {int(signal.SIGTERM)}") < lines.index(
        f"exit {128 + signal.SIGTERM} restored True")
    assert code == 128 + signal.SIGTERM
    assert manager.get_run(run_id)["state"] == "interrupted"


def test_environment_captured_in_background_is_logged_by_the_end(
        manager: ArtifactManager, store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``capture_in_background=True`` (what the Lightning adapter uses) returns from enter
    before the capture is done, and the run's end waits for it: the environment is logged."""
    import threading

    from repro_core import context as context_module

    release = threading.Event()
    real = context_module.capture_environment

    def slow_capture(level: Any) -> dict[str, Any]:
        assert release.wait(10)
        return real(level)

    monkeypatch.setattr(context_module, "capture_environment", slow_capture)
    with _ctx(store_root, capture_in_background=True) as ctx:
        assert not [m for m in manager.list_artifacts() if m.name == "environment"]
        release.set()
        run_id = ctx.run.id if ctx.run else None
    assert _state(run_id) == "completed"
    assert [m.name for m in manager.list_artifacts() if m.name == "environment"]


def test_a_failed_background_capture_is_a_warning_not_a_failed_run(
        manager: ArtifactManager, store_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from repro_core import context as context_module

    def broken(level: Any) -> dict[str, Any]:
        raise OSError("no /proc here")

    monkeypatch.setattr(context_module, "capture_environment", broken)
    with pytest.warns(RuntimeWarning, match="could not capture the environment"), \
            _ctx(store_root, capture_in_background=True) as ctx:
        run_id = ctx.run.id if ctx.run else None
    assert _state(run_id) == "completed"
