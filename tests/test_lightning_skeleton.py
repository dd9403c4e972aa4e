"""The pickle-free Lightning checkpoint codec: exact round trips (types included) of a real
Trainer's checkpoint and of every supported value, refusals that name the key, forged files
that fail typed, and a pinned, deterministic byte layout."""

from __future__ import annotations

import argparse
import enum
import hashlib
import io
import json
import math
import pathlib
import pickle
import struct
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict as FabricAttributeDict
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.utilities.parsing import AttributeDict
from safetensors.torch import load_file, save_file

from repro_core.errors import IntegrityError, InvalidArgumentError, SerializationError
from repro_lightning import _skeleton_tags as sk
from repro_lightning._skeleton import (
    FORMAT,
    CheckpointEncodingError,
    decode,
    encode,
    is_repro_checkpoint,
    load,
    payload,
    read_metadata,
)

# -- helpers ------------------------------------------------------------------------------------


def assert_same(a: Any, b: Any, where: str = "checkpoint") -> None:
    """Deep equality that also demands the same types, key order, float bits (nan, -0.0),
    tensor dtypes/shapes and ``OrderedDict._metadata``."""
    assert type(a) is type(b) or (type(a) is torch.nn.Parameter and type(b) is torch.Tensor), (
        f"{where}: {type(a)} != {type(b)}")
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert _bits(a) == _bits(b), where
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), where
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b) or (math.isnan(a) and math.isnan(b))
    elif isinstance(a, np.generic):
        assert (a.dtype, a.tobytes()) == (b.dtype, b.tobytes()), where
    elif isinstance(a, (dict, list, tuple, argparse.Namespace)):
        _assert_same_container(a, b, where)
    else:
        assert a == b, where


def _assert_same_container(a: Any, b: Any, where: str) -> None:
    if isinstance(a, argparse.Namespace):
        assert_same(vars(a), vars(b), where)
    elif isinstance(a, dict):
        assert len(a) == len(b), where
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True):
            assert_same(ka, kb, f"{where} key {ka!r}")
            assert_same(va, vb, f"{where}[{ka!r}]")
        if isinstance(a, OrderedDict):
            assert hasattr(a, "_metadata") == hasattr(b, "_metadata"), where
            assert_same(getattr(a, "_metadata", None), getattr(b, "_metadata", None), where)
    else:
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")


def _bits(t: torch.Tensor) -> list[int]:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).tolist()


def write(checkpoint: Any, path: Path, extra: dict[str, str] | None = None) -> Path:
    with open(path, "wb") as f:
        payload(checkpoint, extra).write(f)
    return path


def forge(path: Path, skeleton: str | None, fmt: str | None = FORMAT,
          tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A well-formed safetensors file whose metadata says whatever the test wants."""
    metadata = {k: v for k, v in (("format", fmt), ("skeleton", skeleton)) if v is not None}
    save_file(tensors or {"x": torch.zeros(2)}, str(path), metadata=metadata)
    return path


def assert_forged(path: Path) -> IntegrityError:
    with pytest.raises(IntegrityError) as info:
        load(path)
    assert info.value.path == path
    assert str(path) in str(info.value)
    return info.value


# -- a real Lightning checkpoint ----------------------------------------------------------------


class _Model(BoringModel):
    def __init__(self, lr: float = 0.1, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        super().__init__()
        self.save_hyperparameters()

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.step(batch)
        self.log("val_loss", loss)
        return {"x": loss}

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr, betas=self.hparams.betas)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1)]


@pytest.fixture(scope="module")
def trainer_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """What ``checkpoint_io.save_checkpoint`` receives after two real training steps."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("trainer")
    trainer = pl.Trainer(
        default_root_dir=root, max_steps=2, limit_train_batches=2, limit_val_batches=1,
        accelerator="cpu", enable_progress_bar=False, logger=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=root, monitor="val_loss", save_top_k=2),
                   EarlyStopping(monitor="val_loss")])
    trainer.fit(_Model())
    checkpoint = trainer._checkpoint_connector.dump_checkpoint()
    # What a mixed-precision run adds (GradScaler.state_dict()), which a CPU run does not.
    checkpoint["MixedPrecision"] = {"scale": 65536.0, "growth_factor": 2.0,
                                    "backoff_factor": 0.5, "growth_interval": 2000,
                                    "_growth_tracker": 3}
    return checkpoint


