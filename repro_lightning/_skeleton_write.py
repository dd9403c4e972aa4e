"""Encoding a Lightning checkpoint into tensors plus a JSON skeleton, and streaming the file.

Why separate from reading: this half walks *trusted* in-memory objects and must refuse, before a
byte is written, anything it cannot restore exactly; the reading half parses *untrusted* bytes
and must turn every malformation into an IntegrityError. The two share only the vocabulary in
``_skeleton_tags``. :func:`encode` validates and builds the skeleton; :func:`payload` lays out the
safetensors header and returns a ``write(sink)`` that moves one tensor at a time to the CPU. The
format and the public entry point are described in :mod:`repro_lightning._skeleton`.
"""

from __future__ import annotations

import argparse
import base64
import enum
import json
import struct
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from repro_core.errors import InvalidArgumentError, SerializationError
from repro_core.serialize import _ST_DTYPES, _ST_MAX_HEADER, Payload, _Sink
from repro_lightning._skeleton_tags import _ATTRIBUTE_DICTS, _MAX_DEPTH, _PATHS, FORMAT, _short

__all__ = ["CheckpointEncodingError", "encode", "payload"]

_MAX_NAME = 200  # tensor names are for people reading the file; uniqueness comes from "#n"
_FIX = 'convert it to a plain value, or use ReproCallback(checkpoint_format="torch")'
# numpy arrays of these dtypes are stored as typed tensors (readable by any safetensors tool);
# others (complex, big-endian, strings, datetimes) as their raw bytes in a uint8 tensor.
_NUMPY_TYPED = {"bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                "uint64", "float16", "float32", "float64"}


class CheckpointEncodingError(SerializationError):
    """A checkpoint value the safetensors format cannot hold exactly; ``path`` names its key.

    Raised before anything is written, so a refused checkpoint never leaves a partial file."""


# -- encoding -----------------------------------------------------------------------------------


def encode(checkpoint: Mapping[str, Any]) -> tuple[list[tuple[str, torch.Tensor]], dict[str, Any]]:
    """Split ``checkpoint`` into its tensors and a JSON-able skeleton that names them.

    Returns the tensors in first-seen order under unique readable names (``state_dict/l.weight``,
    ``optimizer_states/0/state/3/exp_avg``) and ``{"root": node}``. Everything is validated
    here, before any I/O, so a refused value never leaves half a file behind. One tensor object
    referenced twice is stored once and comes back as one object."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointEncodingError(
            f"the checkpoint is a {type(checkpoint).__qualname__}, not a dict", path="")
    encoder = _Encoder()
    root = encoder.value(checkpoint, "", "", 0)
    return encoder.tensors, {"root": root}


class _Encoder:
    """One depth-first pass: collects tensors and builds the skeleton, refusing what it cannot
    restore exactly with the key path of the offending value."""

    def __init__(self) -> None:
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self._names: set[str] = {"__metadata__"}  # reserved by the format
        self._suffix: dict[str, int] = {}
        self._by_id: dict[int, str] = {}
        self._on_path: set[int] = set()
        self._in_key = False

    def value(self, x: Any, path: str, name: str, depth: int) -> Any:
        kind = type(x)
        if x is None or kind in (str, bool, int):
            return x
        leaf = _LEAVES.get(kind)
        if leaf is not None:
            return leaf(x)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            return ["T", self._tensor(x, path, name)]
        special = self._special(x, path, name, depth)
        if special is not None:
            return special
        tag = _container_tag(x)
        if tag is None:
            raise _refuse(x, path)
        if id(x) in self._on_path:
            raise CheckpointEncodingError(
                f"{_where(path)} contains itself (directly or through its contents); break the "
                "cycle", path=path)
        if depth >= _MAX_DEPTH:
            raise CheckpointEncodingError(
                f"{_where(path)[:200]} is nested more than {_MAX_DEPTH} levels deep; flatten it, "
                'or use ReproCallback(checkpoint_format="torch")', path=path[:200])
        self._on_path.add(id(x))
        node = self._container(tag, x, path, name, depth + 1)
        self._on_path.discard(id(x))
        return node

    def _special(self, x: Any, path: str, name: str, depth: int) -> list[Any] | None:
        """numpy arrays and scalars, OmegaConf configs (and the class Lightning stores with
        OmegaConf hparams); None for anything else."""
        if type(x) is np.ndarray:
            return self._array(x, path, name)  # type: ignore[no-any-return]
        if isinstance(x, np.generic):
            return self._numpy_scalar(x, path, name)  # type: ignore[no-any-return]
        omega = _omegaconf_node(x)
        if omega is None:
            return None
        kind_name, plain = omega
        if plain is _CLASS:
            return ["OCT", kind_name]
        return ["OC", kind_name, self.value(plain, path, name, depth + 1)]

    def _container(self, tag: str, x: Any, path: str, name: str, depth: int) -> list[Any]:
        if tag in ("l", "t"):
            return [tag, [self.value(v, f"{path}[{i}]", _join(name, str(i)), depth)
                          for i, v in enumerate(x)]]
        if tag in ("set", "fs"):
            items = [self._key(v, f"{path} element {_short(v)}", depth) for v in x]
            return [tag, sorted(items, key=_canonical)]
        if tag == "ns":
            return [tag, [[k, self.value(v, f"{path}.{k}", _join(name, k), depth)]
                          for k, v in vars(x).items()]]
        node = [tag, self._pairs(x, path, name, depth)]
        if tag == "AD":
            node.append(type(x).__module__)
        elif tag == "o":
            node.extend(self._ordered_metadata(x, path, name, depth))
        return node

    def _pairs(self, x: Mapping[Any, Any], path: str, name: str, depth: int) -> list[Any]:
        return [[self._key(k, f"{_where(path)} key {_short(k)}", depth),
                 self.value(v, _child(path, k), _join(name, k if type(k) is str else repr(k)),
                            depth)]
                for k, v in x.items()]

    def _ordered_metadata(self, x: Any, path: str, name: str, depth: int) -> list[Any]:
        """torch puts ``_metadata`` on state dicts (``load_state_dict`` reads module versions
        from it); any other attribute would be silently lost, so it is refused."""
        extra = sorted(set(vars(x)) - {"_metadata"})
        if extra:
            raise CheckpointEncodingError(
                f"{_where(path)} is an OrderedDict with attributes {extra[:5]}, which would be "
                f"lost; {_FIX}", path=path)
        if "_metadata" not in vars(x):
            return []
        return [self.value(x._metadata, f"{path}._metadata", _join(name, "_metadata"), depth)]

    def _key(self, k: Any, path: str, depth: int) -> Any:
        """Dict keys and set elements: any encodable hashable value except tensors and arrays,
        whose hash is their identity, which a file cannot restore."""
        self._in_key, outer = True, self._in_key
        node = self.value(k, path, "", depth)
        self._in_key = outer
        return node

    def _tensor(self, t: torch.Tensor, path: str, name: str) -> str:
        if self._in_key:
            raise _refuse(t, path, "a tensor used as a dict key or set element")
        known = self._by_id.get(id(t))
        if known is not None:
            return known
        _check_tensor(t, path)
        unique = self._unique(name)
        self._by_id[id(t)] = unique  # ``t`` stays alive in self.tensors, so its id is stable
        self.tensors.append((unique, t))
        return unique

    def _array(self, a: Any, path: str, name: str) -> list[Any]:
        if self._in_key:
            raise _refuse(a, path, "a numpy array used as a dict key or set element")
        if a.dtype.hasobject or a.dtype.kind == "V":
            raise CheckpointEncodingError(
                f"{_where(path)} is a numpy array of dtype {a.dtype}, which cannot be stored "
                f"without pickle; {_FIX}", path=path)
        data = a if a.flags.c_contiguous and a.flags.writeable else a.copy(order="C")
        if not (a.dtype.isnative and a.dtype.name in _NUMPY_TYPED):
            data = data.reshape(-1).view(np.uint8)
        unique = self._unique(name)
        self.tensors.append((unique, torch.from_numpy(data)))
        return ["nd", unique, a.dtype.str, list(a.shape)]

    def _numpy_scalar(self, x: Any, path: str, name: str) -> list[Any]:
        """Stored as the Python value of ``.item()`` plus the dtype: exact for these kinds
        (wider floats, datetimes and objects would lose precision or need pickle)."""
        kind, size = x.dtype.kind, x.dtype.itemsize
        if not (kind in "biuUS" or (kind == "f" and size <= 8) or (kind == "c" and size <= 16)):
            raise _refuse(x, path, f"a numpy scalar of dtype {x.dtype}")
        return ["npv", x.dtype.str, self.value(x.item(), path, name, 0)]

    def _unique(self, name: str) -> str:
        base = name.encode("utf-8", "backslashreplace").decode("utf-8")[:_MAX_NAME] or "_"
        unique, n = base, self._suffix.get(base, 1)
        while unique in self._names:
            n += 1
            unique = f"{base}#{n}"
        self._suffix[base] = n
        self._names.add(unique)
        return unique


def _check_tensor(t: torch.Tensor, path: str) -> None:
    """Only dense tensors with real data and a dtype safetensors knows can be restored exactly."""
    problem = None
    if t.layout != torch.strided:
        problem = f"a {t.layout} tensor (call .to_dense() first)"
    elif t.device.type == "meta":
        problem = "a meta tensor (a shape without data; materialise it first)"
    elif str(t.dtype).removeprefix("torch.") not in _ST_DTYPES:
        problem = f"a tensor of dtype {t.dtype}, which safetensors cannot store"
    if problem is not None:
        raise CheckpointEncodingError(
            f"{_where(path)} is {problem}; {_FIX}", path=path)


_CLASS = object()
_OMEGA_KINDS = ("DictConfig", "ListConfig")


def _omegaconf_node(x: Any) -> tuple[str, Any] | None:
    """An OmegaConf ``DictConfig``/``ListConfig`` as (kind, plain container, unresolved: the
    interpolations stay as written), or the class itself as (kind, ``_CLASS``) — Lightning
    stores ``type(hparams)`` beside OmegaConf hparams. None for anything else."""
    if isinstance(x, type):
        module, kind_name = x.__module__, x.__name__
        if module.split(".", 1)[0] == "omegaconf" and kind_name in _OMEGA_KINDS:
            return kind_name, _CLASS
        return None
    kind = type(x)
    if kind.__module__.split(".", 1)[0] != "omegaconf" or kind.__name__ not in _OMEGA_KINDS:
        return None
    from omegaconf import OmegaConf

    return kind.__name__, OmegaConf.to_container(x, resolve=False)


def _container_tag(x: Any) -> str | None:
    kind = type(x)
    tag = _CONTAINERS.get(kind)
    if tag is None and kind.__name__ == "AttributeDict" and kind.__module__ in _ATTRIBUTE_DICTS:
        return "AD"
    return tag


def _refuse(x: Any, path: str, found: str | None = None) -> CheckpointEncodingError:
    kind = type(x)
    if found is None:
        found = f"a value of type {kind.__module__}.{kind.__qualname__}"
    if isinstance(x, enum.Enum):
        found = f"the enum member {kind.__qualname__}.{x.name} (store its .value instead)"
    elif isinstance(x, torch.nn.Module):
        found += " (keep modules out of hyper-parameters: save_hyperparameters(ignore=[...]))"
    elif isinstance(x, torch.Tensor) and found.startswith("a value"):
        found = f"a tensor subclass {kind.__module__}.{kind.__qualname__}"
    return CheckpointEncodingError(
        f"{_where(path)} is {found}, which a safetensors checkpoint cannot hold without pickle; "
        f"{_FIX}", path=path)


def _where(path: str) -> str:
    return path or "the checkpoint"


def _child(path: str, key: Any) -> str:
    if path:
        return f"{path}[{key!r}]"
    return key if type(key) is str else f"[{key!r}]"


def _join(name: str, part: str) -> str:
    return f"{name}/{part}" if name else part


def _canonical(node: Any) -> str:
    return json.dumps(node, separators=(",", ":"))


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(data).decode("ascii")


_LEAVES: dict[type, Callable[[Any], Any]] = {
    float: lambda x: ["f", repr(x)],
    complex: lambda x: ["c", repr(x.real), repr(x.imag)],
    bytes: lambda x: ["b", _b64(x)],
    bytearray: lambda x: ["ba", _b64(x)],
    torch.dtype: lambda x: ["dt", str(x).removeprefix("torch.")],
    torch.device: lambda x: ["dev", str(x)],
    torch.Size: lambda x: ["S", list(x)],
    **{kind: (lambda x: ["P", _PATHS[type(x)], str(x)]) for kind in _PATHS},
}
_CONTAINERS: dict[type, str] = {list: "l", tuple: "t", dict: "d", OrderedDict: "o",
                                set: "set", frozenset: "fs", argparse.Namespace: "ns"}


# -- writing ------------------------------------------------------------------------------------


def payload(checkpoint: Mapping[str, Any],
            extra_metadata: dict[str, str] | None = None) -> Payload:
    """Validate and lay out ``checkpoint``; the returned ``write(sink)`` streams the file.

    The header (with ``__metadata__`` = format, skeleton and ``extra_metadata``) is built here,
    so every refusal happens before a byte is written; ``write`` then moves one tensor at a time
    to the CPU, keeping peak memory at one tensor rather than a second copy of the model."""
    extra = dict(extra_metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()) or (
            {"format", "skeleton"} & extra.keys()):
        raise InvalidArgumentError(
            "extra_metadata must map str to str and may not set 'format' or 'skeleton'",
            argument="extra_metadata")
    tensors, skeleton = encode(checkpoint)
    metadata = {"format": FORMAT, "skeleton": _canonical(skeleton), **extra}
    # Largest element size first keeps every tensor naturally aligned (the header is 8-aligned).
    entries = sorted(tensors, key=lambda e: (-e[1].element_size(), e[0]))
    header = _header(entries, metadata)
    sizes = [t.numel() * t.element_size() for _, t in entries]
    return Payload("safetensors", lambda sink: _stream(sink, header, entries, sizes))


def _header(entries: list[tuple[str, torch.Tensor]], metadata: dict[str, str]) -> bytes:
    """The safetensors header, as ``_write_safetensors`` lays it out plus ``__metadata__``."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, tensor in entries:
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _ST_DTYPES[str(tensor.dtype).removeprefix("torch.")],
                        "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("ascii")
    encoded += b" " * (-len(encoded) % 8)
    if len(encoded) > _ST_MAX_HEADER:
        raise CheckpointEncodingError(
            f"the checkpoint's non-tensor values and names take {len(encoded)} bytes of JSON, "
            f"more than a safetensors header may hold ({_ST_MAX_HEADER}); store large data as "
            'tensors, or use ReproCallback(checkpoint_format="torch")', path="")
    return struct.pack("<Q", len(encoded)) + encoded


def _stream(sink: _Sink, header: bytes, entries: list[tuple[str, torch.Tensor]],
            sizes: list[int]) -> None:
    sink.write(header)
    for (name, tensor), size in zip(entries, sizes, strict=True):
        if size == 0:
            continue
        flat = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy()
        if data.nbytes != size:  # resized in place since payload(): the header would lie
            raise SerializationError(f"tensor {name!r} changed size while the checkpoint was "
                                     "written; write it again", path=name)
        sink.write(data.data)
