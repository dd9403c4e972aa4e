"""Where chunked content is cut: at tensor boundaries for safetensors, by content otherwise.

Safetensors (method ``tensors``): the header is one part, then each tensor's bytes are one
part, so a tensor that did not change between two checkpoints is the same blob in both —
whatever moved around it. Tensors under ``SMALL_TENSOR`` bytes (biases, norms, LoRA factors)
are grouped with their neighbours in file order until the group reaches that size: a blob,
a file and an fsync per 2 KiB bias would cost more than the bytes they could save.

Any other file (method ``cdc``): FastCDC content-defined chunking (``pyfastcdc``, a compiled
implementation of the FastCDC 2020 paper), average ``CDC_AVG`` bytes. Cut points depend only
on the bytes around them, so a change in the middle of a file changes the chunk(s) it falls in
and leaves the others — unlike fixed-size blocks, where one inserted byte shifts every block
after it. A ``torch.save`` file or a Lightning ``.ckpt`` (a zip of tensors) shares most chunks
with the previous one when most tensors did not change.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from ..errors import IntegrityError
from ..serialize import safetensors_spans

__all__ = ["CDC_AVG", "CDC_MAX", "CDC_MIN", "HEADER_MAX", "SMALL_TENSOR", "cdc_chunks",
           "header_length", "plan_tensor_parts"]

SMALL_TENSOR = 1 << 20
CDC_AVG, CDC_MIN, CDC_MAX = 2 << 20, 512 << 10, 8 << 20
HEADER_MAX = 100_000_000  # what the safetensors library accepts


def header_length(first8: bytes, total: int | None) -> int | None:
    """The header length a safetensors file declares, or None when it cannot be one."""
    if len(first8) < 8:
        return None
    (length,) = struct.unpack("<Q", first8[:8])
    if length > HEADER_MAX or (total is not None and 8 + length > total):
        return None
    return length


def plan_tensor_parts(header: bytes, data_size: int | None
                      ) -> list[tuple[int, tuple[str, ...]]] | None:
    """The parts after the header, as ``(size, tensor names)`` in file order, or None when
    ``header`` (the 8-byte length and the JSON) is not a valid safetensors header for a data
    area of ``data_size`` bytes (None: as big as the tensors say)."""
    raw = header[8:]
    try:
        if data_size is None:
            data_size = _declared_end(raw)
        spans = safetensors_spans(raw, data_size, "content")
    except (IntegrityError, ValueError, RecursionError, TypeError):
        return None
    parts: list[tuple[int, tuple[str, ...]]] = []
    group: list[str] = []
    group_size = 0
    for start, stop, name in spans:
        size = stop - start
        if size == 0:
            continue  # nothing to store; the header holds its shape
        if size >= SMALL_TENSOR:
            if group:
                parts.append((group_size, tuple(group)))
                group, group_size = [], 0
            parts.append((size, (name,)))
            continue
        group.append(name)
        group_size += size
        if group_size >= SMALL_TENSOR:
            parts.append((group_size, tuple(group)))
            group, group_size = [], 0
    if group:
        parts.append((group_size, tuple(group)))
    return parts


def _declared_end(raw: bytes) -> int:
    """The end of the data area a header declares (its biggest end offset)."""
    import json

    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("not an object")
    ends = [info["data_offsets"][1] for name, info in header.items()
            if name != "__metadata__" and isinstance(info, dict)
            and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2]
    if not all(type(e) is int for e in ends):
        raise ValueError("offsets are not integers")
    return max(ends, default=0)


def cdc_chunks(stream: object) -> Iterator[memoryview]:
    """Content-defined chunks of a binary stream (``readinto``), each valid until the next
    is asked for."""
    from pyfastcdc.cy import FastCDC  # type: ignore[import-untyped]

    cutter = FastCDC(avg_size=CDC_AVG, min_size=CDC_MIN, max_size=CDC_MAX)
    for chunk in cutter.cut_stream(stream):
        yield memoryview(chunk.data).cast("B")
