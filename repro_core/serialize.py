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
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ._safepath import component_problem
from .errors import IntegrityError, SerializationError

__all__ = ["Payload", "canonical_json", "check_npy", "check_safetensors", "load_payload",
           "prepare", "safetensors_spans"]


class _Sink(Protocol):
    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


@dataclass(frozen=True)
class Payload:
    """Validated data, ready to be streamed into a blob.

    Adapters that serialize their own objects (a Lightning checkpoint) pass a ``Payload`` as
    ``log_artifact(data=...)``: its ``write`` streams straight into the hashing blob writer,
    so the bytes are never written elsewhere first and never read back. ``filename`` is the
    name ``use_artifact(...).path`` shows (default: the artifact name + the format's
    extension); ``format`` must be one :func:`load_payload` reads.
    """

    format: str
    write: Callable[[_Sink], None]
    filename: str | None = None


def prepare(data: object) -> Payload:
    """Validate ``data`` and choose its format; raise ``SerializationError`` if unsupported."""
    if isinstance(data, Payload):
        return _check_payload(data)
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


def _check_payload(payload: Payload) -> Payload:
    if not isinstance(payload.format, str) or payload.format not in _LOADERS \
            or not callable(payload.write):
        raise SerializationError(f"a Payload needs a callable write and a format among "
                                 f"{sorted(_LOADERS)}, got {payload.format!r}", path="data")
    name = payload.filename
    # the rule the served file's name is checked by (``_cache.file_name``): a name it would
    # replace by the digest, or one SQLite cannot store (a lone surrogate), is refused here
    problem = component_problem(name) if name is not None else None
    if problem is not None:
        raise SerializationError(f"Payload.filename must be a plain file name; {name!r} "
                                 f"{problem}", path="data")
    return payload


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
        if tensor.device.type == "meta":
            raise SerializationError(
                f"{where} is a meta tensor (a shape without data); materialise it first",
                path=where)
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
#
# A blob read back is untrusted (stores are shared, synced, downloaded): a forged one must give
# an IntegrityError, never a MemoryError from a header that claims 8 TB, a RecursionError from
# nested JSON, a pickle from an object-dtype array, or the parser's own exception type. Headers
# are therefore checked against the file's real size before any loader allocates anything.

_ST_MAX_HEADER = 100_000_000  # what the safetensors library itself accepts
_ST_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
            "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
            "I64": 64, "U64": 64, "F64": 64, "C64": 64}


def load_payload(path: Path, format: str, *, digest: str | None = None) -> Any:
    """Load a stored blob back into the object it was logged from (a ``Path`` for files).

    Malformed content of any kind is an ``IntegrityError`` naming the blob.
    """
    loader = _LOADERS.get(format)
    if loader is None:
        return path
    try:
        return loader(path)
    except IntegrityError as exc:
        exc.digest = exc.digest or digest
        raise
    except (ValueError, RecursionError, MemoryError, OverflowError, EOFError) as exc:
        raise _corrupt(path, digest, format, f"{type(exc).__name__}: {str(exc)[:300]}") from exc


def _corrupt(path: Path | str, digest: str | None, format: str, problem: str) -> IntegrityError:
    return IntegrityError(f"{path} is not valid {format} content ({problem}); the store is "
                          "damaged or was tampered with", digest=digest, path=path)


def _load_json(path: Path) -> Any:
    return json.loads(path.read_bytes())


def _load_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8")


def _load_bytes(path: Path) -> bytes:
    return path.read_bytes()


def _load_safetensors(path: Path) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(path)
    try:
        return load_file(str(path))
    except SafetensorError as exc:  # what our checks did not foresee is still typed
        raise _corrupt(path, None, "safetensors", str(exc)[:300]) from exc


def _load_npy(path: Path) -> Any:
    import numpy as np

    check_npy(path)
    return np.load(path, allow_pickle=False)


