"""Reading chunked versions back: the checked manifest, and tensors straight from the parts.

``load_tensors`` is what ``load_artifact`` does for a chunked safetensors version: each part
blob is memory-mapped copy-on-write (``MAP_PRIVATE``) and every tensor is a view of its part —
no assembled file, no copy of the bytes into new memory (the page cache is shared with every
other reader of the same blob; a tensor written to gets private pages, never touching the
blob). With full verification each part is hashed first, from the same mapping.
"""

from __future__ import annotations

import json
import mmap
import os
import stat
from pathlib import Path
from typing import Any, Protocol

from .._safepath import check_digest
from ..errors import IntegrityError, StorageError
from ..registry.records import VersionRow
from ..serialize import safetensors_spans
from ..store.local import LocalStorageBackend
from .assemble import check_content
from .manifest import MAX_MANIFEST, ChunkManifest, check_manifest_row, parse_manifest
from .split import header_length

__all__ = ["check_layout", "load_tensors", "manifest_of", "read_chunk_manifest", "tensor_layout"]

class _BlobIndex(Protocol):
    def blobs_of(self, version_id: int) -> list[tuple[str, int]]: ...


def manifest_of(store: LocalStorageBackend, registry: _BlobIndex, row: VersionRow, *,
                full: bool) -> ChunkManifest:
    """The version's manifest, checked against its row and its recorded blobs (untrusted)."""
    return read_chunk_manifest(store, dict(registry.blobs_of(row.id)), row.manifest,
                               row.digest, row.size, full=full, key=row.key)


def read_chunk_manifest(store: LocalStorageBackend, blobs: dict[str, int], manifest: object,
                        digest: str, size: int, *, full: bool, key: str) -> ChunkManifest:
    """The chunk manifest ``manifest`` of content ``digest`` (``size`` bytes) — a version's,
    or one file's of a directory version — checked against the blobs the version records."""
    mdigest = check_digest(manifest, where=f"{key} chunk manifest")
    msize = blobs.get(mdigest)
    if msize is None or msize > MAX_MANIFEST:
        raise IntegrityError(f"{key}: the registry records no usable size for its chunk "
                             f"manifest {mdigest}; the registry is damaged", digest=mdigest)
    path = store.check(mdigest, msize, full=full)
    checked = parse_manifest(path.read_bytes(), digest=mdigest)
    check_manifest_row(checked, key, digest, size, blobs)
    return checked


def load_tensors(store: LocalStorageBackend, manifest: ChunkManifest, *, full: bool,
                 key: str, check: bool = True) -> dict[str, Any]:
    """The tensors of a chunked safetensors version, as views of the mapped part blobs.
    ``check=False``: the parts were just checked (``use_artifact`` on rank 0); each mapping
    still refuses a part that is not a regular file of its size."""
    import torch

    if check:
        check_content(store, manifest, full=full)
    header = _map(store, manifest.parts[0].digest, manifest.parts[0].size) \
        if manifest.method == "tensors" else b""
    maps: dict[int, mmap.mmap] = {}
    out: dict[str, Any] = {}
    for name, entry, index, offset, nbytes in tensor_layout(manifest, memoryview(header), key):
        dtype = _TORCH_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise _bad(key, manifest, f"tensor {name!r} has dtype {entry['dtype']}, which "
                       "this torch cannot load")
        if nbytes == 0:
            out[name] = torch.empty(entry["shape"], dtype=dtype)
            continue
        if index not in maps:
            part = manifest.parts[index]
            maps[index] = _map(store, part.digest, part.size)
        raw = torch.frombuffer(maps[index], dtype=torch.uint8, count=nbytes, offset=offset)
        out[name] = raw.view(dtype).reshape(entry["shape"])
    return out


