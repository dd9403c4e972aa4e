"""What mirroring a repro version into W&B decides before W&B is touched.

The ``wandb://[ENTITY/]PROJECT`` URL and the W&B aliases and metadata of a version are worked
out here, without I/O and without importing ``wandb``, so that every bad argument is refused
(``InvalidArgumentError`` / ``InvalidNameError``) before a run is opened or a file is staged:
a push that fails on its arguments must not leave an offline run behind it.

W&B's rules, as its documentation and its 0.31 client state them: names and aliases are 1-128
characters; an alias may contain anything but ``/`` and ``:``; an alias ``v<N>`` is W&B's own
(it would be ignored); ``latest`` is W&B's own too (it moves to the newest version of a
collection). repro names and aliases (``[A-Za-z0-9._-]``) already fit, so aliases are only
shortened when ``<name>-<alias>`` passes 128 characters.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidArgumentError
from ..hashing import parse_digest
from ..types import validate_alias, validate_name, validate_project
from ._remote import redact_url

__all__ = ["MirrorRequest", "WandBTarget", "check_mirror", "check_wandb_aliases",
           "check_wandb_name", "fit_alias", "json_safe", "parse_wandb_url"]

NAME_LIMIT = 128  # W&B: entity, project, artifact name and alias lengths
_SCHEME = "wandb://"
# The characters W&B documents for names (letters, digits, '_', '-', '.'); the client itself
# refuses only '/\#?%:' in a project, but a URL is also a shell word and a registry key.
_WANDB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_DEPTH = 32  # nesting kept in mirrored metadata (W&B stores it as JSON)


@dataclass(frozen=True)
class WandBTarget:
    """Where a ``wandb://`` URL points: an entity (None: the logged-in user's default) and a
    project."""

    project: str
    entity: str | None = None

    @property
    def url(self) -> str:
        where = f"{self.entity}/{self.project}" if self.entity else self.project
        return _SCHEME + where


def _masked(url: str) -> str:
    """The URL fit for a message: any part that could hold a secret (``user:key@``, a query,
    a fragment) is not repeated."""
    body = url[len(_SCHEME):]
    body = re.split(r"[?#]", body, maxsplit=1)[0]
    parts = ["<not shown>" if any(c in p for c in ":@") else p for p in body.split("/")]
    return _SCHEME + "/".join(parts)


def parse_wandb_url(url: object) -> WandBTarget:
    """``wandb://PROJECT`` or ``wandb://ENTITY/PROJECT``, or ``InvalidArgumentError``.

    A key never belongs in a URL (URLs are stored in the registry, printed and shared): W&B
    finds it itself, from ``wandb login`` or ``WANDB_API_KEY``."""
    if not isinstance(url, str):
        raise InvalidArgumentError(f"W&B URL must be a string, got {type(url).__name__}",
                                   argument="url")
    text = url.strip()
    if not text.lower().startswith(_SCHEME):
        raise InvalidArgumentError(f"{redact_url(text)!r} is not a W&B URL: expected "
                                   "wandb://PROJECT or wandb://ENTITY/PROJECT", argument="url")
    body = text[len(_SCHEME):]
    if "@" in body or ":" in body:
        raise InvalidArgumentError(
            f"W&B URL {_masked(text)!r} carries credentials or a port; repro never stores "
            "credentials in a URL: use wandb://ENTITY/PROJECT and log in with `wandb login` "
            "or WANDB_API_KEY", argument="url")
    if "?" in body or "#" in body:
        raise InvalidArgumentError(f"W&B URL {_masked(text)!r} has a query or fragment: use "
                                   "wandb://PROJECT or wandb://ENTITY/PROJECT", argument="url")
    parts = body.split("/")
    if len(parts) > 2:
        raise InvalidArgumentError(f"W&B URL {text!r} has {len(parts)} parts: use "
                                   "wandb://PROJECT or wandb://ENTITY/PROJECT (no trailing "
                                   "'/')", argument="url")
    *entity, project = parts
    return WandBTarget(check_wandb_name(project, "project"),
                       check_wandb_name(entity[0], "entity") if entity else None)


def check_wandb_name(value: object, what: str) -> str:
    """A W&B entity or project name, or ``InvalidArgumentError`` saying what fits."""
    if not isinstance(value, str) or not _WANDB_NAME.fullmatch(value) or ".." in value:
        shown = value if isinstance(value, str) else type(value).__name__
        raise InvalidArgumentError(
            f"invalid W&B {what} {shown!r}: use 1-{NAME_LIMIT} letters, digits, '_', '-' or "
            "'.', starting with a letter or digit (e.g. 'my-team/mnist')", argument=what)
    return value


def check_wandb_aliases(aliases: object) -> list[str]:
    """Aliases given to W&B as they are (``upload(aliases=…)``): 1-128 characters, no ``/``
    or ``:`` (``InvalidArgumentError`` here rather than W&B's ``ValueError`` mid-upload)."""
    if isinstance(aliases, str) or not isinstance(aliases, Sequence) or not all(
            isinstance(a, str) and 0 < len(a) <= NAME_LIMIT and not set(a) & set("/:")
            and a.isprintable() for a in aliases):
        raise InvalidArgumentError(f"W&B aliases must be a list of 1-{NAME_LIMIT} printable "
                                   f"characters without '/' or ':', got {aliases!r}",
                                   argument="aliases")
    return list(aliases)


def fit_alias(alias: str) -> str:
    """``alias`` within W&B's 128 characters: a longer one keeps its first 119 characters
    and ends in 8 hex digits of its SHA-256, so two long aliases stay distinct and the same
    one is always shortened the same way."""
    if len(alias) <= NAME_LIMIT:
        return alias
    tag = hashlib.sha256(alias.encode()).hexdigest()[:8]
    return f"{alias[:NAME_LIMIT - 9]}-{tag}"


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON W&B accepts: W&B refuses ±inf (and turns NaN into null), so
    non-finite floats become the strings ``"inf"``, ``"-inf"`` and ``"nan"`` rather than
    fail a push or lose the value; keys become strings; what JSON cannot hold, its ``repr``."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if depth >= _MAX_DEPTH:
        return repr(value)[:1000]
    if isinstance(value, Mapping):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    return repr(value)[:1000]


@dataclass(frozen=True)
class MirrorRequest:
    """A version to mirror, checked: its W&B aliases and metadata, its parents' digests."""

    digest: str
    aliases: tuple[str, ...]
    parents: tuple[str, ...]
    metadata: dict[str, Any]


def _check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidArgumentError(f"version must be an int >= 1 (repro numbers versions from "
                                   f"v1), got {version!r}", argument="version")
    return version


def _check_type(kind: object) -> str:
    text = getattr(kind, "value", kind)  # an ArtifactType member is accepted as its value
    if not isinstance(text, str) or not _WANDB_NAME.fullmatch(text):
        raise InvalidArgumentError(f"type must be an artifact type such as 'model', got "
                                   f"{kind!r}", argument="type")
    return text


def _check_digests(values: object, what: str) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise InvalidArgumentError(f"{what} must be a sequence of digests, got {values!r}",
                                   argument=what)
    for value in values:
        try:
            parse_digest(value)
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"{what}: {exc}", argument=what) from None
    return tuple(dict.fromkeys(values))