def test_real_checkpoint_has_what_the_codec_must_preserve(trainer_checkpoint: dict) -> None:
    ck = trainer_checkpoint
    assert isinstance(ck["state_dict"], OrderedDict) and ck["state_dict"]._metadata
    assert 0 in ck["optimizer_states"][0]["state"]
    assert ck["hyper_parameters"]["betas"] == (0.9, 0.99)
    callbacks = ck["callbacks"]
    assert any(isinstance(v.get("best_model_score"), torch.Tensor) for v in callbacks.values())


def test_real_checkpoint_round_trips_in_memory(trainer_checkpoint: dict) -> None:
    tensors, skeleton = encode(trainer_checkpoint)
    json.dumps(skeleton, allow_nan=False)  # JSON-able, no bare NaN
    assert_same(trainer_checkpoint, decode(skeleton, dict(tensors)))
    names = [name for name, _ in tensors]
    assert len(names) == len(set(names))
    assert "state_dict/layer.weight" in names
    assert "optimizer_states/0/state/0/exp_avg" in names
    assert "optimizer_states/0/state/1/step" in names


def test_real_checkpoint_round_trips_through_a_file(trainer_checkpoint: dict,
                                                    tmp_path: Path) -> None:
    path = write(trainer_checkpoint, tmp_path / "last.ckpt", {"repro.run": "r1"})
    assert is_repro_checkpoint(path)
    assert read_metadata(path)["repro.run"] == "r1"
    loaded = load(path)
    assert_same(trainer_checkpoint, loaded)
    assert loaded["state_dict"]._metadata == trainer_checkpoint["state_dict"]._metadata
    # An ordinary safetensors reader sees every tensor under its readable name.
    plain = load_file(str(path))
    assert torch.equal(plain["state_dict/layer.weight"], trainer_checkpoint["state_dict"]
                       ["layer.weight"])


def test_resume_state_is_equivalent(trainer_checkpoint: dict, tmp_path: Path) -> None:
    loaded = load(write(trainer_checkpoint, tmp_path / "c.ckpt"))
    model = _Model()
    model.load_state_dict(loaded["state_dict"], strict=True)
    for key, value in trainer_checkpoint["state_dict"].items():
        assert torch.equal(model.state_dict()[key], value)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, betas=(0.9, 0.99))
    optimizer.load_state_dict(loaded["optimizer_states"][0])
    original = trainer_checkpoint["optimizer_states"][0]
    resumed = optimizer.state_dict()
    assert_same(original["param_groups"], resumed["param_groups"])
    assert resumed["state"].keys() == original["state"].keys()
    for index, state in original["state"].items():
        for name, tensor in state.items():
            assert torch.equal(resumed["state"][index][name], tensor), (index, name)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    scheduler.load_state_dict(loaded["lr_schedulers"][0])
    assert_same(trainer_checkpoint["lr_schedulers"][0], scheduler.state_dict())