_LOADERS: dict[str, Callable[[Path], Any]] = {
    "json": _load_json, "text": _load_text, "bytes": _load_bytes,
    "safetensors": _load_safetensors, "npy": _load_npy,
}


def check_safetensors(path: Path) -> None:
    """Validate a safetensors header as the format requires, before the library maps the file:
    length ≤ 100 MB and within the file, a JSON object, each tensor's dtype known, its shape
    non-negative ints whose size matches its byte span, and the spans tiling the data area
    exactly (sorted, no overlap, no gap, nothing after) — as the library itself demands."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(path, None, "safetensors", "shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > _ST_MAX_HEADER or 8 + length > size:
            raise _corrupt(path, None, "safetensors",
                           f"header length {length} exceeds the file ({size} bytes) or 100 MB")
        raw = f.read(length)
    safetensors_spans(raw, size - 8 - length, path)


def safetensors_spans(raw: bytes, data_size: int, path: Path | str
                      ) -> list[tuple[int, int, str]]:
    """The tensors of a safetensors header as ``(start, stop, name)`` in data-area order,
    checked as ``check_safetensors`` says (``IntegrityError`` naming ``path`` otherwise); the
    ``__metadata__`` entry is left out. ``data_size``: the bytes after the header."""
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise _corrupt(path, None, "safetensors", "the header is not a JSON object")
    spans = sorted(_st_span(path, name, info) for name, info in header.items())
    end = 0
    for start, stop, name in spans:
        if start != end:
            raise _corrupt(path, None, "safetensors",
                           f"tensor {name[:100]!r} starts at {start}, expected {end}")
        end = stop
    if end != data_size:
        raise _corrupt(path, None, "safetensors",
                       f"tensors end at {end}, the data area has {data_size} bytes")
    return [span for span in spans if span[2] != "__metadata__"]


def _st_span(path: Path | str, name: str, info: object) -> tuple[int, int, str]:
    if name == "__metadata__":
        if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
            raise _corrupt(path, None, "safetensors", "__metadata__ is not a str→str object")
        return 0, 0, "__metadata__"
    bad = f"tensor {name[:100]!r} has an invalid entry {str(info)[:200]}"
    if not isinstance(info, dict):
        raise _corrupt(path, None, "safetensors", bad)
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _ST_BITS or not _is_shape(shape):
        raise _corrupt(path, None, "safetensors", bad)
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(type(o) is int for o in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise _corrupt(path, None, "safetensors", bad)
    bits = math.prod(shape) * _ST_BITS[dtype]  # type: ignore[arg-type]
    if bits != (offsets[1] - offsets[0]) * 8:
        raise _corrupt(path, None, "safetensors", f"{bad}: its shape needs {bits // 8} bytes")
    return offsets[0], offsets[1], name


def _is_shape(shape: object) -> bool:
    return isinstance(shape, (list, tuple)) and all(type(d) is int and d >= 0 for d in shape)


def check_npy(path: Path) -> None:
    """Validate an ``.npy`` header with numpy's own readers, then the claims against the file:
    no object dtype (it would need pickle), a non-negative shape, and exactly
    shape * itemsize bytes after the header (a forged 10**12 elements is refused here, not
    allocated)."""
    from numpy.lib import format as npy

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = npy.read_array_header_1_0(f)
        elif version in ((2, 0), (3, 0)):  # 3.0 is 2.0 with a UTF-8 header; sizes read alike
            shape, _fortran, dtype = npy.read_array_header_2_0(f)
        else:
            raise _corrupt(path, None, "npy", f"unsupported format version {version}")
        offset = f.tell()
    if dtype.hasobject:
        raise _corrupt(path, None, "npy", "object dtype, which would need pickle to load")
    if not _is_shape(shape):
        raise _corrupt(path, None, "npy", f"invalid shape {shape!r}")
    if math.prod(shape) * dtype.itemsize != size - offset:
        raise _corrupt(path, None, "npy", f"shape {shape} of {dtype.itemsize}-byte items does not "
                       f"match the {size - offset} bytes of data")
