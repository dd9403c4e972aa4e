"""Reading a checkpoint file and decoding its skeleton back into the checkpoint, without pickle.

Why separate from writing: everything here handles *untrusted* input — a file from a shared store
may be damaged or forged — so the header is bounded and validated before the safetensors library
maps the file, the skeleton is checked node by node, and every malformation is an IntegrityError
(never a KeyError or RecursionError from deep inside). The writing half shares only the vocabulary
in ``_skeleton_tags``. The format and the public entry point are described in
:mod:`repro_lightning._skeleton`.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import pathlib
import stat
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from repro_core.errors import IntegrityError
from repro_core.serialize import _ST_MAX_HEADER, check_safetensors
from repro_lightning._skeleton_tags import (
    _ATTRIBUTE_DICTS,
    _MAX_DEPTH,
    _PATH_TYPES,
    FORMAT,
    _short,
)

__all__ = ["decode", "is_repro_checkpoint", "load", "read_metadata"]

_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in vars(torch).values()
                 if isinstance(d, torch.dtype)}


# -- reading ------------------------------------------------------------------------------------


def is_repro_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a checkpoint written by :func:`payload`: reads the header only, and
    answers False (never raises) for anything else — a torch zip or pickle, a directory."""
    try:
        return read_metadata(path).get("format") == FORMAT
    except (IntegrityError, OSError, ValueError):  # ValueError: a NUL in the path
        return False


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The header's ``__metadata__`` ({} when absent). The read is bounded by the header length,
    which must be ≤ 100 MB and within the file, so a forged length allocates nothing."""
    where = pathlib.Path(path)
    # Non-blocking: a FIFO planted under a checkpoint's name must not hang the reader.
    fd = os.open(where, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _corrupt(where, "not a regular file")
    with os.fdopen(fd, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(where, "shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > _ST_MAX_HEADER or 8 + length > info.st_size:
            raise _corrupt(where, f"header length {length} exceeds the file ({info.st_size} "
                           "bytes) or 100 MB")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(where, f"the header is not JSON: {str(exc)[:200]}") from exc
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(where, "the header is not an object with a str→str __metadata__")
    return metadata


def load(path: str | os.PathLike[str], map_location: Any = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`payload` — never unpickling, never ``torch.load``.

    The header is validated before the safetensors library maps the file; the skeleton is
    untrusted JSON checked node by node. Tensors are stored without a device: ``map_location``
    (None or "cpu": CPU; a str or torch.device: there; a dict: the target of its "cpu" key; a
    callable ``(storage, "cpu") -> storage | None`` as for ``torch.load``) says where they go.
    Anything malformed is an IntegrityError with ``path`` set."""
    move = _mover(map_location)
    where = pathlib.Path(path)
    try:
        metadata = read_metadata(where)
        if metadata.get("format") != FORMAT:
            raise _corrupt(where, f"its format is {_short(metadata.get('format'))}, expected "
                           f"{FORMAT!r}; it was not written by repro's safetensors checkpoint IO")
        _check_layout(where)
        skeleton = _parse(metadata.get("skeleton"))
        with safe_open(str(where), framework="pt") as handle:
            return _decode(skeleton, _FileTensors(handle), move)
    except SafetensorError as exc:
        raise _corrupt(where, str(exc)[:300]) from exc
    except IntegrityError as exc:
        if exc.path is not None:
            raise
        raise _corrupt(where, str(exc)) from exc