def test_load_never_unpickles(trainer_checkpoint: dict, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(trainer_checkpoint, tmp_path / "c.ckpt")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("unpickling during load")

    class NoUnpickler:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            refuse()

    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert_same(trainer_checkpoint, load(path))
    torch_file = tmp_path / "torch.ckpt"
    with open(torch_file, "wb") as f:
        f.write(b"\x80\x02}q\x00.")  # a pickle: refused without being unpickled
    assert not is_repro_checkpoint(torch_file)
    assert_forged(torch_file)


# -- every supported value ----------------------------------------------------------------------


def _edge_checkpoint() -> dict[str, Any]:
    sd: OrderedDict[str, Any] = OrderedDict(w=torch.arange(6.0).reshape(2, 3))
    sd._metadata = OrderedDict([("", {"version": 1}), ("w", {"version": 2})])  # type: ignore[attr-defined]
    base = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    return {
        "floats": [float("nan"), float("inf"), float("-inf"), -0.0, 0.1, 1e300, 5e-324],
        "none": None, "bools": [True, False], "big": 2**80, "neg": -(2**70), "text": "ü\ud800/#",
        "nested": {"a": (1, (2.5, (None, ())), [])}, "empty": [[], (), {}, set(), ""],
        "keys": {0: "int", -1: "neg", (1, "a"): "tuple", None: "none", 2.5: "float",
                 True: "bool", "": "empty", frozenset({1}): "frozenset", b"k": "bytes"},
        "odict": OrderedDict([("b", 1), ("a", 2)]), "sd": sd,
        "bytes": b"\x00\xff\x80", "bytearray": bytearray(b"xy"), "complex": complex(1.5, -0.0),
        "sets": [{3, 1, 2}, frozenset({"b", "a"}), {(1, 2), (None,)}],
        "paths": [Path("/tmp/x.ckpt"), pathlib.PurePosixPath("a/b"),
                  pathlib.PureWindowsPath("C:\\x\\y")],
        "ns": argparse.Namespace(lr=0.01, layers=[1, 2], sub=argparse.Namespace(x=None)),
        "ad": AttributeDict(lr=1e-3, betas=(0.9, 0.999)), "fad": FabricAttributeDict(a=1),
        "dtypes": [torch.float32, torch.bfloat16, torch.complex64, torch.int8],
        "devices": [torch.device("cpu"), torch.device("cuda", 1), torch.device("meta")],
        "size": torch.Size([2, 0, 3]),
        "tensors": {
            "bf16": torch.tensor([1.5, -2.0, float("nan")], dtype=torch.bfloat16),
            "f16": torch.tensor([[0.5, -0.0]], dtype=torch.float16),
            "f64": torch.tensor([float("inf"), 1 / 3], dtype=torch.float64),
            "bool": torch.tensor([True, False, True]), "i8": torch.tensor([-128, 127],
                                                                          dtype=torch.int8),
            "u8": torch.tensor([0, 255], dtype=torch.uint8), "scalar": torch.tensor(7),
            "empty": torch.empty(0, 3), "noncontig": base.t(), "slice": base[:, 1],
            "param": torch.nn.Parameter(torch.ones(2)), "f8": torch.ones(2).to(torch.float8_e4m3fn),
            "u16": torch.tensor([1, 65535], dtype=torch.uint16),
            "\ud800 surrogate": torch.ones(1),
        },
        "numpy": {
            "f32": np.arange(6, dtype=np.float32).reshape(2, 3), "scalar0d": np.array(3.5),
            "be": np.array([1.0, 2.0], dtype=">f8"), "str": np.array(["ab", "ü"]),
            "c128": np.array([1 + 2j]), "bool": np.array([True, False]),
            "empty": np.zeros((0, 2), dtype=np.int16), "noncontig": np.arange(10)[::3],
            "datetime": np.array(["2024-01-01"], dtype="datetime64[D]"),
            "u64": np.array([2**64 - 1], dtype=np.uint64),
        },
        "np_scalars": [np.float64(0.1), np.float32(1 / 3), np.float16(-0.0), np.int64(-5),
                       np.uint64(2**64 - 1), np.bool_(True), np.str_("s"), np.bytes_(b"b"),
                       np.complex64(1 - 1j), np.int8(-128)],
    }


def test_edge_values_round_trip(tmp_path: Path) -> None:
    checkpoint = _edge_checkpoint()
    tensors, skeleton = encode(checkpoint)
    assert_same(checkpoint, decode(skeleton, dict(tensors)))
    loaded = load(write(checkpoint, tmp_path / "edge.ckpt"))
    assert_same(checkpoint, loaded)
    assert loaded["tensors"]["noncontig"].is_contiguous()
    assert type(loaded["paths"][0]) is type(Path("/x"))
    assert loaded["ad"].lr == 1e-3  # still an AttributeDict: attribute access works


def test_shared_tensor_object_is_stored_once_views_separately(tmp_path: Path) -> None:
    weight = torch.randn(4, 3)
    checkpoint = {"a": weight, "b": weight, "view": weight[1:], "t": {"x": weight}}
    tensors, _ = encode(checkpoint)
    assert [name for name, _ in tensors] == ["a", "view"]
    loaded = load(write(checkpoint, tmp_path / "c.ckpt"))
    assert loaded["a"] is loaded["b"] is loaded["t"]["x"]
    assert torch.equal(loaded["view"], weight[1:])


def test_tensor_names_are_unique_readable_and_escaped() -> None:
    t = [torch.zeros(1) for _ in range(5)]
    checkpoint = {"a/b": t[0], "a": {"b": t[1], "b#2": t[2]}, "__metadata__": t[3],
                  7: {("k", 1): t[4]}}
    names = [name for name, _ in encode(checkpoint)[0]]
    assert names == ["a/b", "a/b#2", "a/b#2#2", "__metadata__#2", "7/('k', 1)"]


def test_golden_skeleton_and_deterministic_bytes(tmp_path: Path) -> None:
    sd: OrderedDict[str, Any] = OrderedDict(w=torch.tensor([1.0, 2.0]))
    sd._metadata = OrderedDict([("", {"version": 1})])  # type: ignore[attr-defined]
    checkpoint = {"epoch": 1, "lr": 0.5, "betas": (0.9, float("nan")), "state_dict": sd,
                  "optimizer_states": [{"state": {0: {"step": torch.tensor(2.0)}},
                                        "param_groups": [{"params": [0], "foreach": None}]}]}
    _, skeleton = encode(checkpoint)
    assert json.dumps(skeleton, separators=(",", ":")) == (
        '{"root":["d",[["epoch",1],["lr",["f","0.5"]],["betas",["t",[["f","0.9"],["f","nan"]]]],'
        '["state_dict",["o",[["w",["T","state_dict/w"]]],["o",[["",["d",[["version",1]]]]]]]],'
        '["optimizer_states",["l",[["d",[["state",["d",[[0,["d",[["step",["T",'
        '"optimizer_states/0/state/0/step"]]]]]]]],["param_groups",["l",[["d",[["params",'
        '["l",[0]]],["foreach",null]]]]]]]]]]]]]}')
    first, second = io.BytesIO(), io.BytesIO()
    payload(checkpoint).write(first)
    payload(checkpoint).write(second)
    assert first.getvalue() == second.getvalue()
    assert hashlib.sha256(first.getvalue()).hexdigest() == GOLDEN_SHA256
    (length,) = struct.unpack("<Q", first.getvalue()[:8])
    assert length % 8 == 0  # header padded: tensor data stays aligned
    assert_same(checkpoint, load(write(checkpoint, tmp_path / "g.ckpt")))


GOLDEN_SHA256 = "14fd2b744c3942ca9e255fe0b846578f5ed64ed2c1f8481b1aa763388eaca7d7"


def test_tensors_are_laid_out_largest_element_first(tmp_path: Path) -> None:
    checkpoint = {"a": torch.ones(3, dtype=torch.uint8), "b": torch.ones(1, dtype=torch.float64),
                  "c": torch.ones(2, dtype=torch.float16)}
    path = write(checkpoint, tmp_path / "c.ckpt")
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    assert [header[n]["data_offsets"][0] for n in ("b", "c", "a")] == [0, 8, 12]


# -- map_location -------------------------------------------------------------------------------


@pytest.mark.parametrize("location", [None, "cpu", torch.device("cpu"), {"cuda:1": "cuda:0"},
                                      {"cpu": "cpu"}, lambda storage, loc: storage,
                                      lambda storage, loc: None])
def test_map_location_to_cpu(location: Any, tmp_path: Path) -> None:
    checkpoint = {"w": torch.arange(4.0).reshape(2, 2)[:, 1], "n": np.ones(2)}
    loaded = load(write(checkpoint, tmp_path / "c.ckpt"), map_location=location)
    assert_same(checkpoint, loaded)


@pytest.mark.parametrize("location", ["meta", torch.device("meta"), {"cpu": "meta"},
                                      lambda s, loc: torch.UntypedStorage(s.nbytes(),
                                                                          device="meta")])
def test_map_location_moves_tensors_but_not_numpy(location: Any, tmp_path: Path) -> None:
    loaded = load(write({"w": torch.ones(2, 3), "n": np.ones(2)}, tmp_path / "c.ckpt"),
                  map_location=location)
    assert loaded["w"].device.type == "meta" and loaded["w"].shape == (2, 3)
    assert isinstance(loaded["n"], np.ndarray)


def test_map_location_errors_are_the_callers(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="map_location must be"):
        load(tmp_path / "does-not-exist", map_location=3)
    path = write({"w": torch.ones(1)}, tmp_path / "c.ckpt")

    def broken(storage: Any, location: str) -> Any:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):  # not reported as a damaged file
        load(path, map_location=broken)


