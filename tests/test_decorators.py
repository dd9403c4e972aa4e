"""Decorators: ``reproducible``, ``track_artifacts`` and ``checkpoint`` on sync and async code.

What each group proves (the failure it would catch):

- ``reproducible`` opens one run per call (named after the function), captures the config from
  the parameter named config/cfg/conf/args, passes the return value through, and ends FAILED
  re-raising the same exception — also for methods and ``async def`` (the seed's original
  recorded an un-awaited coroutine);
- ``track_artifacts`` gives every output the used inputs (and the source, if asked) as parents,
  records the inputs as the run's inputs, stores the call's arguments, and never logs without a
  run (it opens one for the call);
- ``checkpoint`` keeps alias ``best`` on the right version for min and max, saves every N
  calls, and rejects bad arguments when applied and bad return values at the first call.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from repro_core import ArtifactManager, InvalidArgumentError, RunStateError
from repro_core.decorators import checkpoint, reproducible, track_artifacts
from repro_core.registry import RunRow


def _runs(manager: ArtifactManager) -> list[RunRow]:
    return manager.registry().list_runs()


def _only_run(manager: ArtifactManager) -> RunRow:
    runs = _runs(manager)
    assert len(runs) == 1, [r.name for r in runs]
    return runs[0]


def _user_config(row: RunRow) -> dict[str, Any]:
    return {k: v for k, v in row.config.items() if k != "_repro"}


# -- reproducible -------------------------------------------------------------------------------


@reproducible(name="by-config")
def _with_config(config: dict[str, Any], scale: int = 2) -> int:
    return int(config["x"]) * scale


@reproducible(name="by-cfg")
def _with_cfg(data: list[int], cfg: dict[str, Any]) -> int:
    return sum(data) + int(cfg["x"])


@reproducible(name="by-conf")
def _with_conf(conf: dict[str, Any]) -> int:
    return int(conf["x"])


@reproducible(name="by-args")
def _with_args(args: dict[str, Any]) -> int:
    return int(args["x"])


@pytest.mark.parametrize(("fn", "call_args", "call_kwargs", "expected"), [
    (_with_config, ({"x": 3},), {}, 6),
    (_with_config, (), {"config": {"x": 3}, "scale": 5}, 15),
    (_with_cfg, ([1, 2],), {"cfg": {"x": 3}}, 6),
    (_with_conf, ({"x": 3},), {}, 3),
    (_with_args, ({"x": 3},), {}, 3),
])
def test_reproducible_captures_config(manager: ArtifactManager, fn: Any,
                                      call_args: tuple[Any, ...], call_kwargs: dict[str, Any],
                                      expected: int) -> None:
    assert fn(*call_args, **call_kwargs) == expected
    row = _only_run(manager)
    assert row.name == f"by-{fn.__name__.removeprefix('_with_')}"
    assert row.state == "completed"
    assert _user_config(row) == {"x": 3}
    assert manager.load_artifact("config") == {"x": 3}
    assert manager.current_run is None


@dataclasses.dataclass
class _TrainConfig:
    lr: float = 0.1
    layers: tuple[int, ...] = (4, 2)


def test_reproducible_captures_namespace_and_dataclass(manager: ArtifactManager) -> None:
    @reproducible(name="from-argparse")
    def main(args: argparse.Namespace) -> str:
        return str(args.name)

    @reproducible(name="from-dataclass")
    def train(cfg: _TrainConfig) -> float:
        return cfg.lr

    assert main(argparse.Namespace(lr=0.5, name="x")) == "x"
    assert train(_TrainConfig()) == 0.1
    configs = {r.name: _user_config(r) for r in _runs(manager)}
    assert configs == {"from-argparse": {"lr": 0.5, "name": "x"},
                       "from-dataclass": {"lr": 0.1, "layers": [4, 2]}}


def test_reproducible_without_config_and_default_name(manager: ArtifactManager) -> None:
    seen: list[str] = []

    @reproducible()
    def plain(n: int) -> int:
        run = ArtifactManager().current_run
        assert run is not None
        seen.append(run.name)
        return n + 1

    assert plain(1) == 2 and plain(2) == 3  # one run per call
    rows = _runs(manager)
    assert [r.name for r in rows] == seen == [
        "test_reproducible_without_config_and_default_name.locals.plain"] * 2
    assert all(r.state == "completed" and _user_config(r) == {} for r in rows)
    assert plain.__name__ == "plain"  # functools.wraps keeps the function's identity


def test_reproducible_failure_reraises_same_exception(manager: ArtifactManager) -> None:
    error = RuntimeError("diverged at step 7")

    @reproducible(name="diverges")
    def train(config: dict[str, Any]) -> None:
        raise error

    with pytest.raises(RuntimeError) as info:
        train({"lr": 10.0})
    assert info.value is error
    row = _only_run(manager)
    assert row.state == "failed"
    assert "diverged at step 7" in manager.load_artifact("error_trace")
    assert manager.current_run is None


class Trainer:
    def __init__(self, base: int) -> None:
        self.base = base

    @reproducible()
    def fit(self, cfg: dict[str, Any]) -> int:
        return self.base + int(cfg["epochs"])

    @reproducible(name="async-fit")
    async def fit_async(self, cfg: dict[str, Any]) -> int:
        await asyncio.sleep(0)
        run = ArtifactManager().current_run
        assert run is not None and run.name == "async-fit"  # the run spans the awaited body
        return self.base * int(cfg["epochs"])


def test_reproducible_on_methods(manager: ArtifactManager) -> None:
    trainer = Trainer(10)
    assert trainer.fit({"epochs": 3}) == 13
    assert asyncio.run(trainer.fit_async({"epochs": 3})) == 30
    rows = _runs(manager)
    assert [(r.name, r.state) for r in rows] == [("Trainer.fit", "completed"),
                                                 ("async-fit", "completed")]
    assert all(_user_config(r) == {"epochs": 3} for r in rows)


def test_reproducible_async_function(manager: ArtifactManager) -> None:
    steps: list[str | None] = []

    @reproducible(name="async-train")
    async def train(config: dict[str, Any]) -> dict[str, float]:
        for _ in range(3):
            await asyncio.sleep(0)
            run = ArtifactManager().current_run
            steps.append(run.name if run else None)
        ArtifactManager().log_metrics({"loss": 0.25})
        return {"loss": 0.25}

    result = asyncio.run(train({"lr": 0.5}))
    assert result == {"loss": 0.25}
    assert steps == ["async-train"] * 3
    row = _only_run(manager)
    assert row.state == "completed" and _user_config(row) == {"lr": 0.5}
    assert [v for _, v, _ in manager.get_metrics(row.id)["loss"]] == [0.25]


def test_reproducible_async_failure(manager: ArtifactManager) -> None:
    error = ValueError("async boom")

    @reproducible(name="async-fail")
    async def train(config: dict[str, Any]) -> None:
        await asyncio.sleep(0)
        raise error

    with pytest.raises(ValueError) as info:
        asyncio.run(train({}))
    assert info.value is error
    assert _only_run(manager).state == "failed"


def test_reproducible_does_not_nest(manager: ArtifactManager) -> None:
    @reproducible(name="inner")
    def inner(config: dict[str, Any]) -> int:
        return 1

    @reproducible(name="outer")
    def outer(config: dict[str, Any]) -> int:
        return inner(config)

    with pytest.raises(RunStateError):
        outer({"a": 1})
    assert [(r.name, r.state) for r in _runs(manager)] == [("outer", "failed")]


@pytest.mark.parametrize("kwargs", [{"name": 3}, {"capture_level": 0}, {"capture_level": "x"}])
def test_reproducible_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgumentError):
        reproducible(**kwargs)


# -- track_artifacts ----------------------------------------------------------------------------


def _publish_dataset(manager: ArtifactManager) -> str:
    """A dataset logged by an earlier run (a run's own output is never its input)."""
    manager.init_run("prepare")
    key = manager.log_artifact("digits", "dataset", data={"x": [1, 2, 3]}).key
    manager.finalize_run()
    return key


def fit_linear(config: dict[str, Any], seed: int = 0) -> tuple[torch.nn.Module, dict[str, float]]:
    torch.manual_seed(seed)
    return torch.nn.Linear(2, 1), {"loss": 0.5, "seed": float(seed)}


def _tracked_fit_linear() -> Any:
    # Decorated inside each test, after the fixture has reset the manager: see
    # test_track_artifacts_follows_manager_reset for why decorating at import time fails.
    return track_artifacts(inputs=["digits:v1"], outputs=["model", "metrics"])(fit_linear)


def test_track_artifacts_lineage_edges(manager: ArtifactManager) -> None:
    dataset = _publish_dataset(manager)
    run = manager.init_run("train")
    model, metrics = _tracked_fit_linear()({"lr": 0.1}, seed=3)
    assert isinstance(model, torch.nn.Linear) and metrics["seed"] == 3.0
    manager.finalize_run()
    assert run is not None and run.id is not None

    record = manager.get_run(run.id)
    assert record["inputs"] == [dataset]
    assert sorted(record["outputs"]) == ["default/fit_linear-metrics:v1",
                                         "default/fit_linear-model:v1"]
    for key in record["outputs"]:
        meta = manager.use_artifact(key)
        assert meta.parent_artifacts == [dataset]
        assert meta.run_id == run.id
        assert meta.metadata["args"] == {"config": {"lr": 0.1}, "seed": 3}
        assert meta.metadata["function"] == f"{__name__}.fit_linear"
    assert manager.load_artifact("fit_linear-metrics") == {"loss": 0.5, "seed": 3.0}
    weights = manager.load_artifact("fit_linear-model")
    assert torch.equal(weights["weight"], model.weight.detach())  # module logged as weights
    assert manager.get_lineage("fit_linear-model:v1")["run_inputs"] == [dataset]


def test_track_artifacts_capture_source_and_no_args(manager: ArtifactManager) -> None:
    @track_artifacts(outputs=["evaluation"], capture_args=False, capture_source=True)
    def evaluate(secret_token: str) -> dict[str, float]:
        return {"accuracy": 0.9}

    manager.init_run("eval")
    evaluate("hunter2")
    manager.finalize_run()
    meta = manager.use_artifact("evaluate-evaluation:v1")
    assert meta.parent_artifacts == ["default/evaluate-source:v1"]
    assert "args" not in meta.metadata
    source = manager.load_artifact("evaluate-source:v1")
    assert "def evaluate(secret_token: str)" in source and "accuracy" in source
    assert manager.use_artifact("evaluate-source:v1").type.value == "code"


def test_track_artifacts_async(manager: ArtifactManager) -> None:
    dataset = _publish_dataset(manager)

    @track_artifacts(inputs=[dataset], outputs=["metrics"])
    async def score(config: dict[str, Any]) -> dict[str, float]:
        await asyncio.sleep(0)
        return {"f1": 0.75}

    run = manager.init_run("async-eval")
    assert asyncio.run(score({"k": 1})) == {"f1": 0.75}
    manager.finalize_run()
    assert run is not None and run.id is not None
    meta = manager.use_artifact("score-metrics:v1")
    assert meta.parent_artifacts == [dataset] and meta.run_id == run.id
    assert meta.metadata["args"] == {"config": {"k": 1}}
    assert manager.load_artifact("score-metrics") == {"f1": 0.75}
    assert manager.get_run(run.id)["inputs"] == [dataset]


def test_track_artifacts_opens_a_run_when_none_is_active(manager: ArtifactManager) -> None:
    dataset = _publish_dataset(manager)
    assert manager.current_run is None
    _tracked_fit_linear()({"lr": 1.0})
    assert manager.current_run is None
    row = next(r for r in _runs(manager) if r.name == "fit_linear")
    assert row.state == "completed"
    meta = manager.use_artifact("fit_linear-model:v1")
    assert meta.run_id == row.id and meta.parent_artifacts == [dataset]
    assert manager.get_run(row.id)["inputs"] == [dataset]


def test_track_artifacts_follows_manager_reset(manager: ArtifactManager,
                                               tmp_path: Path) -> None:
    manager.set_root(tmp_path / "old-store")
    tracked = _tracked_fit_linear()  # decorated at import time in a real program
    fresh = ArtifactManager.reset_instance()
    fresh.set_root(tmp_path / "new-store")
    dataset = _publish_dataset(fresh)
    fresh.init_run("train")
    tracked({"lr": 0.1})  # fails: the stale manager has no run and no 'digits'
    fresh.finalize_run()
    assert fresh.use_artifact("fit_linear-model:v1").parent_artifacts == [dataset]


def test_track_artifacts_failure_in_own_run_is_failed(manager: ArtifactManager) -> None:
    @track_artifacts(outputs=["metrics"])
    def broken() -> dict[str, float]:
        raise ArithmeticError("nope")

    with pytest.raises(ArithmeticError):
        broken()
    assert [(r.name, r.state) for r in _runs(manager)] == [("broken", "failed")]
    assert manager.list_artifacts("broken-metrics") == []


def test_track_artifacts_output_count_mismatch(manager: ArtifactManager, run: Any) -> None:
    @track_artifacts(outputs=["model", "metrics"])
    def one_value() -> dict[str, float]:
        return {"loss": 1.0}

    with pytest.raises(InvalidArgumentError, match="one value per"):
        one_value()


def test_track_artifacts_unknown_input_and_bad_keys(manager: ArtifactManager, run: Any) -> None:
    @track_artifacts(inputs=["missing:v1"], outputs=["metrics"])
    def needs_missing() -> dict[str, float]:
        raise AssertionError("must not run without its input")  # pragma: no cover

    with pytest.raises(LookupError):
        needs_missing()
    with pytest.raises(ValueError):
        track_artifacts(inputs=["../escape"])
    with pytest.raises(ValueError):
        track_artifacts(outputs=["not-a-type"])


def test_track_artifacts_file_outputs(manager: ArtifactManager, run: Any,
                                      tmp_path: Path) -> None:
    @track_artifacts(outputs=["dataset"])
    def export(n: int) -> Path:
        path = tmp_path / "rows.csv"
        path.write_text("\n".join(str(i) for i in range(n)))
        return path

    export(5)
    meta = manager.use_artifact("export-dataset:v1")
    assert meta.format == "file" and meta.size_bytes == len("0\n1\n2\n3\n4")


# -- checkpoint ---------------------------------------------------------------------------------


def _train_step(model: torch.nn.Module) -> None:
    with torch.no_grad():  # every call changes the weights, so every save is a new version
        for p in model.parameters():
            p.add_(1.0)


@pytest.mark.parametrize(("mode", "scores", "best"), [
    ("min", [3.0, 1.0, 2.0, 0.5, 4.0], "v4"),
    ("max", [0.1, 0.7, 0.3, 0.9, 0.8], "v4"),
    ("max", [0.9, 0.1, 0.2], "v1"),
    ("min", [5.0, 4.0, 3.0], "v3"),
])
def test_checkpoint_keeps_best(manager: ArtifactManager, run: Any, mode: str,
                               scores: list[float], best: str) -> None:
    snapshots: list[dict[str, torch.Tensor]] = []

    @checkpoint(frequency="epoch", metric="val", mode=mode)
    def train_epoch(model: torch.nn.Module, score: float) -> dict[str, float]:
        _train_step(model)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"val": score, "loss": 1.0}

    model = torch.nn.Linear(3, 2)
    for score in scores:
        assert train_epoch(model, score) == {"val": score, "loss": 1.0}
    versions = manager.list_artifacts("checkpoint")
    assert [v.version for v in versions] == [f"v{i + 1}" for i in range(len(scores))]
    chosen = manager.use_artifact("checkpoint:best")
    assert chosen.version == best
    assert chosen.metadata["metrics"]["val"] == scores[int(best[1:]) - 1]
    assert chosen.metadata["monitor"] == "val" and chosen.metadata["mode"] == mode
    saved = manager.load_artifact("checkpoint:best")
    assert torch.equal(saved["weight"], snapshots[int(best[1:]) - 1]["weight"])
    assert manager.use_artifact("checkpoint:v2").parent_artifacts == ["default/checkpoint:v1"]


