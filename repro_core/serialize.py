"""Turn in-memory ``data`` into bytes for the store, validating everything before any I/O.

``prepare(data)`` inspects the value and returns a :class:`Payload` whose ``write`` streams the
bytes into a :class:`~repro_core.store.local.BlobWriter`. Formats:

=============  ===========================================  ================================
format         accepted ``data``                            written as
=============  ===========================================  ================================
``json``       dict / list (str keys, finite numbers)       canonical JSON (sorted keys)
``text``       str                                          UTF-8
``bytes``      bytes, bytearray, memoryview                 raw
``safetensors`` dict[str, torch.Tensor]                     safetensors, streamed per tensor
``npy``        numpy.ndarray (not object dtype)             ``.npy`` (``numpy.save``)
=============  ===========================================  ================================

torch and numpy are imported only when such a value is actually given.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import SerializationError

__all__ = ["Payload", "canonical_json", "load_payload", "prepare"]


class _Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


@dataclass(frozen=True)
class Payload:
    """Validated data, ready to be streamed into a blob."""

    format: str
    write: Callable[[_Sink], None]


def prepare(data: object) -> Payload:
    """Validate ``data`` and choose its format; raise ``SerializationError`` if unsupported."""
    if isinstance(data, str):
        encoded = data.encode("utf-8")
        return Payload("text", lambda sink: _write(sink, encoded))
    if isinstance(data, (bytes, bytearray, memoryview)):
        raw = bytes(data) if isinstance(data, memoryview) else data
        return Payload("bytes", lambda sink: _write(sink, raw))
    if _is_tensor_dict(data):
        return _prepare_tensors(data)  # type: ignore[arg-type]
    if _module_of(data) == "numpy" and type(data).__name__ == "ndarray":
        return _prepare_numpy(data)
    if isinstance(data, (Mapping, list, tuple)):
        encoded = canonical_json(data, root="data")
        return Payload("json", lambda sink: _write(sink, encoded))
    raise SerializationError(
        f"cannot log data of type {type(data).__module__}.{type(data).__qualname__}; pass a "
        "dict/list (JSON), str, bytes, dict[str, torch.Tensor], numpy array, or save it to a "
        "file and pass file_path=",
        path="data",
    )


def canonical_json(value: object, *, root: str = "value") -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8; same value → same bytes.

    Rejects what JSON would silently change or cannot express (non-str keys, NaN/inf, sets,
    arbitrary objects) with the path of the offending entry, e.g. ``data['lr'][2]``.
    """
    _check_json(value, root)
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SerializationError(
            f"{root} holds a string that is not valid Unicode (a lone surrogate, e.g. from a "
            f"mis-decoded file name): {exc}; decode it properly or store it as bytes",
            path=root,
        ) from exc


_MAX_DEPTH = 500
_LEAVE = object()  # stack marker: the container below it is no longer on the current path


