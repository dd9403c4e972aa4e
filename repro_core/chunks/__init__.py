"""Chunked content: big files stored as parts shared between versions (issue 14).

A safetensors file is stored as one blob per tensor (small ones grouped) plus a manifest; any
other big file as content-defined chunks plus a manifest. The version keeps its whole-file
digest and is restored byte for byte. ``split`` decides where to cut, ``writer``/``ingest``
store, ``manifest`` describes (and checks what is read back), ``assemble`` rebuilds the file
for ``use_artifact(...).path``, ``load`` builds tensors straight from the part blobs.
"""

from .manifest import ChunkManifest, Part, parse_manifest
from .writer import Stored

__all__ = ["ChunkManifest", "Part", "Stored", "parse_manifest"]