def _check_layout(path: pathlib.Path) -> None:
    try:
        check_safetensors(path)
    except (ValueError, RecursionError) as exc:
        raise _corrupt(path, f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def _parse(text: str | None) -> Any:
    if text is None:
        raise IntegrityError("its __metadata__ has no skeleton")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise IntegrityError(f"its skeleton is not JSON ({str(exc)[:200]})") from exc


def _corrupt(path: pathlib.Path, problem: str) -> IntegrityError:
    return IntegrityError(f"{path} is not a valid repro checkpoint ({problem}); it is damaged, "
                          "was tampered with, or is another kind of file", path=path)


class _FileTensors(Mapping[str, torch.Tensor]):
    """The file's tensors, read from the mapped file only when the skeleton asks for them."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._names = frozenset(handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._handle.get_tensor(name)  # type: ignore[no-any-return]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)


def _mover(map_location: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Checked before the file is opened: a wrong type is the caller's TypeError, not a damaged
    file. The file records no devices, so a dict maps from "cpu" (others never match)."""
    if map_location is None:
        return None
    if isinstance(map_location, (str, torch.device)):
        device = torch.device(map_location)
        return lambda t: t.to(device)
    if isinstance(map_location, dict) and all(
            isinstance(v, (str, torch.device)) for v in map_location.values()):
        target = map_location.get("cpu", map_location.get(torch.device("cpu")))
        return None if target is None else _mover(target)
    if callable(map_location):
        return lambda t: _through_storage(map_location, t)
    raise TypeError(
        "map_location must be None, a str such as 'cuda:0', a torch.device, a dict of str or "
        "torch.device such as {'cpu': 'cuda:0'}, or a callable (storage, location) -> storage; "
        f"got {type(map_location).__qualname__}")


def _through_storage(fn: Callable[[Any, str], Any], t: torch.Tensor) -> torch.Tensor:
    """torch.load's callable protocol: it gets the storage and its location and returns a
    storage (or None: leave it where it is)."""
    storage = fn(t.untyped_storage(), "cpu")
    if storage is None:
        return t
    if isinstance(storage, torch.TypedStorage):
        storage = storage.untyped()
    if not isinstance(storage, torch.UntypedStorage):
        raise TypeError(f"map_location returned a {type(storage).__qualname__}, not a storage")
    out = torch.empty(0, dtype=t.dtype, device=storage.device)
    return out.set_(storage, 0, t.shape, t.stride())


# -- decoding -----------------------------------------------------------------------------------


def decode(skeleton: Any, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Rebuild the checkpoint from :func:`encode`'s skeleton and its named tensors.

    The skeleton is treated as untrusted: anything :func:`encode` would not have produced (an
    unknown tag, a wrong arity, a missing tensor, nesting past the limit) is an IntegrityError,
    never a KeyError or RecursionError from deep inside."""
    return _decode(skeleton, tensors, None)


class _MoveFailed(Exception):
    """Carries an error from ``map_location`` past the decoder's net for malformed data: a CUDA
    error or the caller's own TypeError must not be reported as a damaged file."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def _decode(skeleton: Any, tensors: Mapping[str, torch.Tensor],
            move: Callable[[torch.Tensor], torch.Tensor] | None) -> dict[str, Any]:
    if not isinstance(skeleton, dict) or set(skeleton) != {"root"}:
        raise IntegrityError(f"the skeleton {_short(skeleton)} is not {{'root': node}}")
    try:
        root = _Decoder(tensors, move).value(skeleton["root"], 0)
    except _MoveFailed as failed:
        raise failed.error from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise IntegrityError(
            f"the skeleton is malformed ({type(exc).__name__}: {str(exc)[:200]})") from exc
    if not isinstance(root, dict):
        raise IntegrityError(f"the skeleton's root is a {type(root).__qualname__}, not a dict")
    return root


def _args(node: list[Any], *types: type) -> list[Any]:
    """A node's operands, checked for count and JSON type before use."""
    args = node[1:]
    if len(args) != len(types) or not all(type(a) is t for a, t in zip(args, types, strict=True)):
        raise IntegrityError(f"malformed {node[0][:20]!r} node {_short(node)} in the skeleton")
    return args


class _Decoder:
    """Recursive descent over the skeleton, one handler per tag (see ``_HANDLERS``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor],
                 move: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        self._tensors = tensors
        self._move = move
        self._seen: dict[str, torch.Tensor] = {}
        self._arrays: set[str] = set()

    def value(self, node: Any, depth: int) -> Any:
        if node is None or type(node) in (str, bool, int):
            return node
        if type(node) is not list or not node or type(node[0]) is not str:
            raise IntegrityError(f"unexpected {type(node).__name__} {_short(node)} in the skeleton")
        handler = _HANDLERS.get(node[0])
        if handler is None:
            raise IntegrityError(f"unknown tag {node[0][:50]!r} in the skeleton")
        if depth >= _MAX_DEPTH:
            raise IntegrityError(f"the skeleton is nested more than {_MAX_DEPTH} levels deep")
        return handler(self, node, depth + 1)

    def _items(self, node: list[Any], depth: int) -> Any:
        return [self.value(v, depth) for v in _args(node, list)[0]]

    def _pairs(self, items: list[Any], depth: int) -> list[tuple[Any, Any]]:
        if not all(type(p) is list and len(p) == 2 for p in items):
            raise IntegrityError(f"malformed key/value pairs {_short(items)} in the skeleton")
        return [(self.value(k, depth), self.value(v, depth)) for k, v in items]

    def _mapping(self, node: list[Any], depth: int) -> Any:
        if node[0] == "d":
            return dict(self._pairs(_args(node, list)[0], depth))
        if node[0] == "AD":
            items, module = _args(node, list, str)
            if module not in _ATTRIBUTE_DICTS:
                raise IntegrityError(f"AttributeDict from unknown module {module[:100]!r}")
            return _attribute_dict(module)(self._pairs(items, depth))
        if len(node) == 3:
            out = OrderedDict(self._pairs(_args(node, list, type(node[2]))[0], depth))
            out._metadata = self.value(node[2], depth)  # type: ignore[attr-defined]
            return out
        return OrderedDict(self._pairs(_args(node, list)[0], depth))

    def _namespace(self, node: list[Any], depth: int) -> argparse.Namespace:
        out = argparse.Namespace()
        for key, value in self._pairs(_args(node, list)[0], depth):
            if type(key) is not str:
                raise IntegrityError(f"Namespace attribute {_short(key)} is not a str")
            setattr(out, key, value)
        return out

    def _tensor(self, node: list[Any], depth: int) -> torch.Tensor:
        (name,) = _args(node, str)
        if name not in self._seen:
            tensor = self._fetch(name)
            try:
                self._seen[name] = tensor if self._move is None else self._move(tensor)
            except Exception as exc:
                raise _MoveFailed(exc) from exc
        return self._seen[name]

    def _fetch(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise IntegrityError(f"the skeleton names a tensor {_short(name)} the file lacks")
        return self._tensors[name]

    def _array(self, node: list[Any], depth: int) -> Any:
        name, dtype_text, shape = _args(node, str, str, list)
        dtype = np.dtype(dtype_text)
        if dtype.hasobject or dtype.kind == "V" or name in self._arrays or not all(
                type(d) is int and d >= 0 for d in shape):
            raise IntegrityError(f"malformed numpy array node {_short(node)} in the skeleton")
        self._arrays.add(name)  # each array's data once: no amplification by repetition
        flat = self._fetch(name).detach().cpu().contiguous().reshape(-1)
        data = flat.view(torch.uint8).numpy().tobytes()
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()

    def _numpy_scalar(self, node: list[Any], depth: int) -> Any:
        dtype = np.dtype(_args(node, str, type(node[-1]))[0])
        scalar = dtype.type(self.value(node[2], depth)) if dtype.kind in "biufcUS" else None
        if not isinstance(scalar, np.generic):  # e.g. np.float64([1, 2]) is an array
            raise IntegrityError(f"malformed numpy scalar node {_short(node)} in the skeleton")
        return scalar

    def _leaf(self, node: list[Any], depth: int) -> Any:
        tag = node[0]
        if tag == "S":
            (dims,) = _args(node, list)
            if not all(type(d) is int for d in dims):
                raise IntegrityError(f"malformed torch.Size {_short(dims)} in the skeleton")
            return torch.Size(dims)
        if tag == "P":
            flavour, text = _args(node, str, str)
            if flavour not in _PATH_TYPES:
                raise IntegrityError(f"unknown path flavour {flavour[:50]!r} in the skeleton")
            return _PATH_TYPES[flavour](text)
        if tag == "c":
            real, imag = _args(node, str, str)
            return complex(float(real), float(imag))
        (text,) = _args(node, str)
        return _TEXT_LEAVES[tag](text)


def _device(text: str) -> torch.device:
    try:
        return torch.device(text)
    except RuntimeError as exc:
        raise IntegrityError(f"invalid torch.device {text[:50]!r} in the skeleton") from exc


def _dtype(text: str) -> torch.dtype:
    if text not in _TORCH_DTYPES:
        raise IntegrityError(f"unknown torch dtype {text[:50]!r} in the skeleton")
    return _TORCH_DTYPES[text]


def _attribute_dict(module: str) -> Callable[[Any], dict[Any, Any]]:
    """The class the file names, else another Lightning's (a checkpoint saved with
    ``pytorch_lightning`` loads where only ``lightning`` is installed), else a plain dict."""
    for candidate in (module, *_ATTRIBUTE_DICTS):
        try:
            return importlib.import_module(candidate).AttributeDict  # type: ignore[no-any-return]
        except ImportError:
            continue
    return dict


_TEXT_LEAVES: dict[str, Callable[[str], Any]] = {
    "f": float, "dt": _dtype, "dev": _device,
    "b": lambda s: base64.b64decode(s, validate=True),
    "ba": lambda s: bytearray(base64.b64decode(s, validate=True)),
}
def _omegaconf(decoder: _Decoder, node: list[Any], depth: int) -> Any:
    """``["OC", kind, plain]`` → an OmegaConf config again; ``["OCT", kind]`` → its class.
    Without omegaconf installed, the plain container (the class: None, as Lightning reads a
    missing hparams type)."""
    kind = node[1] if len(node) > 1 else None
    if kind not in ("DictConfig", "ListConfig"):
        raise IntegrityError(f"unknown OmegaConf kind {_short(kind)} in the skeleton")
    if node[0] == "OCT":
        _args(node, str)
    else:
        _args(node, str, type(node[2]) if len(node) == 3 else list)
    try:
        import omegaconf
    except ImportError:
        return None if node[0] == "OCT" else decoder.value(node[2], depth)
    if node[0] == "OCT":
        return getattr(omegaconf, kind)
    plain = decoder.value(node[2], depth)
    expected = dict if kind == "DictConfig" else list
    if type(plain) is not expected:
        raise IntegrityError(f"an OmegaConf {kind} holding {_short(plain)}")
    return omegaconf.OmegaConf.create(plain)


_HANDLERS: dict[str, Callable[[_Decoder, list[Any], int], Any]] = {
    "OC": _omegaconf, "OCT": _omegaconf,
    "l": _Decoder._items, "t": lambda d, n, depth: tuple(d._items(n, depth)),
    "set": lambda d, n, depth: set(d._items(n, depth)),
    "fs": lambda d, n, depth: frozenset(d._items(n, depth)),
    "d": _Decoder._mapping, "o": _Decoder._mapping, "AD": _Decoder._mapping,
    "ns": _Decoder._namespace, "T": _Decoder._tensor, "nd": _Decoder._array,
    "npv": _Decoder._numpy_scalar,
    **dict.fromkeys(("S", "P", "c", *_TEXT_LEAVES), _Decoder._leaf),
}
