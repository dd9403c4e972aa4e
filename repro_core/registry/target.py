"""Which database a store's registry lives in: its SQLite file, or a PostgreSQL server.

Three ways to name a PostgreSQL registry, as the docs promise: ``REPRO_REGISTRY``,
``init_run(..., registry=URL)``, and the store's config file ``<store>/registry.url`` (one
line, the URL without its password), which the first two write on first use. The file makes
the choice a property of the *store*: every later open of it — the CLI, a DDP worker, a
background writer — finds the same registry, and a store is never silently split between two
(its blobs described by one registry, its next runs logged into another). The file is written
only after the server answered a write open: a mistyped URL never binds a store.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InvalidArgumentError, StorageError
from .dialect import check_url, is_postgres_url, redact_url, strip_password

__all__ = ["CONFIG_NAME", "bind", "bound", "configured_url", "resolve", "write_config"]

CONFIG_NAME = "registry.url"
_MAX_CONFIG = 4096
# URLs given with a password in this process (``init_run(registry=...)``), by their written
# form: a later open of the bound store (the metrics writer, a reader) finds the password here,
# as it would in PGPASSWORD; it is never written anywhere.
_GIVEN: dict[str, str] = {}
# Stores this process was told to use a URL for (``init_run(registry=...)``), not bound yet.
_PENDING: dict[Path, str] = {}


def configured_url(root: Path) -> str | None:
    """The URL in ``root/registry.url``, validated (the file is read like any store input)."""
    path = root / CONFIG_NAME
    try:
        if path.is_symlink():
            raise StorageError(f"{path} is a symbolic link; a store's registry config must be "
                               "a plain file", path=path)
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_CONFIG + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}", path=path) from exc
    try:
        text = raw.decode("utf-8").strip()
        if len(raw) > _MAX_CONFIG or not text:
            raise ValueError("empty or too long")
        return check_url(text)
    except (ValueError, InvalidArgumentError) as exc:
        raise StorageError(f"{path} does not hold a PostgreSQL URL ({exc}); fix or remove it",
                           path=path) from None


def write_config(root: Path, url: str) -> None:
    """Bind ``root`` to ``url`` (written without its password, atomically)."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / CONFIG_NAME
    tmp = root / f".{CONFIG_NAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text(strip_password(url) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {path}: {exc}", path=path) from exc


def _same(a: str, b: str) -> bool:
    return strip_password(a).rstrip("/") == strip_password(b).rstrip("/")


def resolve(root: Path, explicit: str | None) -> tuple[str | None, bool]:
    """The PostgreSQL URL ``root``'s registry is at (None: its SQLite file), and whether the
    store still has to be bound to it — which the engine does only once the server has
    answered and the schema is in place (a mistyped URL must not bind the store).

    ``explicit`` is ``registry=`` or ``REPRO_REGISTRY``; a configured store must agree."""
    if explicit is not None and not is_postgres_url(explicit):
        check_url(explicit)  # raises the typed error naming the expected form
    configured = configured_url(root)
    if explicit is None:
        if configured:
            return _GIVEN.get(configured, configured), False
        pending = _PENDING.get(root)
        return (pending, True) if pending else (None, False)
    explicit = check_url(explicit)
    _GIVEN[strip_password(explicit)] = explicit
    if configured is not None:
        if not _same(configured, explicit):
            raise InvalidArgumentError(
                f"the store {root} keeps its registry at {redact_url(configured)}, not "
                f"{redact_url(explicit)}; unset REPRO_REGISTRY / registry= or copy the registry "
                f"with `repro migrate --root {root} --to URL`", argument="registry")
        return explicit, False  # the caller's copy may carry the password
    sqlite_file = root / "registry.sqlite"
    if sqlite_file.is_file() and sqlite_file.stat().st_size > 0:
        raise InvalidArgumentError(
            f"the store {root} has a SQLite registry; copy it into PostgreSQL first with "
            f"`repro migrate --root {root} --to {redact_url(explicit)}`", argument="registry")
    return explicit, True


def bind(root: Path, url: str) -> None:
    """``init_run(..., registry=url)``: this process opens the store at ``root`` in ``url``
    from now on; the store is bound (``registry.url``) at the first successful write open."""
    resolve(root, url)
    _PENDING[root] = url


def bound(root: Path, url: str) -> None:
    """The engine reached ``url`` for a write: record the binding (if no one did meanwhile)."""
    if configured_url(root) is None:
        write_config(root, url)
    _PENDING.pop(root, None)