# -- refusals -----------------------------------------------------------------------------------


class _Color(enum.Enum):
    RED = 1


class _Custom:
    pass


_sparse = torch.eye(2).to_sparse()


@pytest.mark.parametrize(("checkpoint", "path"), [
    ({"hyper_parameters": {"encoder": torch.nn.Linear(1, 1)}}, "hyper_parameters['encoder']"),
    ({"hyper_parameters": {"act": lambda x: x}}, "hyper_parameters['act']"),
    ({"callbacks": {"cb": {"mode": _Color.RED}}}, "callbacks['cb']['mode']"),
    ({"loops": [1, _Custom()]}, "loops[1]"),
    ({"x": {"y": _sparse}}, "x['y']"),
    ({"x": torch.empty(2, device="meta")}, "x"),
    ({"x": torch.ones(2, dtype=torch.complex64)}, "x"),
    ({"x": np.array([object()], dtype=object)}, "x"),
    ({"x": {torch.ones(1): 1}}, "x key tensor"),
    ({"x": {(1, torch.ones(1)): 1}}, "x key (1, tensor"),
    ({"x": defaultdict(list)}, "x"),
    ({"x": {"y": np.datetime64("2024-01-01")}}, "x['y']"),
    ({"x": _Color}, "x"),
    ({"x": OrderedDict(a=1)}, "x"),  # with an extra attribute, set below
    ({3: print}, "[3]"),
])
def test_unrepresentable_values_are_refused_by_key(checkpoint: dict, path: str,
                                                   tmp_path: Path) -> None:
    if isinstance(checkpoint.get("x"), OrderedDict):
        checkpoint["x"].extra = 1
    target = tmp_path / "c.ckpt"
    with pytest.raises(CheckpointEncodingError) as info, open(target, "wb") as f:
        payload(checkpoint).write(f)
    message = str(info.value)
    assert path in message and 'checkpoint_format="torch"' in message, message
    assert isinstance(info.value, SerializationError) and isinstance(info.value, TypeError)
    assert target.read_bytes() == b""  # refused before the first byte