def check_mirror(*, digest: object, project: object, name: object, version: object,
                 kind: object, aliases: object, parents: object,
                 metadata: object) -> MirrorRequest:
    """Every argument of ``mirror_version`` checked (nothing is touched yet), and what W&B
    will be given: aliases ``<name>-v<version>`` then ``<name>-<alias>`` per repro alias
    (``latest`` included: W&B's own ``latest`` means the newest version of one digest's
    collection, not of the repro name), and metadata under ``repro`` with the caller's own
    under ``metadata`` (no key of the caller's can clobber repro's, and W&B's limit of 100
    top-level keys cannot be reached)."""
    parse_digest(digest)
    assert isinstance(digest, str)
    project, name = validate_project(project), validate_name(name)
    number, type_name = _check_version(version), _check_type(kind)
    if isinstance(aliases, str) or not isinstance(aliases, Sequence):
        raise InvalidArgumentError(f"aliases must be a sequence of str, got {aliases!r}",
                                   argument="aliases")
    repro_aliases = [validate_alias(a) for a in aliases]
    parent_digests = _check_digests(parents, "parents")
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InvalidArgumentError(f"metadata must be a mapping or None, got "
                                   f"{type(metadata).__name__}", argument="metadata")
    wandb_aliases = [fit_alias(f"{name}-v{number}")]
    wandb_aliases += [fit_alias(f"{name}-{a}") for a in repro_aliases]
    repro = {"project": project, "name": name, "version": number, "type": type_name,
             "digest": digest, "aliases": repro_aliases, "parents": list(parent_digests)}
    meta: dict[str, Any] = {"digest": digest, "repro": repro,
                            "metadata": json_safe(dict(metadata or {}))}
    return MirrorRequest(digest, tuple(dict.fromkeys(wandb_aliases)), parent_digests, meta)
