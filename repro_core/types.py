"""Typed records and closed sets shared by every layer: artifact types, run states, metadata,
and the grammar of names and keys (validated before any I/O)."""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import InvalidArgumentError, InvalidNameError

__all__ = [
    "DEFAULT_PROJECT",
    "MAX_VERSION",
    "ArtifactMetadata",
    "ArtifactType",
    "ParsedKey",
    "Run",
    "RunState",
    "check_tags",
    "check_text",
    "parse_key",
    "utc_now",
    "validate_alias",
    "validate_name",
    "validate_project",
]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION_RE = re.compile(r"v(0|[1-9][0-9]*)")
_DIGEST_PREFIX_RE = re.compile(r"(blake3|sha256):([0-9a-f]{4,64})")
DEFAULT_PROJECT = "default"
# SQLite integers are signed 64-bit: a bigger version number could never be stored, and
# Python would raise OverflowError deep inside the driver instead of a clear "not found".
MAX_VERSION = 2**63 - 1


def utc_now() -> str:
    """Current time as UTC ISO-8601 with microseconds (sortable as text)."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class ArtifactType(str, enum.Enum):
    """Standard artifact types; strings are accepted case-insensitively."""

    DATASET = "dataset"
    MODEL = "model"
    CHECKPOINT = "checkpoint"
    CONFIG = "config"
    METRICS = "metrics"
    EVALUATION = "evaluation"
    ENVIRONMENT = "environment"
    CODE = "code"
    EXPERIENCE = "experience"

    @classmethod
    def coerce(cls, value: str | ArtifactType) -> ArtifactType:
        """Return the member for ``value`` or raise a typed error listing the valid ones."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        valid = ", ".join(m.value for m in cls)
        raise InvalidArgumentError(
            f"unknown artifact type {value!r}; expected one of: {valid}", argument="type"
        )

    def __str__(self) -> str:
        return self.value


class RunState(str, enum.Enum):
    """Lifecycle of a run; every state but RUNNING is terminal.

    CRASHED (not in the seed) is what W&B shows for a run whose process died without a word
    (``kill -9``, OOM killer, power cut): recorded when a later open of the store finds the
    run's process gone from its host.
    """

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CRASHED = "crashed"

    @classmethod
    def coerce(cls, value: str | RunState) -> RunState:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        valid = ", ".join(m.value for m in cls)
        raise InvalidArgumentError(f"unknown run state {value!r}; expected one of: {valid}")

    @property
    def is_terminal(self) -> bool:
        return self is not RunState.RUNNING

    def __str__(self) -> str:
        return self.value


