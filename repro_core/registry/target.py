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

import errno
import os
import secrets
import stat
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
    """The URL in ``root/registry.url``, validated (the file is read like any store input:
    a plain file only — a symlink, FIFO or device is refused, never followed or waited on)."""
    path = root / CONFIG_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StorageError(f"{path} is a symbolic link; a store's registry config must "
                               "be a plain file", path=path) from None
        raise StorageError(f"cannot read {path}: {exc}", path=path) from exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StorageError(f"{path} is not a plain file", path=path)
        raw = os.read(fd, _MAX_CONFIG + 1)
    finally:
        os.close(fd)
    try:
        text = raw.decode("utf-8").strip()
        if len(raw) > _MAX_CONFIG or not text:
            raise ValueError("empty or too long")
        return check_url(text)
    except (ValueError, InvalidArgumentError) as exc:
        raise StorageError(f"{path} does not hold a usable PostgreSQL URL ({exc}); fix it "
                           "(it names the store's registry: removing it would leave the store "
                           "without one)", path=path) from None


def write_config(root: Path, url: str, *, exclusive: bool = False) -> bool:
    """Bind ``root`` to ``url`` (written without its password). ``exclusive``: only if no
    binding exists (two processes binding at once: the first wins, the other is told).
    Returns whether this call wrote it."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / CONFIG_NAME
    tmp = root / f".{CONFIG_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(strip_password(url) + "\n")
        if not exclusive:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if a binding appeared meanwhile
            return True
        except FileExistsError:
            return False
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc}", path=path) from exc
    finally:
        tmp.unlink(missing_ok=True)


def _same(a: str, b: str) -> bool:
    return _key(a) == _key(b)


def _key(url: str) -> str:
    return strip_password(url).rstrip("/")


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
            return _GIVEN.get(_key(configured), configured), False
        pending = _PENDING.get(root)
        return (pending, True) if pending else (None, False)
    explicit = check_url(explicit)
    _GIVEN[_key(explicit)] = explicit
    if configured is not None:
        if not _same(configured, explicit):
            raise InvalidArgumentError(
                f"the store {root} keeps its registry at {redact_url(configured)}, not "
                f"{redact_url(explicit)}; unset REPRO_REGISTRY / registry= (a store keeps one "
                "registry; to move it: `repro migrate --to sqlite`, then `--to` the new URL)",
                argument="registry")
        return explicit, False  # the caller's copy may carry the password
    sqlite_file = root / "registry.sqlite"
    if sqlite_file.is_file() and sqlite_file.stat().st_size > 0:
        raise InvalidArgumentError(
            f"the store {root} has a SQLite registry; copy it into PostgreSQL first with "
            f"`repro migrate --root {root} --to {strip_password(explicit)}` (the password "
            "from PGPASSWORD or ~/.pgpass)", argument="registry")
    return explicit, True


def bind(root: Path, url: str) -> None:
    """``init_run(..., registry=url)``: this process opens the store at ``root`` in ``url``
    from now on; the store is bound (``registry.url``) at the first successful write open."""
    resolve(root, url)
    _PENDING[root] = url


def bound(root: Path, url: str) -> None:
    """The engine reached ``url`` for a write: record the binding (if no one did meanwhile;
    a different binding made meanwhile by another process is refused, not overwritten)."""
    if not write_config(root, url, exclusive=True):
        configured = configured_url(root)
        if configured is None or not _same(configured, url):
            raise InvalidArgumentError(
                f"the store {root} was just bound to another registry "
                f"({redact_url(configured or '?')}) by another process", argument="registry")
    _PENDING.pop(root, None)
