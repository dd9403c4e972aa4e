"""The one redactor every string passes through on its way into the store, whatever the entry
point: ``scrub`` for records (configs, metadata, exported run records), ``scrub_text`` for text
repro writes itself (state reasons, tracebacks, error messages), ``scrub_patch`` for a
``git diff``.

All three use :class:`~.redact.Redactor` with ``REPRO_REDACT_ALLOW`` / ``REPRO_REDACT_DENY``
(plus optional ``allow``/``deny`` patterns) and give the same answers as ``capture_config``:
under a secret-looking key anything but a number/bool/None becomes ``"<redacted>"``, and every
string is scrubbed of credentials by value (URL userinfo, ``password: …``, auth headers, JWTs,
private key blocks, token formats; see :mod:`._values`). They are idempotent:
``scrub(scrub(x)) == scrub(x)``, so scrubbing at several boundaries is harmless.

What is *not* scrubbed: content the user logs as artifact data (content-addressed bytes are
stored exactly as given), and experience inputs/outputs beyond value rules (they are data: a
field called ``key`` is not a secret; ``ttrl.capture_value`` uses ``allow=["*"]``).

Cost (CPython 3.11, CPU time on the shared dev box, where ``json.dumps`` of a 10-key dict takes
3 µs): ``scrub(None)``/``scrub({})`` 0.1 µs; a 3-key metadata dict 4 µs, a 10-key one 7 µs (half
of it reading ``REPRO_REDACT_*`` from ``os.environ``; key verdicts and short strings are cached
per policy); a 40-leaf training config 25 µs; a 370-byte traceback 55 µs; a 1 MiB patch
0.1-0.15 s. All linear in the input. On a hot path (TTRL updates at >100k/s) guard the call:
``meta = scrub(meta) if meta else meta``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from .redact import Redactor

__all__ = ["scrub", "scrub_patch", "scrub_text"]

T = TypeVar("T")


def scrub(
    value: T, *, allow: Iterable[str] | None = None, deny: Iterable[str] | None = None
) -> T:
    """A copy of a JSON-like tree (dicts, lists, tuples, strings, numbers) safe to store.

    Secret-named keys lose their non-numeric values, every string (keys included) is scrubbed
    as text; other leaves are returned unchanged. None, empty containers and numbers are
    returned as they are, at once. Raises ``SerializationError`` if two keys become one once
    their credentials are redacted (never a silent loss).
    """
    if not value or isinstance(value, (int, float)):
        return value
    result: T = Redactor.from_settings(allow, deny).record(value)
    return result


def scrub_text(
    text: str,
    *,
    code: bool = False,
    allow: Iterable[str] | None = None,
    deny: Iterable[str] | None = None,
) -> str:
    """``text`` with credentials replaced by ``<redacted>``: free text such as a state reason,
    an exception message or a traceback (``name = value`` pairs judged by name; bare values
    too, see :mod:`._values`). ``code=True`` for program source (a function captured by
    ``@track(capture_source=True)``): there only string literals are values, so code is
    never mangled (``token = get_token()`` stays, ``API_KEY = "…"`` goes)."""
    if not text:
        return text
    return Redactor.from_settings(allow, deny).text(text, code=code)


def scrub_patch(
    patch: str, *, allow: Iterable[str] | None = None, deny: Iterable[str] | None = None
) -> str:
    """A ``git diff`` with credentials replaced, file by file: in program code only string
    literals are values (``API_KEY = "…"``), elsewhere (``.env``, YAML, docs) bare values too;
    binary hunks are left alone. Line count and the truncation marker are preserved."""
    if not patch:
        return patch
    return Redactor.from_settings(allow, deny).patch(patch)
