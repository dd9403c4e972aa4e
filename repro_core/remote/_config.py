"""Named remotes of a store (``repro remote add NAME URL``) and opening one.

A remote is a name and a URL, kept in the registry (``remotes`` table): ``s3://bucket/prefix``,
``gs://bucket/prefix``, ``file:///abs/path`` or a plain directory path, or
``wandb://[entity/]project`` (a push-only mirror). Credentials are never part of it: a URL
carrying ``user:secret@`` is refused, and the object stores find theirs through the standard
provider chain (``AWS_*``, ``AWS_PROFILE``, ``GOOGLE_APPLICATION_CREDENTIALS``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from ..errors import ArtifactNotFoundError, InvalidArgumentError
from ..registry import Registry
from ..store._remote import parse_url, redact_url
from ..store.base import StorageBackend
from ..types import utc_now

__all__ = ["default_remote", "list_remotes", "normalize_url", "open_backend", "remove_remote",
           "set_remote"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_LOOKS_LIKE_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:(?!//)")


def normalize_url(url: object) -> str:
    """The canonical form of a remote URL (a plain path becomes ``file:///abs``); checked
    before any I/O."""
    if not isinstance(url, (str, os.PathLike)):
        raise InvalidArgumentError(f"remote URL must be a string, got {type(url).__name__}",
                                   argument="url")
    text = os.fspath(url).strip()
    if not text:
        raise InvalidArgumentError("remote URL is empty", argument="url")
    if text.lower().startswith("wandb://"):
        from ..store.wandb_backend import WandBStorageBackend

        return str(WandBStorageBackend.from_url(text).url)  # validated, one canonical form
    if "://" not in text:
        if _LOOKS_LIKE_SCHEME.match(text):  # s3:/bucket, s3:bucket: a typo, not a directory
            raise InvalidArgumentError(
                f"remote URL {text[:100]!r} looks like a URL with a typo (expected "
                f"SCHEME://…, e.g. s3://bucket/prefix); for a directory whose name has a "
                f"colon, write ./{text[:100]}", argument="url")
        text = "file://" + str(Path(text).expanduser().absolute())
    return parse_url(text).url


def refuse_inside(url: str, root: Path) -> None:
    """A remote that is the store itself, or a folder inside it, would write ``meta/`` and
    ``blobs/`` among the store's own files: refused."""
    if not url.startswith("file://"):
        return
    where = Path(url[len("file://"):]).resolve()
    store = root.resolve()
    if where != store and (where / "registry.sqlite").exists():
        raise InvalidArgumentError(
            f"remote {where} is another repro store: a remote needs a directory of its own "
            "(two stores share versions through one remote they both push to and pull from; "
            "that store's `repro gc` would delete what a push put there)", argument="url")
    if where == store or store in where.parents:
        what = "this store" if where == store else "inside this store"
        raise InvalidArgumentError(
            f"remote {where} is {what} ({store}): a remote needs a place of its own",
            argument="url")


def check_remote(remote: object) -> str | None:
    """A run's ``remote=``: None, a remote name (resolved when the run starts, against the
    store's remotes) or a URL (checked now). Refused before any run or file exists."""
    if remote is None:
        return None
    if not isinstance(remote, str) or not remote.strip():
        raise InvalidArgumentError(f"remote must be a remote name or URL, got {remote!r}",
                                   argument="remote")
    text = remote.strip()
    if "://" in text or text.startswith(("/", ".", "~")):
        normalize_url(text)
    else:
        check_name(text)
    return text


def is_wandb(url: str) -> bool:
    return url.lower().startswith("wandb://")


def open_backend(url: str, **options: Any) -> StorageBackend:
    """The blob backend of a remote URL (fsspec for object stores and directories)."""
    if is_wandb(url):
        from ..store.wandb_backend import WandBStorageBackend

        return WandBStorageBackend.from_url(url)
    from ..store.fsspec_backend import FsspecStorageBackend

    return FsspecStorageBackend(url, **options)


def check_name(name: object) -> str:
    if not (isinstance(name, str) and _NAME.fullmatch(name)) or ".." in str(name):
        raise InvalidArgumentError(
            f"invalid remote name {name!r}: 1-64 characters from [A-Za-z0-9._-], starting "
            "with a letter or digit (e.g. 'origin')", argument="name")
    return name


def set_remote(registry: Registry, name: str, url: str, *, replace: bool = False) -> str:
    """Add (or with ``replace`` re-point) a remote; returns the stored URL."""
    check_name(name)
    normal = normalize_url(url)
    refuse_inside(normal, registry.root)
    with registry.transaction() as conn:
        existing = conn.execute("SELECT url FROM remotes WHERE name = ?", (name,)).fetchone()
        if existing is not None and not replace and existing[0] != normal:
            raise InvalidArgumentError(
                f"remote {name!r} already points at {redact_url(existing[0])}; remove it first "
                "or use `repro remote add --replace`", argument="name")
        conn.execute("INSERT INTO remotes (name, url, added_at) VALUES (?, ?, ?) ON CONFLICT"
                     " (name) DO UPDATE SET url = excluded.url", (name, normal, utc_now()))
    return normal


def remove_remote(registry: Registry, name: str) -> bool:
    check_name(name)
    with registry.transaction() as conn:
        return conn.execute("DELETE FROM remotes WHERE name = ?", (name,)).rowcount == 1


def list_remotes(registry: Registry) -> dict[str, str]:
    return {str(n): str(u) for n, u in registry._read(
        "SELECT name, url FROM remotes ORDER BY name")}


def default_remote(registry: Registry, name: str | None) -> tuple[str, str]:
    """``(name, url)`` of the remote a command means: the one named, else ``$REPRO_REMOTE``,
    else the only one, else ``origin``. A URL may stand for an unnamed remote."""
    from .. import constants

    remotes = list_remotes(registry)
    chosen = name or constants.REPRO_REMOTE
    if chosen is None:
        if len(remotes) == 1:
            chosen = next(iter(remotes))
        elif "origin" in remotes:
            chosen = "origin"
        else:
            raise ArtifactNotFoundError(
                "no remote given and none is the default: `repro remote add origin URL`, or "
                f"name one ({', '.join(remotes) or 'this store has none'})", key="remote")
    if chosen in remotes:
        return chosen, remotes[chosen]
    if "://" in chosen or chosen.startswith(("/", ".", "~")):
        normal = normalize_url(chosen)
        refuse_inside(normal, registry.root)
        return chosen, normal
    check_name(chosen)
    raise ArtifactNotFoundError(
        f"no remote named {chosen!r}; this store has: {', '.join(remotes) or 'none'} "
        "(`repro remote add NAME URL`)", key=chosen)