@pytest.mark.parametrize(("mode", "scores"), [("min", [float("nan"), 1.0, 0.5]),
                                              ("max", [float("nan"), 0.5, 1.0])])
def test_checkpoint_nan_score_is_never_best(manager: ArtifactManager, run: Any, mode: str,
                                            scores: list[float]) -> None:
    @checkpoint(metric="loss", mode=mode)
    def step(model: torch.nn.Module, loss: float) -> dict[str, float]:
        _train_step(model)
        return {"loss": loss}

    model = torch.nn.Linear(1, 1)
    for score in scores:
        step(model, score)
    assert manager.use_artifact("checkpoint:best").version == "v3"


def test_checkpoint_every_n_calls(manager: ArtifactManager, run: Any) -> None:
    @checkpoint(frequency=3, metric="loss")
    def step(net: torch.nn.Module, loss: float) -> dict[str, float]:
        _train_step(net)
        return {"loss": loss}

    net = torch.nn.Linear(2, 2)
    for i in range(8):
        step(net, 10.0 - i)
    versions = manager.list_artifacts("checkpoint")
    assert [v.metadata["call"] for v in versions] == [3, 6]
    assert [v.metadata["metrics"]["loss"] for v in versions] == [8.0, 5.0]
    assert manager.use_artifact("checkpoint:best").version == "v2"


