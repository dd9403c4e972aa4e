"""What a call *is*, as a digest every rank computes alike from its own arguments.

Rank 1 pairs each of its calls with the answer rank 0 published for the call with the same
fingerprint, so a call rank 0 makes alone with other arguments can never be taken for it.

A fingerprint is ``blake3(kind, subject, {argument: digest})``; each argument's digest is
BLAKE3 over a canonical encoding that depends only on the value, never on the process
(no ``hash()``, no ``id()``, dict keys sorted, sets sorted, devices ignored):

=====================  =====================================================================
value                  encoded as (cost)
=====================  =====================================================================
None/bool/int/float/   canonical JSON (C speed; ``json.dumps(sort_keys=True)``)
str, dict, list, tuple
bytes / bytearray /    BLAKE3 of the bytes (one pass, ~1 GB/s per core, every core above
memoryview             32 MiB) — cheaper than the write that follows
numpy.ndarray          dtype, shape, BLAKE3 of the buffer (a copy first if not contiguous)
torch.Tensor           dtype, shape, and 64 elements sampled at fixed positions; the samples
                       of all tensors on one device travel to the CPU in one copy. Tensor
                       subclasses (DTensor, FakeTensor…) and meta tensors: dtype and shape
                       only, because indexing them can run a collective or cannot read data
os.PathLike            its path string (no I/O: the file may not exist on this rank)
anything else          its type's qualified name
=====================  =====================================================================

A value that cannot be encoded (a cycle, mixed-type keys) is fingerprinted by its type,
identically on every rank: fingerprinting never raises, because validating is rank 0's job
and its verdict must still reach the other ranks.
"""

from __future__ import annotations

import enum
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

__all__ = ["Call", "digest_bytes"]

SAMPLES_PER_TENSOR = 64
_PARALLEL_MIN = 32 * 1024 * 1024


def digest_bytes(data: bytes | bytearray | memoryview) -> str:
    """128-bit BLAKE3 hex digest (fingerprints are never stored: short is enough)."""
    import blake3

    threads = blake3.blake3.AUTO if len(data) >= _PARALLEL_MIN else 1
    return blake3.blake3(data, max_threads=threads).hexdigest()[:32]


@dataclass(frozen=True)
class Call:
    """One repro call as every rank sees it: ``Call("log_artifact", "model", {"data": b"…"})``.

    ``kind`` is the API (``use_artifact``), ``subject`` what it is about (an artifact name, a
    run id) and ``args`` the arguments that decide the answer. Leave out arguments that may
    legitimately differ between ranks without changing the answer (``log_artifact``'s
    ``metadata``: identical content yields the same version whatever the metadata).
    ``every_rank`` marks calls that synchronise every rank (``init_run``, ``finalize_run``):
    they pair by order and are refused inside ``rank_zero_only()``.

    The fingerprint is computed lazily: not at all without a process group or inside
    ``rank_zero_only()``.
    """

    kind: str
    subject: str = ""
    args: Mapping[str, object] = field(default_factory=dict)
    every_rank: bool = False

    @property
    def label(self) -> str:
        """How error messages name the call: ``log_artifact('model')``."""
        return f"{self.kind}({self.subject!r})" if self.subject else f"{self.kind}()"

    @cached_property
    def parts(self) -> dict[str, str]:
        """``{argument: digest}``, compared argument by argument to say what differs."""
        return {name: _digest_value(value) for name, value in sorted(self.args.items())}

    @cached_property
    def fingerprint(self) -> str:
        subject = self.subject if isinstance(self.subject, str) else _digest_value(self.subject)
        head = json.dumps([self.kind, subject, self.every_rank, sorted(self.parts.items())],
                          separators=(",", ":"), ensure_ascii=True)
        return digest_bytes(head.encode("ascii"))


def _digest_value(value: object) -> str:
    encoder = _Encoder()
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                          allow_nan=True, default=encoder.default)
    except (TypeError, ValueError, RecursionError):
        # Mixed-type keys, a cycle, absurd depth: rank 0 will reject or store it; what must
        # hold is that every rank gets the same digest, and the type is all we can trust.
        text, encoder.tensors = json.dumps({"$unencodable": _type_name(value)}), []
    return digest_bytes(text.encode("ascii") + _tensor_samples(encoder.tensors))


