"""Keep secrets out of the store: redact by *name* (env vars, config keys, CLI flags) and by
*value* (credentials inside URLs, well-known token formats), before anything is written.

Rules, in order, for a name (case-insensitive ``fnmatch`` patterns)::

    user deny  (deny= / REPRO_REDACT_DENY)   → redacted
    user allow (allow= / REPRO_REDACT_ALLOW) → kept
    built-in allow (_SAFE_PATTERNS)          → kept   (tokenizer names, pad_token, …)
    built-in secret patterns (SECRET_PATTERNS) → redacted
    anything else                            → kept

Allowing a name only stops the *name* rule: credentials inside its value (``user:pw@`` in a URL,
``?token=…``, ``hf_…``) are still scrubbed, because they are secrets whatever they are called.

``REPRO_REDACT_ALLOW`` / ``REPRO_REDACT_DENY`` (comma-separated patterns) are read from
``os.environ`` at call time; they belong in ``constants.py`` once the lead moves them there.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "REDACTED",
    "SECRET_PATTERNS",
    "Redactor",
    "is_secret_name",
    "redact_argv",
    "redact_env",
    "redact_text",
]

REDACTED = "<redacted>"

#: Names that look secret. ``*PASS`` (not only ``*PASSWORD*``) because the original leaked
#: ``SMTP_PASS``-style names; over-redaction is visible and fixable with the allow list.
SECRET_PATTERNS: tuple[str, ...] = (
    "*KEY*", "*TOKEN*", "*SECRET*", "*PASSWORD*", "*PASSWD*", "*PASS", "*_PWD", "PWD_*",
    "*CREDENTIAL*", "*PRIVATE*", "*COOKIE*", "AWS_*", "WANDB_API_KEY", "HF_TOKEN", "*_AUTH",
    "AUTH_*",
)

# ML configs are full of names that contain TOKEN/KEY but hold no secret (``tokenizer_name``,
# ``pad_token``); redacting them would hide hyper-parameters. Exact names only, so that e.g.
# ``TOKENIZER_HF_TOKEN`` is still caught by ``*TOKEN*``.
_SAFE_PATTERNS: tuple[str, ...] = (
    "TOKENIZER", "TOKENIZER_NAME", "TOKENIZER_PATH", "TOKENIZER_NAME_OR_PATH",
    "TOKENIZERS_PARALLELISM", "PAD_TOKEN", "BOS_TOKEN", "EOS_TOKEN", "UNK_TOKEN", "SEP_TOKEN",
    "CLS_TOKEN", "MASK_TOKEN", "*_TOKEN_ID", "*_TOKEN_IDS", "MAX_*TOKENS", "NUM_*TOKENS",
)

# scheme://userinfo@host — greedy up to the last "@" inside the authority, so a password that
# itself contains "@" is covered. The whole userinfo goes: a bare user part is often a token
# (``https://ghp_xxx@github.com``).
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/?#\s@]*(?:@[^/?#\s@]*)*@")
_QUERY_PARAM = re.compile(r"([?&;])([^=&#\s;]+)=([^&#\s;]*)")
# Formats that are secrets whatever the variable is called (HF, OpenAI/Anthropic, GitHub,
# GitLab, AWS access key ids, Slack). Word boundaries keep hashes and identifiers intact.
_TOKEN_VALUE = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_\-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{30,}|glpat-[A-Za-z0-9_\-]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|xox[abprs]-[A-Za-z0-9\-]{10,})\b"
)


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [fnmatch.translate(p.strip().upper()) for p in patterns if p.strip()]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


def _env_patterns(name: str) -> list[str]:
    return [p for p in os.environ.get(name, "").split(",") if p.strip()]


@dataclass(frozen=True)
class Redactor:
    """A compiled allow/deny policy. Build one per capture with :meth:`from_settings`."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allow", _compile(self.allow))
        object.__setattr__(self, "_deny", _compile(self.deny))

    @classmethod
    def from_settings(
        cls, allow: Iterable[str] | None = None, deny: Iterable[str] | None = None
    ) -> Redactor:
        """Combine explicit patterns with ``REPRO_REDACT_ALLOW`` / ``REPRO_REDACT_DENY``."""
        return cls(
            allow=(*(allow or ()), *_env_patterns("REPRO_REDACT_ALLOW")),
            deny=(*(deny or ()), *_env_patterns("REPRO_REDACT_DENY")),
        )

    def is_secret(self, name: str) -> bool:
        """Whether a variable/key/flag called ``name`` must have its value redacted."""
        upper = name.strip().lstrip("-").upper()
        deny: re.Pattern[str] | None = self._deny  # type: ignore[attr-defined]
        allow: re.Pattern[str] | None = self._allow  # type: ignore[attr-defined]
        if deny is not None and deny.fullmatch(upper):
            return True
        if allow is not None and allow.fullmatch(upper):
            return False
        if _SAFE.fullmatch(upper):
            return False
        return bool(_SECRET.fullmatch(upper))

    def text(self, value: str) -> str:
        """Scrub credentials embedded in a string (URLs, query parameters, token formats)."""
        if "://" in value:
            value = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", value)
        if "=" in value and ("?" in value or "&" in value or ";" in value):
            value = _QUERY_PARAM.sub(self._query_sub, value)
        return _TOKEN_VALUE.sub(REDACTED, value)

    def _query_sub(self, match: re.Match[str]) -> str:
        sep, key, _ = match.groups()
        return f"{sep}{key}={REDACTED}" if self.is_secret(key) else match.group(0)

    def env(self, environ: Mapping[str, str]) -> dict[str, str]:
        """Environment variables with secret-named values replaced and all values scrubbed."""
        return {
            k: REDACTED if self.is_secret(k) else self.text(v) for k, v in sorted(environ.items())
        }

    def argv(self, argv: Sequence[str]) -> list[str]:
        """Command line with ``--api-key X`` / ``--token=X`` values redacted and URLs scrubbed."""
        out: list[str] = []
        redact_next = False
        for arg in argv:
            if redact_next and not arg.startswith("--"):
                out.append(REDACTED)
                redact_next = False
                continue
            redact_next = False
            flag, eq, _ = arg.partition("=")
            if arg.startswith("-") and self.is_secret(flag):
                if eq:
                    out.append(f"{flag}={REDACTED}")
                    continue
                redact_next = True
            out.append(self.text(arg))
        return out

    def tree(self, value: Any) -> Any:
        """Scrub every string of a JSON-like tree (dicts/lists), returning a new tree."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.tree(v) for v in value]
        return value


_SECRET = _compile(SECRET_PATTERNS) or re.compile(r"(?!)")
_SAFE = _compile(_SAFE_PATTERNS) or re.compile(r"(?!)")


def is_secret_name(
    name: str, *, allow: Iterable[str] | None = None, deny: Iterable[str] | None = None
) -> bool:
    """Whether ``name`` looks secret under the built-in rules plus allow/deny patterns."""
    return Redactor.from_settings(allow, deny).is_secret(name)


def redact_text(text: str) -> str:
    """Scrub URL userinfo, secret query parameters and known token formats from ``text``."""
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
