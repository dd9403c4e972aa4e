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
    "ArtifactMetadata",
    "ArtifactType",
    "ParsedKey",
    "Run",
    "RunState",
    "parse_key",
    "utc_now",
    "validate_alias",
    "validate_name",
]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION_RE = re.compile(r"v(0|[1-9][0-9]*)")
_DIGEST_PREFIX_RE = re.compile(r"(blake3|sha256):([0-9a-f]{4,64})")


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
    """Lifecycle of a run; the last three are terminal."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

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
    to the content once the artifact has been logged or used on this machine.
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
        """``name:vN``, the key that names exactly this version."""
        return f"{self.name}:{self.version}"

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


def validate_alias(alias: object) -> str:
    """Aliases follow the name grammar and may not look like a version (``v3``)."""
    validate_name(alias, what="alias")
    assert isinstance(alias, str)
    if _VERSION_RE.fullmatch(alias):
        raise InvalidNameError(f"alias {alias!r} looks like a version number", name=alias)
    return alias


@dataclass(frozen=True)
class ParsedKey:
    """A parsed artifact key. Exactly one of version/alias/digest_prefix is set, or none."""

    name: str
    version: int | None = None
    alias: str | None = None
    digest_prefix: str | None = None


def parse_key(key: object, version: str | None = None) -> ParsedKey:
    """Parse ``name``, ``name:v3``, ``name:<alias>`` or ``name@blake3:<hex prefix>``.

    ``version`` (the seed's separate argument) may be ``vN``, ``N``, an alias or a digest prefix;
    giving a selector both in the key and in ``version`` is ambiguous and rejected.
    """
    if not isinstance(key, str):
        raise InvalidNameError(f"artifact key must be a str, got {type(key).__name__}", name=key)
    name, selector = _split_key(key)
    validate_name(name)
    if version is not None:
        if selector is not None:
            raise InvalidArgumentError(
                f"key {key!r} already selects a version; drop version={version!r}",
                argument="version",
            )
        selector = str(version)
    if selector is None:
        return ParsedKey(name=name, alias="latest")
    return _parse_selector(name, selector, key)


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
        return ParsedKey(name=name, version=int(text[1:]))
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

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0

    @property
    def dir(self) -> Path | None:
        """``<root>/runs/<run_id>``, where the human-readable exports go."""
        if self.root is None or self.id is None:
            return None
        return self.root / "runs" / self.id
