"""The one place that knows how SQLite and PostgreSQL differ for the registry's SQL.

The registry's queries are written once, in the SQL both engines share (``ON CONFLICT``,
``RETURNING``, ``COALESCE``, ``substr``; no ``GLOB``, ``rowid`` aliases or ``lastrowid``).
What still differs is handled here:

- **Placeholders.** Queries use SQLite's ``?``; :func:`translate` turns them into psycopg's
  ``%s`` (and doubles literal ``%``, which psycopg would read as a placeholder). Results are
  cached: the registry issues a few hundred distinct statements.
- **Errors.** Code that must tell a constraint violation from a full disk catches the tuples
  below, which hold both drivers' classes (psycopg's only when it is installed).
- **URLs.** A registry is named by a path (SQLite) or a ``postgresql://`` URL; a URL's
  password never leaves memory (:func:`redact_url` for every message, :func:`strip_password`
  for anything written down).
- **The few queries that cannot be shared**: a recursive walk with several edge tables (SQLite
  allows a recursive term per ``UNION``, PostgreSQL only one, which a ``LATERAL`` join splits).
- **DDL.** PostgreSQL gets its own schema text (``schema_pg.py``: typed columns, identity
  keys); migrations after it are written in the shared SQL and run on both.
"""

from __future__ import annotations

import functools
import sqlite3
from typing import Any, Protocol
from urllib.parse import SplitResult, parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import InvalidArgumentError

__all__ = [
    "DATA_ERRORS",
    "DB_ERRORS",
    "INTEGRITY_ERRORS",
    "POSTGRES_SCHEMES",
    "DBConnection",
    "is_postgres_url",
    "redact_url",
    "strip_password",
    "translate",
]

POSTGRES_SCHEMES = ("postgresql", "postgres")


def _driver_errors() -> tuple[tuple[type[Exception], ...], ...]:
    base: list[type[Exception]] = [sqlite3.Error]
    integrity: list[type[Exception]] = [sqlite3.IntegrityError]
    data: list[type[Exception]] = [sqlite3.IntegrityError, sqlite3.DataError,
                                       sqlite3.InterfaceError, sqlite3.ProgrammingError]
    try:
        import psycopg
    except ImportError:
        pass
    else:
        base.append(psycopg.Error)
        integrity.append(psycopg.IntegrityError)
        # Not ProgrammingError: it covers a missing privilege or table too (retry those).
        data += [psycopg.IntegrityError, psycopg.DataError]
    return tuple(base), tuple(integrity), tuple(data)


# Any driver error; a constraint violation; a row the database can never accept (retrying it
# would never succeed, unlike a lost connection or a full disk).
_ERRORS = _driver_errors()
DB_ERRORS: tuple[type[Exception], ...] = _ERRORS[0]
INTEGRITY_ERRORS: tuple[type[Exception], ...] = _ERRORS[1]
DATA_ERRORS: tuple[type[Exception], ...] = _ERRORS[2]


class DBConnection(Protocol):
    """What the registry's code uses of a connection, on either engine."""

    dialect: str

    def execute(self, sql: str, values: Any = ..., /) -> Any: ...
    def executemany(self, sql: str, rows: Any, /) -> Any: ...
    def copy_rows(self, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]],
                  types: tuple[str, ...] | None = None) -> None: ...


def is_postgres_url(target: object) -> bool:
    """Whether ``target`` names a PostgreSQL registry (``postgresql://…``)."""
    return isinstance(target, str) and target.split("://", 1)[0].lower() in POSTGRES_SCHEMES \
        and "://" in target