def tensor_layout(manifest: ChunkManifest, header: memoryview, key: str
                  ) -> list[tuple[str, dict[str, Any], int, int, int]]:
    """Where each tensor lies: ``(name, header entry, part index, offset in the part,
    bytes)``, checked as untrusted input — the manifest must be per tensor, its first part a
    safetensors header for the file's size, and every tensor inside the one part that names
    it. ``header``: that first part's bytes."""
    if manifest.method != "tensors":
        raise IntegrityError(f"{key} is not stored per tensor (method {manifest.method!r})",
                             digest=manifest.digest)
    length = header_length(bytes(header[:8]), len(header))
    if length is None or 8 + length != len(header):
        raise _bad(key, manifest, "its header part is not a safetensors header")
    try:
        spans = safetensors_spans(bytes(header[8:]), manifest.size - len(header), key)
        info = json.loads(bytes(header[8:]))
    except (ValueError, RecursionError) as exc:
        raise _bad(key, manifest, f"its header is not valid JSON ({exc})") from None
    starts = _part_starts(manifest)
    out = []
    for start, stop, name in spans:
        if stop == start:
            out.append((name, info[name], 0, 0, 0))
            continue
        index, offset = _locate(starts, manifest, len(header) + start, stop - start, name, key)
        out.append((name, info[name], index, offset, stop - start))
    return out


def check_layout(store: LocalStorageBackend, manifest: ChunkManifest, key: str,
                 fmt: str | None) -> None:
    """What ``repro verify`` checks beyond the bytes: a safetensors version must be stored
    per tensor, and a per-tensor manifest must place every tensor where ``load_artifact``
    will look for it (``tensor_layout``). Reads the header part only."""
    if manifest.method != "tensors" and fmt != "safetensors":
        return
    header = b""
    if manifest.method == "tensors":
        part = manifest.parts[0]
        with _map(store, part.digest, part.size) as mapped:
            header = bytes(mapped)
    tensor_layout(manifest, memoryview(header), key)


def _part_starts(manifest: ChunkManifest) -> list[int]:
    starts, at = [], 0
    for part in manifest.parts:
        starts.append(at)
        at += part.size
    return starts


def _locate(starts: list[int], manifest: ChunkManifest, begin: int, size: int, name: str,
            key: str) -> tuple[int, int]:
    """The part holding bytes ``[begin, begin + size)`` whole, and the offset in it."""
    import bisect

    index = bisect.bisect_right(starts, begin) - 1
    offset = begin - starts[index]
    if offset + size > manifest.parts[index].size or name not in manifest.parts[index].tensors:
        raise _bad(key, manifest, f"tensor {name!r} does not lie inside the part that names "
                   "it")
    return index, offset


def _map(store: LocalStorageBackend, digest: str, size: int) -> mmap.mmap:
    """A copy-on-write mapping of a checked blob (never a link or special file)."""
    path: Path = store.blob_path(digest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:  # missing, or a symlink planted in its place (ELOOP)
        raise IntegrityError(f"blob {digest} cannot be opened ({exc.strerror}): missing or "
                             "not a file; `repro verify` lists what is affected",
                             digest=digest, path=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            raise IntegrityError(f"blob {digest} is not a file of {size} bytes (changed while "
                                 "it was loaded?)", digest=digest, path=path)
        return mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:  # ENOMEM: past the process's limit of mappings
        raise StorageError(f"mapping blob {digest} failed: {exc}", path=path,
                           errno=exc.errno) from exc
    finally:
        os.close(fd)


def _bad(key: str, manifest: ChunkManifest, problem: str) -> IntegrityError:
    return IntegrityError(f"{key}: {problem}; the store is damaged or was tampered with",
                          digest=manifest.digest)


def _dtypes() -> dict[str, Any]:
    import torch

    names = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
             "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
             "U16": "uint16", "U32": "uint32", "U64": "uint64", "BOOL": "bool",
             "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64"}
    return {k: getattr(torch, v) for k, v in names.items() if hasattr(torch, v)}


class _LazyDtypes(dict):  # type: ignore[type-arg]
    """torch's dtypes by safetensors name, read on first use (no torch at import)."""

    def get(self, key: Any, default: Any = None) -> Any:
        if not self:
            self.update(_dtypes())
        return super().get(key, default)


_TORCH_DTYPES = _LazyDtypes()
