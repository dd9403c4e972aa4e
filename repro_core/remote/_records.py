"""The registry rows a remote carries, as JSON records under ``meta/``, and their checks.

Layout (beside ``blobs/``)::

    meta/versions/<project>/<name>/<number:012d>.json   one per version: claimed create-if-absent
    meta/aliases/<project>/<name>/<alias>.json          where an alias points (last push wins)
    meta/runs/<run_id>.json                             a run: its bundle's digest and revision

A version is identified across stores by its **uid**, a hash of what never changes about it
(project, name, content digest, creation time, logging run): the number may change once, when
two stores logged the same number offline (see ``_numbering``). Whatever is read back is
untrusted: every field is checked, and a record whose uid does not match its fields, or whose
path does not match its content, is an ``IntegrityError`` — never a row.

A chunked version (``chunks``) also names its chunk manifest (``"manifest"``), which must be
one of its blobs; its ``digest`` is the whole file's and is not a blob. Such a record is
written as ``format_version`` 2, so that a repro without chunked storage refuses it ("from a
newer repro") instead of importing a row it would serve as a missing blob; every other record
stays at 1, readable by both.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from .._safepath import component_problem
from ..errors import IntegrityError, ReproError
from ..hashing import hash_bytes, parse_digest
from ..registry.records import VersionRow
from ..types import ArtifactType, validate_alias, validate_name, validate_project

__all__ = [
    "FORMATS", "RUN_ID", "AliasRecord", "RemoteVersion", "RunRecord", "VersionRef",
    "alias_path", "decode", "encode", "ref_path", "run_path", "version_path", "version_uid",
]

RECORD_FORMAT = 1
CHUNKED_FORMAT = 2  # a version record naming a chunk manifest (see the module docstring)
FORMATS = frozenset({"json", "text", "bytes", "safetensors", "npy", "file", "directory"})
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{3,63}")
_UID = re.compile(r"[0-9a-f]{32}")
_MAX_NUMBER = 2**62
_MAX_TEXT = 4096


def version_uid(project: str, name: str, digest: str, created_at: str,
                run_id: str | None) -> str:
    """A version's identity in every store (what a renumbering or a pull leaves unchanged)."""
    text = "\0".join((project, name, digest, created_at, run_id or ""))
    return hash_bytes(text.encode("utf-8"), "blake3").split(":", 1)[1][:32]


def version_path(project: str, name: str, number: int) -> str:
    return f"versions/{project}/{name}/{number:012d}.json"


def alias_path(project: str, name: str, alias: str) -> str:
    return f"aliases/{project}/{name}/{alias}.json"


def run_path(run_id: str) -> str:
    return f"runs/{run_id}.json"


#: ``(uid, project, name, number)``: a version on a remote, and the path of its record
VersionRef = tuple[str, str, str, int]


def ref_path(ref: VersionRef) -> str:
    return version_path(ref[1], ref[2], ref[3])


@dataclass(frozen=True)
class RemoteVersion:
    """One version as a remote records it."""

    uid: str
    project: str
    name: str
    number: int
    type: str
    digest: str
    size: int
    format: str
    run_id: str | None
    created_at: str
    metadata: dict[str, Any]
    filename: str | None
    blobs: tuple[tuple[str, int], ...]
    parents: tuple[VersionRef, ...]
    pruned_at: str | None = None
    manifest: str | None = None  # chunked content: its manifest blob (one of ``blobs``)

    @property
    def key(self) -> str:
        return f"{self.project}/{self.name}:v{self.number}"

    @classmethod
    def from_row(cls, row: VersionRow, number: int, blobs: list[tuple[str, int]],
                 parents: list[VersionRef]) -> RemoteVersion:
        return cls(uid=version_uid(row.project, row.name, row.digest, row.created_at,
                                   row.run_id),
                   project=row.project, name=row.name, number=number, type=row.type,
                   digest=row.digest, size=row.size, format=row.format, run_id=row.run_id,
                   created_at=row.created_at, metadata=dict(row.metadata),
                   filename=row.filename, blobs=tuple(sorted(blobs)),
                   parents=tuple(sorted(set(parents))), pruned_at=row.pruned_at,
                   manifest=row.manifest)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "version", "format_version": RECORD_FORMAT, "uid": self.uid,
            "project": self.project, "name": self.name, "number": self.number,
            "type": self.type, "digest": self.digest, "size": self.size,
            "format": self.format, "run_id": self.run_id, "created_at": self.created_at,
            "metadata": self.metadata, "filename": self.filename,
            "blobs": [list(b) for b in self.blobs], "parents": [list(p) for p in self.parents],
            "pruned_at": self.pruned_at}
        if self.manifest is not None:
            out.update(format_version=CHUNKED_FORMAT, manifest=self.manifest)
        return out