class _Encoder:
    """``json.dumps(default=…)`` hook: the non-JSON values repro accepts, by content."""

    def __init__(self) -> None:
        self.tensors: list[Any] = []

    def default(self, obj: object) -> object:
        if isinstance(obj, (bytes, bytearray, memoryview)):
            view = memoryview(obj)
            data = view if view.contiguous else view.tobytes()
            return {"$bytes": digest_bytes(data), "size": view.nbytes}
        if isinstance(obj, os.PathLike):
            path = os.fspath(obj)
            return path if isinstance(path, str) else {"$bytes-path": path.hex()}
        if isinstance(obj, enum.Enum):
            return {"$enum": f"{_type_name(obj)}.{obj.name}"}
        if isinstance(obj, (set, frozenset)):
            return {"$set": sorted(json.dumps(m, sort_keys=True, default=self.default)
                                   for m in obj)}
        module = type(obj).__module__.split(".", 1)[0]
        if module == "torch" and _is_tensor(obj):
            self.tensors.append(obj)
            return {"$tensor": len(self.tensors) - 1, **_tensor_header(obj)}
        if module == "numpy":
            return _numpy_value(obj)
        return {"$object": _type_name(obj)}


def _type_name(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _numpy_value(obj: Any) -> object:
    import numpy as np

    if isinstance(obj, np.generic):  # a numpy scalar: its Python value
        item = obj.item()
        if isinstance(item, float) and not math.isfinite(item):
            return {"$float": repr(item)}
        return item if isinstance(item, (bool, int, float, str)) else {"$object": _type_name(obj)}
    if isinstance(obj, np.ndarray) and not obj.dtype.hasobject:
        raw = np.ascontiguousarray(obj).reshape(-1).view(np.uint8)
        return {"$ndarray": obj.dtype.str, "shape": list(obj.shape),
                "digest": digest_bytes(raw.data)}
    return {"$object": _type_name(obj), "dtype": str(getattr(obj, "dtype", ""))}


# -- tensors ------------------------------------------------------------------------------------


def _is_tensor(obj: object) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.Tensor)


def _sampleable(tensor: Any) -> bool:
    """Plain tensors with readable, strided data. Subclasses are excluded: indexing a DTensor
    may run a collective, which inside rank-0-only code would hang the job. Quantized
    tensors are excluded too (repro cannot store them anyway)."""
    import torch

    return (type(tensor) in (torch.Tensor, torch.nn.Parameter)
            and tensor.layout == torch.strided and tensor.device.type != "meta"
            and not tensor.is_quantized)  # torch.cat of their byte views crashes (torch 2.13)


def _tensor_header(tensor: Any) -> dict[str, object]:
    return {"dtype": str(tensor.dtype), "shape": list(tensor.shape),
            "sampled": _sampleable(tensor)}


def _sample(tensor: Any) -> Any:
    """Up to ``SAMPLES_PER_TENSOR`` elements at positions that depend only on the shape."""
    import torch

    flat_count = tensor.numel()
    data = tensor.detach()
    if flat_count <= SAMPLES_PER_TENSOR:
        picked = data.reshape(-1)
    else:
        step = (flat_count - 1) / (SAMPLES_PER_TENSOR - 1)
        positions = torch.tensor([round(i * step) for i in range(SAMPLES_PER_TENSOR)],
                                 device=data.device)
        if data.is_contiguous():  # a flat view: no copy, one gather
            picked = data.view(-1).index_select(0, positions)
        else:  # gather through the strides: never copies the whole tensor
            picked = data[torch.unravel_index(positions, data.shape)]
    return picked.contiguous().view(torch.uint8)


def _safe_sample(tensor: Any) -> Any | None:
    """The samples, or None where the data cannot be read as bytes (a quantized dtype…): the
    same on every rank, since it depends only on the tensor's kind."""
    if not _sampleable(tensor) or not tensor.numel():
        return None
    try:
        return _sample(tensor)
    except (RuntimeError, TypeError, ValueError):
        return None


def _tensor_samples(tensors: list[Any]) -> bytes:
    """Sampled bytes of every tensor, in encoding order; one device-to-host copy per device.

    The order depends only on the encoded structure, so ``cuda:0`` on rank 0 and ``cuda:1`` on
    rank 1 give the same bytes.
    """
    if not tensors:
        return b""
    import torch

    samples: list[Any] = [_safe_sample(t) for t in tensors]
    by_device: dict[Any, list[int]] = {}
    for index, sample in enumerate(samples):
        if sample is not None:
            by_device.setdefault(sample.device, []).append(index)
    host: dict[int, bytes] = {}
    for indices in by_device.values():
        joined = torch.cat([samples[i] for i in indices]).cpu().numpy().tobytes()
        offset = 0
        for i in indices:
            size = samples[i].numel()
            host[i] = joined[offset:offset + size]
            offset += size
    return b"".join(host.get(i, b"") for i in range(len(tensors)))
