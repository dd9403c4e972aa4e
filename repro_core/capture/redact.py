"""Keep secrets out of the store: redact by *name* (env vars, config keys, CLI flags, the left
side of ``name = value`` in text) and by *value* (credentials inside URLs, auth headers, JWTs,
private keys, well-known token formats; see :mod:`._values`), before anything is written.

Rules, in order, for a name (case-insensitive ``fnmatch`` patterns; ``-`` counts as ``_``, a
leading ``--``/``$`` is ignored, and a dotted name ``model.pad_token`` is also judged by its last
part)::

    user deny  (deny= / REPRO_REDACT_DENY)   → redacted, numbers too
    user allow (allow= / REPRO_REDACT_ALLOW) → kept
    built-in allow (_SAFE_PATTERNS)          → kept   (tokenizer names, pad_token, *Error, …)
    built-in secret patterns (SECRET_PATTERNS) → redacted, except numbers/bools/None
    anything else                            → kept

Allowing a name only stops the *name* rule: credentials inside its value (``user:pw@`` in a URL,
``?token=…``, ``hf_…``, a JWT) are still scrubbed, because they are secrets whatever they are
called. The same policy judges the names inside text (``DB_PASSWORD = "…"`` in a patch).

``REPRO_REDACT_ALLOW`` / ``REPRO_REDACT_DENY`` (comma-separated patterns) are read from
``os.environ`` at call time; they belong in ``constants.py`` once the lead moves them there.
Policies are cached per (allow, deny, environment) and each caches its verdict per name, so
building one per call costs a dict lookup.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import SerializationError
from ._values import REDACTED, Classify, scrub_patch_text, scrub_string

__all__ = [
    "REDACTED",
    "SECRET_PATTERNS",
    "Redactor",
    "is_secret_name",
    "redact_argv",
    "redact_env",
    "redact_text",
]

#: Names that look secret. ``*PASS`` (not only ``*PASSWORD*``) because the original leaked
#: ``SMTP_PASS``-style names; over-redaction is visible and fixable with the allow list.
#: ``SESSION`` only as a whole name or an id (``JSESSIONID``, ``session_id``): ``session_length``
#: and ``num_sessions`` are hyper-parameters. No ``*DSN*``: a DSN's credentials are scrubbed by
#: value (URL userinfo, ``password=…``) and its host and database are worth keeping.
SECRET_PATTERNS: tuple[str, ...] = (
    "*KEY*", "*TOKEN*", "*SECRET*", "*PASSWORD*", "*PASSWD*", "*PASS", "*_PWD", "PWD_*",
    "*PASSPHRASE*", "*CREDENTIAL*", "*PRIVATE*", "*COOKIE*", "AWS_*", "WANDB_API_KEY",
    "HF_TOKEN", "*_AUTH", "AUTH_*", "*AUTHORIZATION*", "*BEARER*", "*JWT*", "*WEBHOOK*",
    "SESSION", "*SESSION_ID", "*SESSIONID", "*SESSID", "*_PAT", "*CONNECTION_STRING*",
)

# ML configs are full of names that contain TOKEN/KEY but hold no secret (``tokenizer_name``,
# ``pad_token``); redacting them would hide hyper-parameters. Exact names only, so that e.g.
# ``TOKENIZER_HF_TOKEN`` is still caught by ``*TOKEN*``. Exception and warning class names
# (``KeyError: 'lr'`` in a traceback) are never secrets.
_SAFE_PATTERNS: tuple[str, ...] = (
    "TOKENIZER", "TOKENIZER_NAME", "TOKENIZER_PATH", "TOKENIZER_NAME_OR_PATH",
    "TOKENIZERS_PARALLELISM", "PAD_TOKEN", "BOS_TOKEN", "EOS_TOKEN", "UNK_TOKEN", "SEP_TOKEN",
    "CLS_TOKEN", "MASK_TOKEN", "*_TOKEN_ID", "*_TOKEN_IDS", "MAX_*TOKENS", "NUM_*TOKENS",
    "*ERROR", "*EXCEPTION", "*WARNING",
)

# Verdicts of Redactor.classify.
KEEP, SECRET, DENIED = 0, 1, 2
_CACHE_SIZE = 4096
_CACHED_TEXT = 64  # characters


def _normalize(name: str) -> str:
    return name.strip().lstrip("-$+").upper().replace("-", "_")


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [fnmatch.translate(_normalize(p)) for p in patterns if p.strip()]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


def _split(raw: str) -> tuple[str, ...]:
    return tuple(p for p in raw.split(",") if p.strip())


def _hint(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """A regex for lower-cased text that hits every name one of ``patterns`` matches: the
    longest literal part of each (``*KEY*`` → ``key``, ``AWS_*`` → ``aws[_-]``). None (search
    everywhere) when a pattern has no literal of two letters, e.g. a user's ``deny=["*"]``."""
    words: set[str] = set()
    for pattern in patterns:
        parts = re.split(r"\*|\?|\[[^\]]*\]", _normalize(pattern).lower())
        word = max(parts, key=len)
        if len(word) < 2 or not word.isascii():
            return None
        words.add(word)
    # A word containing another adds no hit (``passphrase`` ⊃ ``pass``): fewer alternatives.
    kept = sorted(w for w in words if not any(o != w and o in w for o in words))
    return re.compile("|".join(re.escape(w).replace("_", "[_-]") for w in kept)) if kept else None


