"""What remote backends share: URL parsing, lazy fsspec imports, bounded retries with backoff.

Errors from a remote are sorted once here (httpx maps transport errors the same way):

- *transient* (connection refused or reset, timeouts, HTTP 5xx, throttling): retried
  ``retries`` times with exponential backoff, then one ``StorageError`` naming the URL;
- *permanent* (access denied, missing bucket): not retried (the answer would not change),
  translated by the backend into a ``StorageError`` that says what to fix;
- not found (``FileNotFoundError``): the backend decides (a missing blob is not an error).
"""

from __future__ import annotations

import errno
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .. import constants
from ..errors import InvalidArgumentError, StorageError

__all__ = ["RemoteURL", "Retrying", "import_filesystem", "is_transient", "parse_url"]

_T = TypeVar("_T")

# scheme -> (fsspec protocol, the module that implements it, its install hint)
_SCHEMES = {
    "s3": ("s3", "s3fs", "pip install 'repro-lightning[s3]'"),
    "gs": ("gcs", "gcsfs", "pip install gcsfs"),
    "gcs": ("gcs", "gcsfs", "pip install gcsfs"),
    "file": ("file", None, "pip install 'repro-lightning[s3]'"),
}
_URL = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<rest>.*)", re.IGNORECASE)
_SEGMENT = re.compile(r"[^/\x00]+")
# OSError numbers that mean "try again" (s3fs maps 5xx and throttling to EBUSY / EREMOTEIO).
_TRANSIENT_ERRNOS = {errno.EBUSY, errno.EAGAIN, errno.ETIMEDOUT, errno.ECONNRESET,
                     errno.ECONNREFUSED, errno.ECONNABORTED, errno.EPIPE,
                     getattr(errno, "EREMOTEIO", errno.EIO)}
_TRANSIENT_STATUS = {429, 500, 502, 503, 504}  # throttled, or the server's trouble
# Exception classes of botocore / aiohttp that mean "try again", matched by name so that
# classifying an error never imports a library the user does not have.
_TRANSIENT_NAMES = {
    ("botocore.exceptions", "ConnectionError"), ("botocore.exceptions", "HTTPClientError"),
    ("botocore.exceptions", "IncompleteReadError"),  # a body cut short: read it again
    ("asyncio.exceptions", "TimeoutError"),  # (Python 3.10: not yet the built-in one)
    ("fsspec.exceptions", "FSTimeoutError"),
    ("aiohttp.client_exceptions", "ClientConnectionError"),
    ("aiohttp.client_exceptions", "ClientPayloadError"),
}


@dataclass(frozen=True)
class RemoteURL:
    """A parsed store URL: ``root`` is the fsspec path of the store (``bucket/prefix``)."""

    url: str
    scheme: str
    protocol: str
    module: str | None
    hint: str
    root: str

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]


def redact_url(url: str) -> str:
    """A URL fit for a message: no ``user:password@``, query or fragment (a presigned
    URL's signature lives there)."""
    text = url.split("#", 1)[0].split("?", 1)[0]
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    host, slash, path = rest.partition("/")
    if "@" in host:
        host = "<credentials>@" + host.rsplit("@", 1)[1]
    return f"{scheme}{sep}{host}{slash}{path}"


def parse_url(url: object) -> RemoteURL:
    """Check a store URL before any I/O; say what is wrong and what would work."""
    if not isinstance(url, str):
        raise InvalidArgumentError(f"store URL must be a string, got {type(url).__name__}",
                                   argument="url")
    match = _URL.fullmatch(url.strip())
    if match is None:
        raise InvalidArgumentError(
            f"store URL {redact_url(url)!r} has no scheme: expected s3://bucket/prefix, "
            "gs://bucket/prefix or file:///absolute/path", argument="url")
    scheme, rest = match.group("scheme").lower(), match.group("rest")
    if scheme not in _SCHEMES:
        raise InvalidArgumentError(
            f"unknown store URL scheme {scheme!r} in {redact_url(url)!r}: supported are "
            f"{', '.join(s + '://' for s in _SCHEMES)}", argument="url")
    protocol, module, hint = _SCHEMES[scheme]
    if any(c in rest for c in "?#"):
        raise InvalidArgumentError(f"store URL {redact_url(url)!r} has a query or fragment; "
                                   "pass options as storage_options instead", argument="url")
    root = _file_root(url, rest) if scheme == "file" else _bucket_root(url, rest)
    return RemoteURL(f"{scheme}://{root}", scheme, protocol, module, hint, root)