def _check_json(value: object, path: str) -> None:
    """Depth-first, iterative; the containers on the current path are tracked by id, so data
    that contains itself is an error at once (shared, non-cyclic sub-objects are fine)."""
    on_path: set[int] = set()
    stack: list[tuple[object, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if where is _LEAVE:  # type: ignore[comparison-overlap]
            on_path.discard(id(item))
            continue
        if item is None or isinstance(item, (str, bool, int)):
            continue
        if isinstance(item, float):
            _check_float(item, where)
            continue
        if isinstance(item, (Mapping, list, tuple)):
            _enter(item, where, depth, on_path)
            stack.append((item, _LEAVE, depth))  # type: ignore[arg-type]
            stack.extend(_children(item, where, depth))
            continue
        raise SerializationError(
            f"{where} is a {type(item).__module__}.{type(item).__qualname__}, which is not "
            "JSON-serializable; convert it to str/int/float/bool/list/dict first",
            path=where,
        )


def _check_float(item: float, where: str) -> None:
    if not math.isfinite(item):
        raise SerializationError(
            f"{where} is {item!r}, which JSON cannot represent; store it as a string or None",
            path=where,
        )


def _enter(item: object, where: str, depth: int, on_path: set[int]) -> None:
    if id(item) in on_path:
        raise SerializationError(
            f"{where} is a container that contains itself (directly or through its contents); "
            "the data would contain itself for ever: break the cycle", path=where)
    if depth >= _MAX_DEPTH:
        raise SerializationError(
            f"{where[:200]}… is nested more than {_MAX_DEPTH} levels deep; flatten it",
            path=where[:200])
    on_path.add(id(item))


def _children(item: Mapping[Any, Any] | list[Any] | tuple[Any, ...], where: str,
              depth: int) -> list[tuple[object, str, int]]:
    if not isinstance(item, Mapping):
        return [(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(item)]
    for k in item:
        if not isinstance(k, str):
            raise SerializationError(
                f"{where} has a key {k!r} of type {type(k).__name__}; JSON keys must be str "
                "(convert it with str() if that is what you mean)",
                path=where,
            )
    return [(v, f"{where}[{k!r}]", depth + 1) for k, v in item.items()]


def _write(sink: _Sink, data: bytes | bytearray) -> None:
    sink.write(data)


def _module_of(value: object) -> str:
    return type(value).__module__.split(".", 1)[0]


def _is_tensor_dict(data: object) -> bool:
    if not isinstance(data, Mapping) or not data:
        return False
    return any(_module_of(v) == "torch" for v in data.values())


# -- safetensors --------------------------------------------------------------------------------

_ST_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def _prepare_tensors(tensors: Mapping[str, Any]) -> Payload:
    import torch

    entries = []
    for key, tensor in tensors.items():
        where = f"data[{key!r}]"
        if not isinstance(key, str):
            raise SerializationError(f"tensor dict key {key!r} must be a str", path=where)
        if not isinstance(tensor, torch.Tensor):
            raise SerializationError(
                f"{where} is a {type(tensor).__name__}; a tensor dict may hold only tensors",
                path=where,
            )
        if tensor.layout != torch.strided:
            raise SerializationError(
                f"{where} is a {tensor.layout} tensor; call .to_dense() first", path=where
            )
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _ST_DTYPES:
            raise SerializationError(
                f"{where} has dtype {tensor.dtype}, which safetensors cannot store", path=where
            )
        entries.append((key, tensor, _ST_DTYPES[dtype]))
    # Largest element size first keeps every tensor naturally aligned (header is 8-aligned).
    entries.sort(key=lambda e: (-e[1].element_size(), e[0]))
    return Payload("safetensors", lambda sink: _write_safetensors(sink, entries))


def _write_safetensors(sink: _Sink, entries: list[tuple[str, Any, str]]) -> None:
    """Stream the safetensors format: u64 header length, JSON header, raw little-endian data.

    One tensor at a time is moved to CPU, so peak memory is one tensor, not the state dict.
    """
    import torch
    header: dict[str, Any] = {}
    offset = 0
    for key, tensor, st_dtype in entries:
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": st_dtype, "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    sink.write(struct.pack("<Q", len(encoded)))
    sink.write(encoded)
    for _, tensor, _ in entries:
        if tensor.numel() == 0:
            continue
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        sink.write(memoryview(flat.view(torch.uint8).numpy()))


# -- numpy --------------------------------------------------------------------------------------


def _prepare_numpy(array: Any) -> Payload:
    if array.dtype.hasobject:
        raise SerializationError(
            "data is a numpy array of dtype object, which cannot be stored without pickle; "
            "convert it to a numeric or string dtype",
            path="data",
        )

    def write(sink: _Sink) -> None:
        import numpy as np

        np.save(sink, array, allow_pickle=False)  # type: ignore[arg-type]

    return Payload("npy", write)


# -- reading back -------------------------------------------------------------------------------


def load_payload(path: Path, format: str) -> Any:
    """Load a stored blob back into the object it was logged from."""
    if format == "json":
        return json.loads(path.read_bytes())
    if format == "text":
        return path.read_text(encoding="utf-8")
    if format == "bytes":
        return path.read_bytes()
    if format == "safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if format == "npy":
        import numpy as np

        return np.load(path, allow_pickle=False)
    return path