_SECRET = _compile(SECRET_PATTERNS) or re.compile(r"(?!)")
_SAFE = _compile(_SAFE_PATTERNS) or re.compile(r"(?!)")


@dataclass(frozen=True)
class Redactor:
    """A compiled allow/deny policy. Get one with :meth:`from_settings` (cached)."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allow", _compile(self.allow))
        object.__setattr__(self, "_deny", _compile(self.deny))
        object.__setattr__(self, "_verdicts", {})
        object.__setattr__(self, "_texts", {})
        object.__setattr__(self, "_hint", _hint((*SECRET_PATTERNS, *self.deny)))
        # allow=["*"] (experience data, where a field called "key" is data): no name in text
        # can be secret, so the name rules are skipped there, not run to say "keep".
        names_off = not self.deny and any(p.strip() == "*" for p in self.allow)
        object.__setattr__(self, "_names", None if names_off else self.classify)

    @classmethod
    def from_settings(
        cls, allow: Iterable[str] | None = None, deny: Iterable[str] | None = None
    ) -> Redactor:
        """Combine explicit patterns with ``REPRO_REDACT_ALLOW`` / ``REPRO_REDACT_DENY``."""
        return _policy(tuple(allow or ()), tuple(deny or ()), *_settings())

    def classify(self, name: str) -> int:
        """``KEEP`` (0), ``SECRET`` (1: redact unless a number) or ``DENIED`` (2: redact)."""
        verdicts: dict[str, int] = self._verdicts  # type: ignore[attr-defined]
        verdict = verdicts.get(name)
        if verdict is None:
            verdict = self._classify(name)
            if len(verdicts) >= _CACHE_SIZE:  # names are few; this bounds a pathological run
                verdicts.clear()
            verdicts[name] = verdict
        return verdict

    def _classify(self, name: str) -> int:
        full = _normalize(name)
        leaf = full.rpartition(".")[2] or full
        names = (full,) if leaf == full else (full, leaf)
        deny: re.Pattern[str] | None = self._deny  # type: ignore[attr-defined]
        allow: re.Pattern[str] | None = self._allow  # type: ignore[attr-defined]
        if deny is not None and any(deny.fullmatch(n) for n in names):
            return DENIED
        if allow is not None and any(allow.fullmatch(n) for n in names):
            return KEEP
        if _SAFE.fullmatch(leaf):
            return KEEP
        return SECRET if any(_SECRET.fullmatch(n) for n in names) else KEEP

    def is_secret(self, name: str) -> bool:
        """Whether a variable/key/flag called ``name`` must have its value redacted."""
        return self.classify(name) != KEEP

    def text(self, value: str, *, code: bool = False) -> str:
        """Scrub credentials from free text: every rule of :mod:`._values`; ``code=True`` for
        program source (only string literals are values there). Short texts (keys, labels:
        they repeat in every metadata dict) are answered from a bounded cache."""
        hint: re.Pattern[str] | None = self._hint  # type: ignore[attr-defined]
        names: Classify | None = self._names  # type: ignore[attr-defined]
        if code or len(value) > _CACHED_TEXT:
            return scrub_string(value, names, hint, bare=not code)
        texts: dict[str, str] = self._texts  # type: ignore[attr-defined]
        scrubbed = texts.get(value)
        if scrubbed is None:
            scrubbed = scrub_string(value, names, hint)
            if len(texts) >= _CACHE_SIZE:
                texts.clear()
            texts[value] = scrubbed
        return scrubbed

    def patch(self, value: str) -> str:
        """Scrub a ``git diff``: code files by their string literals only (see ``_values``)."""
        hint: re.Pattern[str] | None = self._hint  # type: ignore[attr-defined]
        names: Classify | None = self._names  # type: ignore[attr-defined]
        return scrub_patch_text(value, names, hint)

    def env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """Environment variables with secret-named values replaced and all values scrubbed."""
        return {
            k: REDACTED if self.is_secret(k) else self.text(v) for k, v in sorted(environ.items())
        }

    def argv(self, argv: Sequence[str]) -> list[str]:
        """Command line with ``--api-key X`` / ``--token=X`` values redacted, every item
        scrubbed as text (``db.password=X`` Hydra overrides, ``Authorization: …`` headers).

        The item after a secret flag is its value unless it starts with ``--`` (then it is the
        next flag); ``-x`` is still a value, since a password may start with a dash. Boolean
        switches ``--no-password`` take no value; short flags (``-p``) are too ambiguous.
        """
        out: list[str] = []
        redact_next = False
        for arg in argv:
            if redact_next and not arg.startswith("--"):
                out.append(REDACTED)
                redact_next = False
                continue
            flag, eq, _ = arg.partition("=")
            is_flag = arg.startswith("-")
            if is_flag and eq and self.is_secret(flag):
                out.append(f"{flag}={REDACTED}")  # the whole value, spaces included
                redact_next = False
                continue
            redact_next = is_flag and not eq and self._takes_secret(arg)
            out.append(self.text(arg))
        return out

    def _takes_secret(self, flag: str) -> bool:
        bare = flag.lstrip("-").lower()
        return not bare.startswith(("no-", "no_")) and self.is_secret(flag)

    def tree(self, value: Any) -> Any:
        """Scrub every string of a JSON-like tree (dicts/lists), returning a new tree.

        Values only: keys are not judged by name (an environment's ``packages`` holds
        ``tokenizers``, which is no secret). :meth:`record` judges keys too.
        """
        return self._copy(value, judge_keys=False)

    def record(self, value: Any) -> Any:
        """A JSON-like tree scrubbed as ``capture_config`` does: under a secret key anything but
        a number/bool/None becomes ``<redacted>`` (a dict or list too); every string, keys
        included, is scrubbed as text. Tuples stay tuples; other leaves are returned as they
        are. Idempotent."""
        return self._copy(value, judge_keys=True)

    def _copy(self, value: Any, *, judge_keys: bool) -> Any:
        """Copy a tree iteratively (an explicit stack, not recursion: stored metadata may be
        nested hundreds of levels deep, past Python's recursion limit)."""
        if not isinstance(value, (dict, list, tuple)):
            return self.text(value) if isinstance(value, str) else value
        top: list[Any] = []
        stack = [_Frame(value, top.append)]
        while stack:
            frame = stack[-1]
            entry = next(frame.items, None)
            if entry is None:
                stack.pop()
                frame.emit(tuple(frame.out) if isinstance(frame.node, tuple) else frame.out)
                continue
            place, item = self._place(frame, entry, judge_keys)
            if place is None:
                continue
            if isinstance(item, (dict, list, tuple)):
                stack.append(_Frame(item, place))
            else:
                place(self.text(item) if isinstance(item, str) else item)
        return top[0]

    def _place(self, frame: _Frame, entry: tuple[Any, Any], judge_keys: bool
               ) -> tuple[Callable[[Any], None] | None, Any]:
        """Where one child goes (None: already written, redacted) and the child itself."""
        key, item = entry
        if key is _ELEMENT:
            return frame.out.append, item
        if not judge_keys:
            return functools.partial(frame.out.__setitem__, key), item
        verdict, name = (self.classify(key), self.text(key)) if isinstance(key, str) \
            else (KEEP, key)
        if name in frame.names:
            raise SerializationError(  # (the raw keys would put the credential in the message)
                f"two keys are both {name!r} once credentials are redacted; rename one of "
                "them", path=f"[{name!r}]",
            )
        frame.names.add(name)
        if verdict == DENIED or (verdict == SECRET and not _is_plain_number(item)):
            frame.out[name] = REDACTED
            return None, item
        return functools.partial(frame.out.__setitem__, name), item


_ELEMENT = object()  # the "key" of a list or tuple element


class _Frame:
    """One container being copied: its children still to visit and the copy so far."""

    __slots__ = ("emit", "items", "names", "node", "out")

    def __init__(self, node: dict[Any, Any] | list[Any] | tuple[Any, ...],
                 emit: Callable[[Any], None]) -> None:
        self.node, self.emit = node, emit
        self.names: set[Any] = set()
        if isinstance(node, dict):
            self.items: Iterator[tuple[Any, Any]] = iter(node.items())
            self.out: Any = {}
        else:
            self.items = ((_ELEMENT, v) for v in node)
            self.out = []


def _is_plain_number(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float))