def test_checkpoint_save_best_false_sets_no_alias(manager: ArtifactManager, run: Any) -> None:
    @checkpoint(save_best=False)
    def step(network: torch.nn.Module) -> dict[str, float]:
        _train_step(network)
        return {"loss": 1.0}

    step(torch.nn.Linear(1, 1))
    assert len(manager.list_artifacts("checkpoint")) == 1
    with pytest.raises(LookupError):
        manager.use_artifact("checkpoint:best")


def test_checkpoint_async_and_method(manager: ArtifactManager, run: Any) -> None:
    class Loop:
        def __init__(self) -> None:
            self.model = torch.nn.Linear(2, 1)

        @checkpoint(metric="acc", mode="max")
        async def epoch(self, model: torch.nn.Module, acc: float) -> dict[str, float]:
            await asyncio.sleep(0)
            _train_step(model)
            return {"acc": acc}

    loop = Loop()

    async def main() -> None:
        for acc in (0.2, 0.6, 0.4):
            await loop.epoch(loop.model, acc)

    asyncio.run(main())
    assert len(manager.list_artifacts("checkpoint")) == 3
    assert manager.use_artifact("checkpoint:best").version == "v2"


@pytest.mark.parametrize("kwargs", [{"mode": "up"}, {"frequency": 0}, {"frequency": -2},
                                    {"frequency": "hourly"}, {"frequency": True},
                                    {"frequency": 1.5}, {"metric": ""}])