def _file_root(url: str, rest: str) -> str:
    if not rest.startswith("/"):
        raise InvalidArgumentError(f"file URL {redact_url(url)!r} must name an absolute path: "
                                   "file:///absolute/path", argument="url")
    parts = [p for p in rest.split("/") if p]
    _check_segments(url, parts)
    return "/" + "/".join(parts)


def _bucket_root(url: str, rest: str) -> str:
    netloc = rest.split("/", 1)[0]
    if "@" in netloc or ":" in netloc:
        raise InvalidArgumentError(
            f"store URL {url.split('@')[-1]!r} carries credentials or a port: repro never "
            "stores credentials; use the provider's settings (AWS_ACCESS_KEY_ID / AWS_PROFILE "
            "/ AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS) or storage_options",
            argument="url")
    parts = rest.rstrip("/").split("/")
    if not parts[0]:
        raise InvalidArgumentError(f"store URL {redact_url(url)!r} names no bucket", argument="url")
    _check_segments(url, parts)
    return "/".join(parts)


def _check_segments(url: str, parts: list[str]) -> None:
    for part in parts:
        if not _SEGMENT.fullmatch(part) or part in (".", ".."):
            raise InvalidArgumentError(
                f"store URL {redact_url(url)!r} has an empty, '.' or '..' path segment",
                argument="url")


def import_filesystem(location: RemoteURL, options: dict[str, Any]) -> Any:
    """A fresh fsspec filesystem for ``location`` (imported only now: ``import repro_core``
    never imports fsspec). A missing package is one ModuleNotFoundError with the install hint."""
    for name in ("fsspec", location.module):
        if name is None:
            continue
        try:
            __import__(name)
        except ImportError as exc:
            raise ModuleNotFoundError(
                f"{location.scheme}:// stores need the {name!r} package: {location.hint}",
                name=name) from exc
    import fsspec

    # skip_instance_cache: fsspec would otherwise hand every backend of this URL the same
    # instance, with the first one's retry settings and a listing cache others cannot see.
    return fsspec.filesystem(location.protocol, skip_instance_cache=True, **options)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the same request may succeed (see the module docstring)."""
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, (PermissionError, FileNotFoundError, FileExistsError)):
        return False
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    if _http_status(exc) in _TRANSIENT_STATUS:
        return True
    return any((cls.__module__, cls.__name__) in _TRANSIENT_NAMES for cls in type(exc).__mro__)


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status of a botocore ``ClientError`` behind ``exc`` (s3fs maps only some
    statuses to errnos: a 502, 504 or 429 arrives as a plain ``OSError(EIO)``)."""
    seen: BaseException | None = exc
    for _ in range(4):  # the error, and what it was raised from
        if seen is None:
            return None
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return status if isinstance(status, int) else None
        seen = seen.__cause__ or seen.__context__
    return None


class Retrying:
    """Run one remote request, retrying transient failures with exponential backoff.

    ``retries`` and ``backoff`` default to ``REPRO_REMOTE_RETRIES`` / ``REPRO_REMOTE_BACKOFF``;
    the library's own retries are switched off by the backend, so this is the only loop and
    the total wait is bounded (about ``backoff * 2**retries``).
    """

    def __init__(self, url: str, retries: int | None, backoff: float | None) -> None:
        self.url = url
        self.retries = constants.REPRO_REMOTE_RETRIES if retries is None else retries
        self.backoff = constants.REPRO_REMOTE_BACKOFF if backoff is None else backoff
        if not isinstance(self.retries, int) or self.retries < 0:
            raise InvalidArgumentError(f"retries must be a whole number >= 0, got {retries!r}",
                                       argument="retries")
        if not isinstance(self.backoff, (int, float)) or not self.backoff >= 0:
            raise InvalidArgumentError(f"backoff must be seconds >= 0, got {backoff!r}",
                                       argument="backoff")

    def __call__(self, what: str, fn: Callable[[], _T]) -> _T:
        start = time.monotonic()
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == self.retries:
                    raise StorageError(
                        f"{what} at {self.url} failed: no answer after {attempt + 1} attempts "
                        f"in {time.monotonic() - start:.1f} s ({type(exc).__name__}: {exc}); "
                        "check the endpoint (AWS_ENDPOINT_URL) and the network",
                        path=self.url) from exc
                time.sleep(min(self.backoff * 2**attempt, 30.0) * random.uniform(0.5, 1.0))
        raise AssertionError("unreachable")  # the loop returns or raises
