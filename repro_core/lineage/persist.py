"""The lineage file: a JSON document written atomically, read back checked in full.

Format ``repro-lineage`` version 1::

    {"format": "repro-lineage", "format_version": 1,
     "nodes": [LineageNode.to_dict(), ...],   # in insertion order
     "edges": [[parent, child], ...]}         # sorted, so equal graphs give equal bytes

Ids that appear only in ``edges`` are dangling parent references and stay dangling on load.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from .. import _fsio
from ..errors import MissingFileError, SerializationError
from ..serialize import canonical_json
from .nodes import LineageNode

__all__ = ["FILE_FORMAT", "FILE_VERSION", "read_lineage_file", "write_lineage_file"]

FILE_FORMAT = "repro-lineage"
FILE_VERSION = 1

_Edge = tuple[str, str]


def write_lineage_file(path: Path, nodes: Iterable[LineageNode], edges: Iterable[_Edge]) -> None:
    """Write the document atomically (temp file + ``os.replace``: a crash leaves the old file).

    Metadata that JSON would silently change (NaN, non-str keys, objects) is refused with
    the path of the offending value, before anything is written.
    """
    document = {
        "format": FILE_FORMAT,
        "format_version": FILE_VERSION,
        "nodes": [n.to_dict() for n in nodes],
        # Sorted: the file is then the same bytes whatever order edges were added in.
        "edges": sorted([u, v] for u, v in edges),
    }
    data = canonical_json(document, root="lineage")
    _fsio.write_file_atomic(Path(path), data + b"\n")


def read_lineage_file(path: Path) -> tuple[list[LineageNode], list[_Edge]]:
    """Nodes and edges of the file at ``path``, parsed and checked completely first, so a bad
    file raises before the caller replaces anything."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MissingFileError(f"no lineage file at {path}", path=path) from None
    except (OSError, ValueError) as exc:
        raise SerializationError(f"cannot read lineage file {path}: {exc}",
                                 path=str(path)) from exc
    return _parse_document(document, path)


def _parse_document(document: object, path: Path) -> tuple[list[LineageNode], list[_Edge]]:
    if not isinstance(document, dict) or document.get("format") != FILE_FORMAT:
        raise SerializationError(f"{path} is not a repro lineage file", path=str(path))
    if document.get("format_version") != FILE_VERSION:
        raise SerializationError(
            f"{path} has lineage format version {document.get('format_version')!r}; this "
            f"repro reads version {FILE_VERSION}; upgrade repro-lightning",
            path=str(path),
        )
    try:
        nodes = [LineageNode.from_dict(n) for n in document["nodes"]]
        edges = [(str(u), str(v)) for u, v in document["edges"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise SerializationError(f"{path} is a damaged lineage file: {exc!r}",
                                 path=str(path)) from exc
    return nodes, edges