@dataclass(frozen=True)
class AliasRecord:
    project: str
    name: str
    alias: str
    uid: str
    number: int
    at: str

    def to_json(self) -> dict[str, Any]:
        return {"kind": "alias", "format_version": RECORD_FORMAT, "project": self.project,
                "name": self.name, "alias": self.alias, "uid": self.uid,
                "number": self.number, "at": self.at}


@dataclass(frozen=True)
class RunRecord:
    """A run on a remote: its bundle (a blob: rows, metrics, edges, exports) and revision.

    ``revision`` orders two pushes of one run (a copy pulled mid-run, then pushed back, must
    not replace the finished run): ``(finished, segment, rows)``.
    """

    run_id: str
    bundle: str
    bundle_size: int
    revision: tuple[int, int, int]
    #: every version the bundle names (outputs, inputs, TTRL models): where to find it
    versions: tuple[VersionRef, ...] = field(default=())
    #: which of them the run used: a pull of one of its outputs needs these, not its other
    #: outputs (None: a record that does not say, so every version is followed)
    inputs: tuple[VersionRef, ...] | None = None
    #: when the run was created: with the id, what tells two runs apart (ids may be chosen
    #: by users: ``init_run(run_id="baseline")`` in two stores is two runs)
    created_at: str = ""
    #: the bundle this record replaced: kept one push longer, so that a pull that read the
    #: previous record just before can still fetch it
    previous: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {"kind": "run", "format_version": RECORD_FORMAT, "run_id": self.run_id,
               "bundle": self.bundle, "bundle_size": self.bundle_size,
               "revision": list(self.revision), "created_at": self.created_at,
               "previous": self.previous,
               "versions": [list(v) for v in self.versions]}
        if self.inputs is not None:
            out["inputs"] = [list(v) for v in self.inputs]
        return out