def _settings() -> tuple[str, str]:
    """``REPRO_REDACT_ALLOW`` and ``REPRO_REDACT_DENY`` as given (comma-separated patterns).

    Read at every call, which is most of what a small :func:`~.scrub.scrub` costs (~1.5 µs of
    ~3 µs); once ``constants.py`` parses them, return ``constants.REPRO_REDACT_ALLOW`` etc.
    """
    return os.environ.get("REPRO_REDACT_ALLOW", ""), os.environ.get("REPRO_REDACT_DENY", "")


@functools.lru_cache(maxsize=64)
def _policy(allow: tuple[str, ...], deny: tuple[str, ...], env_allow: str, env_deny: str
            ) -> Redactor:
    return Redactor(allow=(*allow, *_split(env_allow)), deny=(*deny, *_split(env_deny)))


def is_secret_name(
    name: str, *, allow: Iterable[str] | None = None, deny: Iterable[str] | None = None
) -> bool:
    """Whether ``name`` looks secret under the built-in rules plus allow/deny patterns."""
    return Redactor.from_settings(allow, deny).is_secret(name)


def redact_text(text: str) -> str:
    """Scrub credentials from free text (see :mod:`._values`); same as ``scrub_text``."""
    return Redactor.from_settings().text(text)


def redact_env(
    environ: Mapping[str, str] | None = None,
    *,
    allow: Iterable[str] | None = None,
    deny: Iterable[str] | None = None,
) -> dict[str, str]:
    """A redacted copy of ``environ`` (default ``os.environ``), sorted by name."""
    return Redactor.from_settings(allow, deny).env(os.environ if environ is None else environ)


def redact_argv(
    argv: Sequence[str], *, allow: Iterable[str] | None = None, deny: Iterable[str] | None = None
) -> list[str]:
    """A redacted copy of a command line."""
    return Redactor.from_settings(allow, deny).argv(argv)