def _split(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise InvalidArgumentError(f"invalid registry URL {redact_url(url)!r}: {exc}",
                                   argument="registry") from None
    return parts


# What a registry URL's query may set: anything else (``host=/path``, ``passfile``,
# ``sslkey``, ``service``, a ``password``) is refused — the URL may come from a store's
# ``registry.url``, which is untrusted input, and must not steer libpq to local files.
ALLOWED_PARAMS = frozenset({"options", "sslmode", "application_name", "connect_timeout",
                            "target_session_attrs", "channel_binding", "require_auth",
                            "sslrootcert"})
_SECRET_PARAMS = frozenset({"password", "sslpassword"})


def redact_url(url: str) -> str:
    """``url`` with its password (if any, in the authority or the query) shown as ``***``:
    the form used in every message."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable registry URL>"
    if parts.query:
        query = [(k, "***" if k.lower() in _SECRET_PARAMS else v)
                 for k, v in parse_qsl(parts.query, keep_blank_values=True)]
        parts = parts._replace(query=urlencode(query, safe="=-_.,"))
    if parts.password is None:
        return urlunsplit(parts)
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def password_of(url: str) -> str | None:
    """The password in ``url``'s authority, if any (to scrub it from a driver's message)."""
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def strip_password(url: str) -> str:
    """``url`` without its password: what may be written to a store's config (libpq then
    finds the password in ``PGPASSWORD`` or ``~/.pgpass``, as for ``psql``)."""
    parts = _split(url)
    if parts.password is None:
        return url
    user, host = parts.netloc.rsplit("@", 1)
    return urlunsplit(parts._replace(netloc=f"{user.split(':', 1)[0]}@{host}"))


def check_url(url: str) -> str:
    """Validate a PostgreSQL registry URL's shape (before any connection is tried)."""
    if not is_postgres_url(url):
        raise InvalidArgumentError(
            f"registry {redact_url(str(url))!r} is not a PostgreSQL URL "
            "(postgresql://[user[:password]@]host[:port]/database)", argument="registry")
    if any(ch in url for ch in "\x00\n\r"):
        raise InvalidArgumentError("registry URL holds control characters",
                                   argument="registry")
    parts = _split(url)
    if not parts.path.strip("/"):
        raise InvalidArgumentError(
            f"registry URL {redact_url(url)!r} names no database (…/database)",
            argument="registry")
    if not parts.hostname:
        raise InvalidArgumentError(
            f"registry URL {redact_url(url)!r} names no host (a Unix socket directory is "
            "not accepted: the URL may come from a store's config file)", argument="registry")
    names = {k.lower() for k, _ in parse_qsl(parts.query, keep_blank_values=True)}
    refused = sorted(names - ALLOWED_PARAMS)
    if refused:
        hint = (" (give the password as user:password@ in the URL, PGPASSWORD or ~/.pgpass)"
                if set(refused) & _SECRET_PARAMS else "")
        raise InvalidArgumentError(
            f"registry URL {redact_url(url)!r} sets {', '.join(refused)}, which repro does not "
            f"pass on{hint}; allowed: {', '.join(sorted(ALLOWED_PARAMS))}", argument="registry")
    return url


@functools.lru_cache(maxsize=2048)
def translate(sql: str) -> str:
    """SQLite-style ``?`` placeholders → psycopg's ``%s``; literal ``%`` doubled.

    ``?`` inside a quoted literal is kept (psycopg reads ``%`` everywhere, so it is doubled
    everywhere)."""
    out: list[str] = []
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
            out.append(ch)
        elif ch == "%":
            out.append("%%")
        elif ch == "?" and not quoted:
            out.append("%s")
        else:
            out.append(ch)
    return "".join(out)


# Every version and run reachable downstream of a version (itself included): parent edges,
# runs that used a version, what those runs logged. Rows: (kind 'v'/'r', id).
DOWNSTREAM = {
    "sqlite": (
        "WITH RECURSIVE down(kind, id) AS (SELECT 'v', ?"
        " UNION SELECT 'v', ap.child_id FROM artifact_parents ap JOIN down"
        " ON down.kind = 'v' AND ap.parent_id = down.id"
        " UNION SELECT 'r', ri.run_id FROM run_inputs ri JOIN down"
        " ON down.kind = 'v' AND ri.version_id = down.id"
        " UNION SELECT 'v', ro.version_id FROM run_outputs ro JOIN down"
        " ON down.kind = 'r' AND ro.run_id = down.id)"
        " SELECT kind, id FROM down"),
    "postgresql": (
        "WITH RECURSIVE down(kind, vid, rid) AS ("
        " SELECT 'v', CAST(? AS BIGINT), CAST(NULL AS TEXT)"
        " UNION SELECT x.kind, x.vid, x.rid FROM down, LATERAL ("
        "  SELECT 'v', ap.child_id, CAST(NULL AS TEXT) FROM artifact_parents ap"
        "  WHERE down.kind = 'v' AND ap.parent_id = down.vid"
        "  UNION ALL SELECT 'r', CAST(NULL AS BIGINT), ri.run_id FROM run_inputs ri"
        "  WHERE down.kind = 'v' AND ri.version_id = down.vid"
        "  UNION ALL SELECT 'v', ro.version_id, CAST(NULL AS TEXT) FROM run_outputs ro"
        "  WHERE down.kind = 'r' AND ro.run_id = down.rid) x(kind, vid, rid))"
        " SELECT kind, COALESCE(CAST(vid AS TEXT), rid) FROM down"),
}


def params(values: Any) -> Any:
    """psycopg formats a query only when it gets parameters: always give it some."""
    return () if values is None else values