def test_checkpoint_bad_arguments_at_decoration(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError) as info:
        checkpoint(**kwargs)
    assert isinstance(info.value, InvalidArgumentError)
    assert info.value.argument == next(iter(kwargs))


def test_checkpoint_missing_metric_named_at_first_call(manager: ArtifactManager,
                                                       run: Any) -> None:
    calls: list[int] = []

    @checkpoint(metric="val_accuracy")
    def step(model: torch.nn.Module) -> dict[str, float]:
        calls.append(1)
        return {"loss": 0.3}

    with pytest.raises(ValueError, match="val_accuracy"):
        step(torch.nn.Linear(1, 1))
    assert calls == [1]
    assert manager.list_artifacts("checkpoint") == []

    @checkpoint()
    def returns_float(model: torch.nn.Module) -> float:
        return 0.3

    with pytest.raises(ValueError, match="'loss'"):
        returns_float(torch.nn.Linear(1, 1))


def test_checkpoint_without_model_parameter(manager: ArtifactManager, run: Any) -> None:
    @checkpoint()
    def step(weights: torch.nn.Module) -> dict[str, float]:
        return {"loss": 1.0}

    with pytest.raises(ValueError, match="model, net or network"):
        step(torch.nn.Linear(1, 1))

    @checkpoint()
    def not_a_module(model: int) -> dict[str, float]:
        return {"loss": 1.0}

    with pytest.raises(ValueError, match="model"):
        not_a_module(3)
    assert manager.list_artifacts("checkpoint") == []


def test_checkpoint_needs_a_run(manager: ArtifactManager) -> None:
    @checkpoint()
    def step(model: torch.nn.Module) -> dict[str, float]:
        return {"loss": 1.0}

    with pytest.raises(RunStateError):
        step(torch.nn.Linear(1, 1))