@dataclass
class ArtifactMetadata:
    """One artifact version as stored in the registry.

    ``hash`` is a self-describing digest (``blake3:<hex>``); ``path`` is a local, read-only path
    to the content once the artifact has been logged or used on this machine. Names live in a
    ``project`` (as in W&B): ``key`` is the fully qualified ``project/name:vN``.
    """

    name: str
    type: ArtifactType
    version: str
    hash: str | None = None
    size_bytes: int | None = None
    created_at: str = None  # type: ignore[assignment]  # filled in __post_init__ (seed API)
    run_id: str | None = None
    parent_artifacts: list[str] = None  # type: ignore[assignment]
    metadata: dict[str, Any] = None  # type: ignore[assignment]
    aliases: list[str] = field(default_factory=list)
    format: str | None = None
    path: Path | None = None
    project: str = DEFAULT_PROJECT

    def __post_init__(self) -> None:
        self.type = ArtifactType.coerce(self.type)
        if self.created_at is None:
            self.created_at = utc_now()
        if self.parent_artifacts is None:
            self.parent_artifacts = []
        if self.metadata is None:
            self.metadata = {}
        if self.path is not None:
            self.path = Path(self.path)

    @property
    def key(self) -> str:
        """``project/name:vN``, the key that names exactly this version in any context."""
        return f"{self.project}/{self.name}:{self.version}"

    @property
    def version_number(self) -> int:
        return int(self.version[1:])

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; ``from_dict(to_dict())`` round-trips."""
        out = dataclasses.asdict(self)
        out["type"] = self.type.value
        out["path"] = str(self.path) if self.path is not None else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtifactMetadata:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def validate_name(name: object, *, what: str = "artifact name") -> str:
    """Return ``name`` if it matches ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``, else raise."""
    if not isinstance(name, str):
        raise InvalidNameError(f"{what} must be a str, got {type(name).__name__}", name=name)
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1-128 characters from [A-Za-z0-9._-], starting with "
            "a letter or digit, without '..' (e.g. 'mnist-train' or 'resnet50.v2')",
            name=name,
        )
    return name


def validate_project(project: object) -> str:
    """Projects follow the artifact-name grammar: they are the first part of a key
    (``project/name:v3``), so ``/``, ``:`` and ``@`` cannot appear in them."""
    return validate_name(project, what="project name")


def check_tags(tags: object) -> list[str]:
    """Run tags: None or a list/tuple of short printable strings (``InvalidArgumentError``)."""
    if tags is None:
        return []
    if isinstance(tags, str) or not isinstance(tags, (list, tuple)):
        raise InvalidArgumentError(f"tags must be a list of str, got {tags!r}", argument="tags")
    return [check_text(t, "tag") for t in tags]


def check_text(value: object, what: str, *, limit: int = 256) -> str:
    """A free-text field stored as SQL text (run names, tags): non-empty, printable (no NUL —
    SQLite's C strings end there — no newline or terminal escape, which would forge lines in
    listings), valid Unicode (a lone surrogate cannot be encoded as UTF-8)."""
    ok = isinstance(value, str) and bool(value.strip()) and value.isprintable() \
        and len(value) <= limit and _encodable(value)
    if not ok:
        raise InvalidArgumentError(
            f"run {what} must be a non-empty str of at most {limit} characters, valid Unicode "
            f"and printable (no NUL, newline or other control character), got {value!r}",
            argument=what,
        )
    assert isinstance(value, str)
    return value


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. from a mis-decoded file name
        return False
    return True


def validate_alias(alias: object) -> str:
    """Aliases follow the name grammar and may not look like a version (``v3``)."""
    validate_name(alias, what="alias")
    assert isinstance(alias, str)
    if _VERSION_RE.fullmatch(alias):
        raise InvalidNameError(f"alias {alias!r} looks like a version number", name=alias)
    return alias


@dataclass(frozen=True)
class ParsedKey:
    """A parsed artifact key. Exactly one of version/alias/digest_prefix is set.

    ``project`` is None for a bare name (``model:v3``): the registry resolves it in the active
    run's project, then in ``default``.
    """

    name: str
    version: int | None = None
    alias: str | None = None
    digest_prefix: str | None = None
    project: str | None = None

    def text(self) -> str:
        """The key as a user would write it (for messages)."""
        prefix = f"{self.project}/" if self.project else ""
        if self.version is not None:
            return f"{prefix}{self.name}:v{self.version}"
        if self.digest_prefix is not None:
            return f"{prefix}{self.name}@{self.digest_prefix}"
        return f"{prefix}{self.name}:{self.alias}"


def parse_key(key: object, version: str | None = None) -> ParsedKey:
    """Parse ``[project/]name``, ``…:v3``, ``…:<alias>`` or ``…@blake3:<hex prefix>``.

    ``version`` (the seed's separate argument) may be ``vN``, ``N``, an alias or a digest prefix;
    giving a selector both in the key and in ``version`` is ambiguous and rejected.
    """
    if not isinstance(key, str):
        raise InvalidNameError(f"artifact key must be a str, got {type(key).__name__}", name=key)
    if version is not None and not isinstance(version, str):
        version = str(version)
    project, rest = _split_project(key)
    name, selector = _split_key(rest)
    validate_name(name)
    if version is not None:
        if selector is not None:
            raise InvalidArgumentError(
                f"key {key!r} already selects a version; drop version={version!r}",
                argument="version",
            )
        selector = version
    if selector is None:
        return ParsedKey(name=name, alias="latest", project=project)
    parsed = _parse_selector(name, selector, key)
    return dataclasses.replace(parsed, project=project)


def _split_project(key: str) -> tuple[str | None, str]:
    head, sep, rest = key.partition("/")
    if not sep:
        return None, key
    if "@" in head or ":" in head:  # the "/" belongs to a selector, which is invalid anyway
        return None, key
    return validate_project(head), rest


def _split_key(key: str) -> tuple[str, str | None]:
    if "@" in key:
        name, _, selector = key.partition("@")
        return name, "@" + selector
    if ":" in key:
        name, _, selector = key.partition(":")
        return name, selector
    return key, None


def _parse_selector(name: str, selector: str, key: str) -> ParsedKey:
    text = selector[1:] if selector.startswith("@") else selector
    match = _DIGEST_PREFIX_RE.fullmatch(text)
    if match:
        return ParsedKey(name=name, digest_prefix=text)
    if selector.startswith("@"):
        raise InvalidNameError(
            f"invalid digest selector in {key!r}: expected name@blake3:<4-64 hex chars>", name=key
        )
    if text.isascii() and text.isdigit():
        text = f"v{int(text)}"
    if _VERSION_RE.fullmatch(text):
        number = int(text[1:])
        if number < 1 or number > MAX_VERSION:
            raise InvalidNameError(
                f"invalid version in {key!r}: versions are numbered v1, v2, … (at most "
                f"v{MAX_VERSION})", name=key)
        return ParsedKey(name=name, version=number)
    validate_name(text, what="alias")
    return ParsedKey(name=name, alias=text)


@dataclass
class Run:
    """The handle ``init_run`` returns. On ranks other than 0 it carries rank 0's run id but
    nothing is written through it (``is_rank_zero`` is False)."""

    id: str | None
    name: str
    project: str
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    root: Path | None = None
    created_at: str = field(default_factory=utc_now)
    state: RunState = RunState.RUNNING
    rank: int = 0
    segment: int = 0  # 0 for a new run; n after the n-th resume (``init_run(resume=...)``)

    @property
    def resumed(self) -> bool:
        """Whether this process continues a run an earlier process started."""
        return self.segment > 0

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def dir(self) -> Path | None:
        """``<root>/runs/<run_id>``, where the human-readable exports go."""
        if self.root is None or self.id is None:
            return None
        return self.root / "runs" / self.id