def encode(record: RemoteVersion | AliasRecord | RunRecord) -> bytes:
    return json.dumps(record.to_json(), sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")


def decode(data: bytes, where: str) -> RemoteVersion | AliasRecord | RunRecord:
    """A record read from a remote, every field checked (``IntegrityError`` naming ``where``)."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict) or type(raw.get("format_version")) is not int \
                or raw["format_version"] not in (RECORD_FORMAT, CHUNKED_FORMAT):
            raise ValueError("not a repro record (or one from a newer repro)")
        kind = raw.get("kind")
        if raw["format_version"] == CHUNKED_FORMAT and kind != "version":
            raise ValueError(f"a {str(kind)[:40]!r} record of format {CHUNKED_FORMAT}")
        if kind == "version":
            return _version(raw)
        if kind == "alias":
            return _alias(raw)
        if kind == "run":
            return _run(raw)
        raise ValueError(f"unknown record kind {str(kind)[:40]!r}")
    except (ValueError, TypeError, KeyError, ReproError) as exc:
        raise IntegrityError(f"remote record {where} is damaged or forged: {exc}",
                             path=where) from None


def _version(raw: dict[str, Any]) -> RemoteVersion:
    project, name = validate_project(raw["project"]), validate_name(raw["name"])
    digest = _digest(raw["digest"])
    run_id = raw["run_id"]
    if run_id is not None and not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
        raise ValueError("bad run id")
    created_at = _text(raw["created_at"])
    version = RemoteVersion(
        uid=_uid(raw["uid"]), project=project, name=name, number=_number(raw["number"]),
        type=ArtifactType.coerce(raw["type"]).value, digest=digest, size=_size(raw["size"]),
        format=_choice(raw["format"], FORMATS), run_id=run_id, created_at=created_at,
        metadata=_dict(raw["metadata"]), filename=_filename(raw.get("filename")),
        blobs=tuple(_blob(b) for b in _list(raw["blobs"])),
        parents=tuple(_ref(p) for p in _list(raw["parents"])),
        pruned_at=_optional_text(raw.get("pruned_at")),
        manifest=_manifest(raw))
    if version.uid != version_uid(project, name, digest, created_at, run_id):
        raise ValueError("its uid does not match its fields")
    if not version.blobs:
        raise ValueError("it names no blob")
    _check_chunked(version)
    return version


def _manifest(raw: dict[str, Any]) -> str | None:
    """The chunk manifest a version record names (only a format-2 record names one)."""
    chunked = raw["format_version"] == CHUNKED_FORMAT
    if not chunked:
        if raw.get("manifest") is not None:
            raise ValueError(f"a chunk manifest in a record of format {RECORD_FORMAT}")
        return None
    return _digest(raw.get("manifest"))


def _check_chunked(version: RemoteVersion) -> None:
    """A chunked record's manifest is one of its blobs, of the version's digest algorithm;
    a chunked directory does not exist (a directory's digest is its own manifest's). What
    the manifest lists is checked once its blob is fetched (``_pull``)."""
    if version.manifest is None:
        return
    if version.format == "directory":
        raise ValueError("a directory version with a chunk manifest")
    if version.manifest not in {d for d, _ in version.blobs}:
        raise ValueError(f"its chunk manifest {version.manifest} is not one of its blobs")
    if version.manifest.split(":", 1)[0] != version.digest.split(":", 1)[0]:
        raise ValueError("its chunk manifest uses another digest algorithm than its content")


def _alias(raw: dict[str, Any]) -> AliasRecord:
    return AliasRecord(project=validate_project(raw["project"]), name=validate_name(raw["name"]),
                       alias=validate_alias(raw["alias"]), uid=_uid(raw["uid"]),
                       number=_number(raw["number"]), at=_text(raw["at"]))


def _run(raw: dict[str, Any]) -> RunRecord:
    run_id = raw["run_id"]
    if not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
        raise ValueError("bad run id")
    revision = _list(raw["revision"])
    if len(revision) != 3:
        raise ValueError("bad revision")
    versions = tuple(_ref(v) for v in _list(raw["versions"]))
    inputs = None if raw.get("inputs") is None else tuple(
        _ref(v) for v in _list(raw["inputs"]))
    if inputs is not None and not set(inputs) <= set(versions):
        raise ValueError("its inputs are not among its versions")
    return RunRecord(run_id=run_id, bundle=_digest(raw["bundle"]),
                     bundle_size=_size(raw["bundle_size"]),
                     revision=(_size(revision[0]), _size(revision[1]), _size(revision[2])),
                     versions=versions, inputs=inputs,
                     created_at=_text(raw.get("created_at", "")) if raw.get("created_at")
                     else "",
                     previous=None if raw.get("previous") is None
                     else _digest(raw["previous"]))


def _digest(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("bad digest")
    parse_digest(value)
    return value


def _uid(value: object) -> str:
    if not (isinstance(value, str) and _UID.fullmatch(value)):
        raise ValueError("bad uid")
    return value


def _number(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < _MAX_NUMBER:
        raise ValueError(f"bad version number {value!r}"[:80])
    return value


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"bad size {value!r}"[:80])
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or len(value) > _MAX_TEXT or not value.isprintable():
        raise ValueError("bad text field")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _filename(value: object) -> str | None:
    """The name a version is served under: one path component (it becomes a path in the
    cache, which checks it again; a record naming ``../x`` is forged, so refuse it here)."""
    name = _optional_text(value)
    if name is not None and component_problem(name) is not None:
        raise ValueError(f"bad file name {name[:80]!r}")
    return name


def _choice(value: object, allowed: frozenset[str]) -> str:
    if value not in allowed:
        raise ValueError(f"bad value {str(value)[:40]!r}")
    assert isinstance(value, str)
    return value


def _dict(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("metadata is not an object")
    return value


def _list(value: object) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError("expected a list")
    return value


def _ref(value: object) -> VersionRef:
    if not (isinstance(value, list) and len(value) == 4):
        raise ValueError("bad version reference")
    return (_uid(value[0]), validate_project(value[1]), validate_name(value[2]),
            _number(value[3]))


def _blob(value: object) -> tuple[str, int]:
    if not (isinstance(value, list) and len(value) == 2):
        raise ValueError("bad blob entry")
    return _digest(value[0]), _size(value[1])
