"""The manifest of chunked content: which blobs, in which order, make one logical file.

A version stored chunked keeps its **whole-file digest** (``versions.digest``, what users and
``name@blake3:…`` keys see); the registry's ``versions.manifest`` names a small blob::

    {"format": "repro.chunks/1", "method": "tensors", "digest": "blake3:<whole file>",
     "size": 1073741824,
     "parts": [{"d": "blake3:…", "n": 4096, "t": []},                       # the header
               {"d": "blake3:…", "n": 16777216, "t": ["layers.0.weight"]},  # one tensor
               {"d": "blake3:…", "n": 3072, "t": ["layers.0.bias", "…"]}]}  # small ones, grouped

Concatenating the parts gives back exactly the logged bytes. ``method`` is ``tensors`` (a
safetensors file: part 0 is the header, then the tensors' bytes in file order; ``t`` names the
tensors in each part, for errors and for loading without assembling) or ``cdc``
(content-defined chunks of any other file; ``t`` is empty).

A manifest read back is untrusted input (``parse_manifest``): shape, digests, sizes that add up,
bounded counts — any flaw is an ``IntegrityError`` before a byte of a part is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from .._safepath import check_digest
from ..errors import IntegrityError
from ..serialize import canonical_json

__all__ = ["FORMAT", "MAX_MANIFEST", "METHODS", "ChunkManifest", "Part", "check_manifest_row",
           "encode", "parse_manifest"]

FORMAT = "repro.chunks/1"
METHODS = ("tensors", "cdc")
_MAX_PARTS = 10_000_000
_MAX_NAMES = 10_000_000
_MAX_SIZE = 2**63 - 1
MAX_MANIFEST = 256 << 20  # a 1 TB file in 2 MiB chunks needs ~50 MB of manifest


@dataclass(frozen=True)
class Part:
    """One blob of chunked content: its digest, size and (method ``tensors``) tensor names."""

    digest: str
    size: int
    tensors: tuple[str, ...] = ()

    def label(self) -> str:
        """How errors name this part: its tensors, or its place in the file."""
        if not self.tensors:
            return f"chunk {self.digest}"
        shown = ", ".join(repr(t) for t in self.tensors[:3])
        more = f" and {len(self.tensors) - 3} more" if len(self.tensors) > 3 else ""
        return f"tensor{'s' if len(self.tensors) > 1 else ''} {shown}{more}"


@dataclass(frozen=True)
class ChunkManifest:
    """A checked manifest (see ``parse_manifest``)."""

    method: str
    digest: str
    size: int
    parts: tuple[Part, ...]

    def blobs(self) -> list[tuple[str, int]]:
        """Each distinct part blob once (a repeated chunk is one blob), in first-use order."""
        seen: dict[str, int] = {}
        for part in self.parts:
            seen.setdefault(part.digest, part.size)
        return list(seen.items())

    def label(self, digest: str) -> str:
        """What a part blob holds, for an error about it."""
        for part in self.parts:
            if part.digest == digest:
                return "the header" if self.method == "tensors" and part is self.parts[0] \
                    else part.label()
        return f"blob {digest}"


def encode(manifest: ChunkManifest) -> bytes:
    """Canonical JSON of a manifest (same parts, same bytes, same manifest blob)."""
    return canonical_json({
        "format": FORMAT, "method": manifest.method, "digest": manifest.digest,
        "size": manifest.size,
        "parts": [{"d": p.digest, "n": p.size, "t": list(p.tensors)} for p in manifest.parts],
    }, root="manifest")


def parse_manifest(raw: bytes, *, digest: str | None = None) -> ChunkManifest:
    """Parse a stored manifest as untrusted input; any flaw is an ``IntegrityError``."""
    where = f"chunk manifest {digest}" if digest else "chunk manifest"
    if len(raw) > MAX_MANIFEST:
        raise _bad(where, f"has {len(raw)} bytes, more than any manifest repro writes", digest)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError, MemoryError) as exc:
        raise _bad(where, f"is not JSON ({type(exc).__name__})", digest) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise _bad(where, f"is not a {FORMAT!r} manifest", digest)
    method, parts = data.get("method"), data.get("parts")
    if method not in METHODS:
        raise _bad(where, f"has the unknown method {str(method)[:50]!r}", digest)
    whole = check_digest(data.get("digest"), where=f"{where} digest")
    size = data.get("size")
    if type(size) is not int or not 0 <= size <= _MAX_SIZE:
        raise _bad(where, f"has size {str(size)[:50]!r}, not a byte count", digest)
    if not isinstance(parts, list) or not parts or len(parts) > _MAX_PARTS:
        raise _bad(where, "needs a non-empty 'parts' list", digest)
    checked = tuple(_part(p, f"{where} parts[{i}]", whole) for i, p in enumerate(parts))
    if sum(p.size for p in checked) != size:
        raise _bad(where, f"lists parts of {sum(p.size for p in checked)} bytes for a file of "
                   f"{size}", digest)
    if sum(len(p.tensors) for p in checked) > _MAX_NAMES:
        raise _bad(where, "names too many tensors", digest)
    return ChunkManifest(method=method, digest=whole, size=size, parts=checked)


def _part(value: object, where: str, whole: str) -> Part:
    if not isinstance(value, dict):
        raise _bad(where, f"is a {type(value).__name__}, not an object", None)
    digest = check_digest(value.get("d"), where=where)
    if digest.split(":", 1)[0] != whole.split(":", 1)[0]:
        raise _bad(where, "uses another digest algorithm than the file", None)
    size, names = value.get("n"), value.get("t")
    if type(size) is not int or not 0 < size <= _MAX_SIZE:
        raise _bad(where, f"has size {str(size)[:50]!r}, not a positive byte count", None)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _bad(where, "has 't' that is not a list of tensor names", None)
    return Part(digest=digest, size=size, tensors=tuple(names))


def check_manifest_row(manifest: ChunkManifest, key: str, digest: str, size: int,
                       blobs: dict[str, int]) -> None:
    """The manifest must describe the version's row: same whole-file digest and size, and
    every part a blob the registry records for the version with that size (else gc could
    delete it and ``verify`` would never look at it)."""
    where = f"chunk manifest of {key}"
    if manifest.digest != digest or manifest.size != size:
        raise _bad(where, f"describes {manifest.digest} ({manifest.size} bytes), but the "
                   f"registry records {digest} ({size} bytes)", digest)
    for part in manifest.parts:
        if blobs.get(part.digest) != part.size:
            raise _bad(where, f"lists {part.label()} as blob {part.digest} ({part.size} "
                       "bytes), which the registry does not record for this version", digest)


def _bad(where: str, problem: str, digest: str | None) -> IntegrityError:
    return IntegrityError(f"{where} {problem}; the store is damaged or was tampered with "
                          "(`repro verify` lists what is affected)", digest=digest)