def test_module_refusal_says_how_to_keep_it_out() -> None:
    with pytest.raises(CheckpointEncodingError, match=r"save_hyperparameters\(ignore"):
        encode({"hyper_parameters": {"encoder": torch.nn.Linear(1, 1)}})


def test_cycles_and_depth_are_refused_clearly() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(CheckpointEncodingError, match="contains itself") as info:
        encode({"loops": loop})
    assert info.value.path == "loops[1]"
    deep: Any = []
    for _ in range(sk._MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(CheckpointEncodingError, match="nested more than"):
        encode({"deep": deep})
    shared = [1]
    assert_same(decode(*reversed(encode({"a": shared, "b": shared}))),  # not a cycle
                {"a": [1], "b": [1]})


def test_extra_metadata_is_checked() -> None:
    for bad in ({"format": "x"}, {"skeleton": "x"}, {"k": 1}):
        with pytest.raises(InvalidArgumentError):
            payload({}, bad)  # type: ignore[arg-type]


def test_omegaconf_hparams_round_trip_unresolved(tmp_path: Path) -> None:
    """Lightning stores OmegaConf hparams as the config itself plus its class
    (``hparams_type``); both come back, interpolations as written, without pickle."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    hparams = OmegaConf.create({"lr": 0.1, "model": {"width": 8, "name": "${lr}"},
                                "layers": [1, 2]})
    checkpoint = {"hyper_parameters": hparams, "hparams_type": DictConfig,
                  "extra": OmegaConf.create([1, {"a": None}]), "kind": ListConfig}
    back = load(write(checkpoint, tmp_path / "oc.ckpt"))
    assert type(back["hyper_parameters"]) is DictConfig and back["hparams_type"] is DictConfig
    assert OmegaConf.to_container(back["hyper_parameters"]) == OmegaConf.to_container(hparams)
    assert back["hyper_parameters"].model.name == 0.1  # the interpolation still resolves
    assert type(back["extra"]) is ListConfig and back["kind"] is ListConfig
    assert OmegaConf.to_container(back["extra"]) == [1, {"a": None}]


# -- forged and foreign files -------------------------------------------------------------------


def _deep(levels: int) -> str:
    return '{"root":["d",[["a",' + '["l",[' * levels + "1" + "]]" * levels + "]]]}"


@pytest.mark.parametrize("skeleton", [
    "{not json", "[]", '{"root":["d",[]],"more":1}', '{"root":["l",[]]}',
    '{"root":["d",[["a",["T","missing"]]]]}', '{"root":["d",[["a",["zz",1]]]]}',
    '{"root":["d",[["a",1.5]]]}', '{"root":["d",[["a",{"x":1}]]]}', '{"root":["d",[["a",[]]]]}',
    '{"root":["d",[["a",["T",1]]]]}', '{"root":["d",[["a",["l",[],1]]]]}',
    '{"root":["d",[["a",["f","x"]]]]}', '{"root":["d",[["a",["b","!!"]]]]}',
    '{"root":["d",[["a",["dev","nonsense:x"]]]]}', '{"root":["d",[["a",["dt","load"]]]]}',
    '{"root":["d",[["a",["P","nt","x"]]]]}', '{"root":["d",[["a",["AD",[],"os"]]]]}',
    '{"root":["d",[["a",["nd","x","|O",[2]]]]]}', '{"root":["d",[["a",["nd","x","<f4",[3]]]]]}',
    '{"root":["d",[["a",["nd","x","<f4",[-1]]]]]}', '{"root":["d",[["a",["npv","|O",1]]]]}',
    '{"root":["d",[["a",["npv","<i1",1000]]]]}', '{"root":["d",[[["l",[]],1]]]}',
    '{"root":["d",[["a",["ns",[[1,2]]]]]]}', '{"root":["d",[["a",["S",[true]]]]]}',
    '{"root":["d",[["a",["d",[[1]]]]]]}', '{"root":["d",[["a",["set",[["l",[]]]]]]]}',
    '{"root":["d",[["a",["nd","x","<f4",[2]]],["b",["nd","x","<f4",[2]]]]]}',
    '{"root":["d",[["a",["o",[],1,2]]]]}', '{"root":["d",[["a",["npv","not a dtype",1]]]]}',
    '{"root":["d",[["a",["OC","Evil",["d",[]]]]]]}', '{"root":["d",[["a",["OCT","os"]]]]}',
    '{"root":["d",[["a",["OC","DictConfig",["l",[]]]]]]}', '{"root":["d",[["a",["OC"]]]]}',
    _deep(100_000), _deep(sk._MAX_DEPTH + 50),
])
def test_forged_skeletons_fail_typed(skeleton: str, tmp_path: Path) -> None:
    path = forge(tmp_path / "forged.ckpt", skeleton)
    assert is_repro_checkpoint(path)  # the header claims it; the content is what is wrong
    assert_forged(path)


def test_forged_metadata_and_foreign_files(tmp_path: Path) -> None:
    cases = {
        "plain-safetensors": forge(tmp_path / "a", None, fmt=None),
        "other-format": forge(tmp_path / "b", '{"root":["d",[]]}', fmt="something/2"),
        "no-skeleton": forge(tmp_path / "c", None),
    }
    for name, path in cases.items():
        assert is_repro_checkpoint(path) == (name == "no-skeleton"), name
        assert_forged(path)


def test_truncated_and_garbage_files(trainer_checkpoint: dict, tmp_path: Path) -> None:
    good = write(trainer_checkpoint, tmp_path / "good.ckpt").read_bytes()
    (length,) = struct.unpack("<Q", good[:8])
    cases = {
        "data-cut": good[: 8 + length + 10],
        "header-cut": good[: 8 + length // 2],
        "short": good[:5], "empty": b"",
        "huge-length": struct.pack("<Q", 2**62) + good[8:],
        "header-not-json": struct.pack("<Q", 8) + b"{{{{{{{{",
        "header-not-object": struct.pack("<Q", 8) + b"[1]     ",
        "header-bomb": struct.pack("<Q", 200_000) + b"[" * 200_000,
        "bad-offsets": _with_header(good, lambda h: _shift_first_tensor(h)),
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert is_repro_checkpoint(path) == (name in ("data-cut", "bad-offsets")), name
        error = assert_forged(path)
        assert not isinstance(error, (KeyError, RecursionError)), name


def _with_header(raw: bytes, change: Any) -> bytes:
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:]


def _shift_first_tensor(header: dict) -> None:
    first = next(k for k in header if k != "__metadata__")
    start, stop = header[first]["data_offsets"]
    header[first]["data_offsets"] = [start + 4, stop + 4]


def test_torch_files_and_directories_are_not_repro_checkpoints(tmp_path: Path) -> None:
    zipped, legacy = tmp_path / "zip.ckpt", tmp_path / "legacy.ckpt"
    torch.save({"w": torch.ones(2)}, zipped)
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    for path in (zipped, legacy):
        assert not is_repro_checkpoint(path)
        assert_forged(path)
    assert not is_repro_checkpoint(tmp_path)
    assert not is_repro_checkpoint(tmp_path / "missing.ckpt")
    assert not is_repro_checkpoint(f"{tmp_path}/nul\0byte")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.ckpt")


def test_forged_decode_input_fails_typed() -> None:
    for skeleton in ({"root": ["d", [["a", ["T", "x"]]]]}, {"nope": 1}, None, ["d", []]):
        with pytest.raises(IntegrityError):
            decode(skeleton, {})


def test_a_tensor_resized_before_the_write_is_caught() -> None:
    weight = torch.ones(4)
    pending = payload({"w": weight})
    weight.resize_(2)
    with pytest.raises(SerializationError, match="changed size"):
        pending.write(io.BytesIO())
