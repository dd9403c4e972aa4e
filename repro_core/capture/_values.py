"""Find credentials inside free text (reasons, tracebacks, argv items, patches, config strings).

==================  =======================================  =================================
rule                before                                   after
==================  =======================================  =================================
URL userinfo        ``https://bob:pw@host/x``                ``https://<redacted>@host/x``
query parameter     ``?page=2&token=abc``                    ``?page=2&token=<redacted>``
private key block   ``-----BEGIN RSA PRIVATE KEY-----`` …    each body line ``<redacted>``
assignment          ``DB_PASSWORD = "hunter2"``              ``DB_PASSWORD = "<redacted>"``
                    ``Authorization: Bearer abc…``           ``Authorization: Bearer <redacted>``
                    ``--password pw``, ``password: pw``      value ``<redacted>``
JWT                 ``eyJ….eyJ….…``                           ``<redacted>``
bearer / basic      ``Bearer 9f8e…``, ``Basic dXNlcjpwdw==``  ``Bearer <redacted>``
token format        ``hf_…``, ``sk-…``, ``ghp_…``, ``AKIA…``   ``<redacted>``
webhook URL         ``hooks.slack.com/services/T0/B0/x``      ``…/services/<redacted>``
==================  =======================================  =================================

Query parameters and assignments are redacted only when the *name* is secret (``classify``, the
:class:`~.redact.Redactor` policy: 0 keep, 1 secret, 2 denied by the user); the other rules
whatever the name. An assignment keeps its quotes, its ``Bearer``/``Basic`` scheme word and any
trailing ``# comment``. Its value is kept when it is no literal:

- a number (as ``capture_config`` keeps ``num_key_value_heads=8``; not under a user-denied
  name), ``None``/``true``/``null``, an empty string, an f-string with fields;
- a reference: ``$VAR``, ``${{ secrets.X }}``, ``{token}``, ``<your key>``, ``self.token``,
  ``os.environ["X"]``, ``get_token()``, ``token=token``, ``key=api_key`` (a variable named like
  a secret), an annotation ``key: str``, the start of a structure (``[``, ``{``, ``(``);
- a flag: ``--password --verbose``; or the end of a string the name is in: ``"password: " + x``.

In *code* (``bare=False``: the ``.py``/``.js``/… files of a patch) only string literals are
values, since a bare word there is always an expression. An unquoted name at the start of a line
(``.env``, YAML, INI) owns the rest of the line, so ``passphrase: correct horse battery`` loses
all three words; elsewhere a bare value ends at white space or punctuation, so
``user=bob password=pw host=db`` keeps ``host=db``.

**Every rule is linear in the text.** The regexes avoid nested or overlapping repeats; a name is
only tried where a name starts (look-behind), so a long identifier is scanned once; the value of
an assignment is only parsed behind a secret name and never re-scanned; private key blocks are
found with monotone ``find``s. ``tests/test_scrub.py`` feeds megabytes of adversarial text.
Not handled (documented limits): multi-line values (YAML ``|`` blocks, triple-quoted strings;
a private key inside one is still caught by the key-block rule), comparisons
(``password == "x"``), and short flags (``-p x``: too ambiguous).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from collections.abc import Callable, Iterator

__all__ = ["REDACTED", "scrub_patch_text", "scrub_string"]

REDACTED = "<redacted>"

Classify = Callable[[str], int]

# scheme://userinfo@host — greedy up to the last "@" inside the authority, so a password that
# itself contains "@" is covered. The whole userinfo goes: a bare user part is often a token
# (``https://ghp_xxx@github.com``). Anchored on "://" (a literal the regex engine finds fast)
# rather than on the scheme, which would be tried at every letter of the text.
_URL_USERINFO = re.compile(r"://[^/?#\s@]*(?:@[^/?#\s@]*)*@")
# "?" is excluded from the key so that "?a?a?a…" cannot be rescanned from every "?".
_QUERY_PARAM = re.compile(r"([?&;])([^=&#\s;?]+)=([^&#\s;]*)")
# Formats that are secrets whatever the variable is called (HF, OpenAI/Anthropic, GitHub,
# GitLab, AWS access key ids, Slack, Google API keys, Stripe live keys, PyPI, npm). Word
# boundaries keep hashes and identifiers intact: the one before is checked by ``_bounded``, since
# a leading ``\b`` would stop the engine from skipping ahead to the possible first letters.
_TOKEN_PREFIXES = (
    "hf_", "sk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "glpat-", "AKIA",
    "ASIA", "xox", "AIza", "k_live_", "pypi-", "npm_",
)
_TOKEN_VALUE = re.compile(
    r"(?:hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_\-]{20,}|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{30,}|glpat-[A-Za-z0-9_\-]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|xox[abprs]-[A-Za-z0-9\-]{10,}|AIza[0-9A-Za-z_\-]{35}|[rs]k_live_[0-9A-Za-z]{16,}"
    r"|pypi-AgE[A-Za-z0-9_\-]{50,}|npm_[A-Za-z0-9]{36})\b"
)
_WEBHOOK = re.compile(
    r"(hooks\.slack\.com/(?:services|workflows|triggers)/|discord(?:app)?\.com/api/webhooks/)"
    r"[A-Za-z0-9/_\-]+"
)
# The look-behind after the literal keeps the engine's fast literal search and still starts
# only where a run starts: "eyJeyJeyJ…" would otherwise be rescanned from each "eyJ".
_JWT = re.compile(
    r"eyJ(?<![A-Za-z0-9_\-]eyJ)[A-Za-z0-9_\-]{4,}\.eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*"
)
_BEARER = re.compile(r"((?:[Bb]earer|BEARER)[ \t]+)([A-Za-z0-9\-._~+/]+=*)")
_BASIC = re.compile(r"((?:[Bb]asic|BASIC)[ \t]+)([A-Za-z0-9+/]{8,}={0,2})(?![A-Za-z0-9+/=])")
_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END [A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----")
# An unterminated block (a patch cut in the middle of a key): the lines that look like key
# material, with an optional diff prefix. Stops at the truncation marker, a comment, prose.
_PEM_TAIL = re.compile(r"(?:\n[ +\-]?[A-Za-z0-9+/=:, \-]*)*")
_PEM_LINE = re.compile(r"(?m)^([ +\-]?[ \t]*)([^\r\n]*)")
# A line of a PEM body: base64, or an RFC 1421 / OpenPGP armor header.
_PEM_BASE64 = re.compile(r"[A-Za-z0-9+/=]+")
_PEM_HEADER = re.compile(r"(?:Proc-Type|DEK-Info|Version|Comment|Hash|Charset|MessageID):.*")
# Key material inside something else (a JSON string "…\nMIIE…\n…", code between two literals).
_BASE64_RUN = re.compile(r"(?:(?<=\\n)|(?<![A-Za-z0-9+/=\\]))[A-Za-z0-9+/=]{16,}")

# name + separator. A name starts at a line start (after a diff prefix, indentation and
# ``export``) or where no name character precedes it; ``--`` marks a flag, which may also be
# followed by its value after spaces. ``"name"`` and ``os.environ["NAME"]`` are keys too; a
# Python annotation (``password: str = …``) sits between the name and ``=``.
_NAME_SEP = re.compile(
    r"""
    (?:(?P<bol>^[+\- ]?[ \t]*(?:export[ \t]+)?)|(?<![\w.\-]))
    (?P<lead>--)?
    (?:(?P<kq>["'])(?P<qname>[A-Za-z_][\w.\-]*)(?P=kq)\]?|(?P<name>[A-Za-z_][\w.\-]*))
    (?P<sep>
        [ \t]*(?::[ \t]*[A-Za-z_][\w.\[\], |]{0,80}?)?[ \t]*=(?![=~])>?[ \t]*
      | [ \t]*:=?(?![:/\\])[ \t]*
      | (?(lead)[ \t]+|(?!))
    )
    """,
    re.VERBOSE | re.MULTILINE,
)
_SCHEMES = r"(?i:bearer|basic|token|digest|negotiate|bot)[ \t]+"
_VALUE = re.compile(
    r"""
    (?P<sp>[rRbBfFuU]{0,2})(?P<q>["'`])(?P<body>(?:[^"'`\\\n]|\\.|(?!(?P=q))["'`])*)(?P=q)
  | (?P<scheme>"""
    + _SCHEMES
    + r""")?(?P<bare>[^\s"'`,;)\]}<>&|]*)
    """,
    re.VERBOSE,
)
_SCHEME_PREFIX = re.compile(_SCHEMES)
_NUMBER = re.compile(
    r"[+-]?(?:(?:\d[\d_]*(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|0[xX][0-9a-fA-F]+|inf|nan)"
)
# A quoted value that is only a placeholder: ${X}, ${{ secrets.X }}, $(cmd), $X, {x}, {{ x }},
# %(x)s, %s, <your key> (and so <redacted> itself, which keeps scrubbing idempotent).
_TEMPLATE = re.compile(
    r"\$\{\{[^\n]*\}\}|\$\{[^{}\n]*\}|\$\([^\n]*\)|\$[A-Za-z_]\w*|\{\{[^\n]*\}\}|\{[^{}\n]*\}"
    r"|%\(\w+\)s|%s|<[^<>\n]*>"
)
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")  # self.token, auth.example.com
_CODE_CALL = re.compile(r"[A-Za-z_][\w.]*[(\[]")  # get_token(…), os.environ[…]
_KEYWORDS = frozenset({"none", "null", "nil", "true", "false", "~", "undefined", "lambda"})
# Annotations in signatures (``def f(key: str)`` in a traceback) are no values.
_TYPES = frozenset({
    "str", "bytes", "int", "float", "bool", "object", "dict", "list", "tuple", "set", "Any",
    "Optional", "Union", "SecretStr", "Path",
})
_SNAKE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")
_COMMENT = re.compile(r"[ \t]+#")
_SHORT = 512  # characters: below, seeking token prefixes costs more than the regex
_MAX_NAME = 256  # characters a name (or the indentation before it) may have
_NAME_TAIL = re.compile(r"[\w.\-]*")
_BOL_PREFIX = re.compile(r"[+\- ]?[ \t]*(?:export[ \t]+)?")


def scrub_string(
    text: str, classify: Classify | None, hint: re.Pattern[str] | None, *, bare: bool = True
) -> str:
    """Every rule of the module docstring; ``bare=False`` treats ``text`` as program code;
    ``classify=None``: no name is secret (value rules only).

    ``hint`` finds, in the lower-cased text, a word every secret name contains (``key``,
    ``token``, …; None: any name may be secret): assignments are only looked for around its
    hits. Each rule runs only when a substring it needs is present.
    """
    if "://" in text and "@" in text:
        text = _URL_USERINFO.sub(f"://{REDACTED}@", text)
    if classify is not None and "=" in text and ("?" in text or "&" in text or ";" in text):
        text = _QUERY_PARAM.sub(lambda m: _query_sub(m, classify), text)
    if "PRIVATE KEY" in text:
        text = _scrub_private_keys(text)
    if classify is not None and ("=" in text or ":" in text or "--" in text):
        text = _scrub_assignments(text, classify, hint, bare)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    if "earer" in text or "EARER" in text:
        text = _BEARER.sub(_bearer_sub, text)
    if "asic" in text or "ASIC" in text:
        text = _BASIC.sub(_basic_sub, text)
    if "hooks" in text:
        text = _WEBHOOK.sub(lambda m: f"{m.group(1)}{REDACTED}", text)
    # The shortest format is 15 characters (xoxb- + 10); on long text, seeking the prefixes
    # first is faster than the regex, on short text slower.
    is_long = len(text) > _SHORT
    if len(text) >= 15 and (not is_long or any(p in text for p in _TOKEN_PREFIXES)):
        text = _TOKEN_VALUE.sub(lambda m: _bounded(m, REDACTED), text)
    return text


def _bounded(match: re.Match[str], replacement: str) -> str:
    """``replacement`` if the match starts a word (the ``\\b`` the regex leaves out)."""
    start = match.start()
    before = match.string[start - 1] if start else " "
    return match.group(0) if before.isalnum() or before == "_" else replacement


def _query_sub(match: re.Match[str], classify: Classify) -> str:
    sep, key, value = match.groups()
    keep = not value or value == REDACTED or not classify(key)
    return match.group(0) if keep else f"{sep}{key}={REDACTED}"


def _bearer_sub(match: re.Match[str]) -> str:
    """A bearer token is long; ``Bearer authentication`` (a word, no digit) is prose."""
    token = match.group(2)
    is_token = len(token) >= 20 or (len(token) >= 8 and any(c.isdigit() for c in token))
    return _bounded(match, f"{match.group(1)}{REDACTED}") if is_token else match.group(0)


def _basic_sub(match: re.Match[str]) -> str:
    """``Basic <b64>`` is a credential when it decodes to ``user:password``."""
    try:
        decoded = base64.b64decode(match.group(2), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return match.group(0)
    is_credential = ":" in decoded and decoded.isprintable()
    return _bounded(match, f"{match.group(1)}{REDACTED}") if is_credential else match.group(0)


def _scrub_private_keys(text: str) -> str:
    """Replace the body lines of every private key block, keeping the line structure.

    Linear: BEGIN and END are each searched from a position that only moves forward, and once
    no END is left none is searched again.
    """
    out: list[str] = []
    pos, no_end_after = 0, len(text) + 1
    while (begin := _PEM_BEGIN.search(text, pos)) is not None:
        end = _PEM_END.search(text, begin.end()) if begin.end() < no_end_after else None
        if end is not None:
            stop, resume = end.start(), end.start()
        else:
            no_end_after = begin.end()
            tail = _PEM_TAIL.match(text, begin.end())
            stop = resume = tail.end() if tail is not None else begin.end()
        out += [text[pos:begin.end()], _redact_key_body(text[begin.end():stop])]
        pos = resume
    return "".join(out) + text[pos:] if out else text


def _redact_key_body(body: str) -> str:
    """Between BEGIN and END: a line of key material (base64, armor header) becomes
    ``<redacted>`` behind its diff prefix and indentation, so line count and hunks stay; in any
    other line (code between two string literals, a one-line JSON-escaped key) only runs of 16+
    base64 characters go."""
    return _PEM_LINE.sub(_key_line, body)


def _key_line(match: re.Match[str]) -> str:
    prefix, content = match.groups()
    if not content:
        return match.group(0)
    whole_line = _PEM_HEADER.fullmatch(content) is not None or (
        _PEM_BASE64.fullmatch(content) is not None and _is_key_material(content, line=True)
    )
    if whole_line:
        return f"{prefix}{REDACTED}"
    return prefix + _BASE64_RUN.sub(_key_run, content)


def _key_run(match: re.Match[str]) -> str:
    return REDACTED if _is_key_material(match.group(0), line=False) else match.group(0)


def _is_key_material(text: str, *, line: bool) -> bool:
    """Random base64 mixes cases and digits; code (``return``, ``PackageNotFoundError``,
    ``repro_core/lineage``) rarely does. A whole line (``line``) may be a short last line."""
    digit = any(c.isdigit() for c in text)
    mixed = any(c.isupper() for c in text) and any(c.islower() for c in text)
    if line:
        return digit or mixed or text.endswith("=")
    return digit and mixed


def _scrub_assignments(
    text: str, classify: Classify, hint: re.Pattern[str] | None, bare: bool
) -> str:
    """Replace the values of secret names. A value is parsed only behind a secret name; the
    assignments are visited in order and one inside a replaced value is skipped."""
    out: list[str] = []
    last = 0
    resume = [0]  # where the candidates go on: past a replaced value
    for match in _candidates(text, hint, resume):
        if match.start() < last:  # inside a value already replaced
            continue
        verdict = classify(match.group("qname") or match.group("name"))
        if not verdict:
            continue
        value = _VALUE.match(text, match.end())
        assert value is not None  # the bare branch matches the empty string
        replaced = _replace_value(text, match, value, verdict, classify, bare)
        if replaced is not None:
            new, start, stop = replaced
            out += [text[last:start], new]
            last = resume[0] = stop
    return "".join(out) + text[last:] if out else text


def _candidates(
    text: str, hint: re.Pattern[str] | None, resume: list[int]
) -> Iterator[re.Match[str]]:
    """Every ``name sep`` whose name may be secret, in order.

    With a ``hint`` (a word each secret name contains), only its hits are looked at: the run of
    name characters around a hit is the name, matched where it starts (or at the line start,
    or at its opening quote). Each run is visited once and each look is bounded, so this is
    linear, and much faster than trying the name pattern at every position (``finditer``,
    the fallback when a user pattern has no literal word).
    """
    lowered = text.lower() if hint is not None else ""
    if hint is None or len(lowered) != len(text):  # (a few characters change length)
        yield from _NAME_SEP.finditer(text)
        return
    pos = 0
    while (hit := hint.search(lowered, max(pos, resume[0]))) is not None:
        start = hit.start()
        floor = max(pos, start - _MAX_NAME)
        while start > floor and (text[start - 1].isalnum() or text[start - 1] in "_.-"):
            start -= 1
        tail = _NAME_TAIL.match(text, hit.end())
        pos = tail.end() if tail is not None else hit.end()
        match = _name_at(text, start)
        if match is not None:
            yield match


def _name_at(text: str, start: int) -> re.Match[str] | None:
    """``_NAME_SEP`` for the name starting at ``start``: from the line start when only a diff
    prefix, indentation or ``export`` precede it (so it owns its line), else from its quote
    (``"password": …``, ``os.environ["TOKEN"] = …``), else from the name."""
    low = max(0, start - _MAX_NAME)
    newline = text.rfind("\n", low, start)
    if newline != -1 or low == 0:
        line = newline + 1
        if _BOL_PREFIX.fullmatch(text, line, start) is not None:
            return _NAME_SEP.match(text, line)
    if start and text[start - 1] in "\"'":
        quoted = _NAME_SEP.match(text, start - 1)
        if quoted is not None:
            return quoted
    return _NAME_SEP.match(text, start)


def _replace_value(
    text: str, name: re.Match[str], value: re.Match[str], verdict: int, classify: Classify,
    bare: bool,
) -> tuple[str, int, int] | None:
    """(replacement, start, end) for the value behind a secret name, or None to keep it."""
    if value.group("q") is not None:
        return None if _closes_a_string(text, name, value) else _replace_quoted(value)
    if not bare:
        return None
    start, end = value.start("bare"), value.end("bare")
    if _keep_bare(text[start:end], name, verdict, classify):
        return None
    if name.group("bol") is not None and name.group("lead") is None and not name.group("kq"):
        end = _line_value_end(text, start, end)  # .env, YAML, INI: the value is the line
    return REDACTED, start, end


def _closes_a_string(text: str, name: re.Match[str], value: re.Match[str]) -> bool:
    """``"password: " + x``: the name sits inside a string literal that the "value" quote
    closes (same quote right before the name, the key itself not quoted)."""
    if name.group("kq"):
        return False
    start = name.start("lead") if name.group("lead") is not None else name.start("name")
    return start > 0 and text[start - 1] == value.group("q")


def _replace_quoted(value: re.Match[str]) -> tuple[str, int, int] | None:
    body = value.group("body")
    if "f" in value.group("sp").lower() and "{" in body:
        return None  # an f-string with fields is computed, not a literal
    scheme = _SCHEME_PREFIX.match(body)
    kept = scheme.group(0) if scheme is not None else ""
    secret = body[len(kept):]
    if not secret or _TEMPLATE.fullmatch(secret) is not None:
        return None
    quote = value.group("q")
    return f"{value.group('sp')}{quote}{kept}{REDACTED}{quote}", value.start(), value.end()


def _keep_bare(token: str, name: re.Match[str], verdict: int, classify: Classify) -> bool:
    """True for an unquoted value that is no secret itself (see the module docstring); for a
    line-long value (``key = torch.Generator().manual_seed(0)``) its first token decides."""
    if not token or token[0] in "$([{<%" or token.lower() in _KEYWORDS or token in _TYPES:
        return True
    if name.group("lead") is not None and token.startswith("--"):
        return True  # --password --verbose: the next flag
    if _DOTTED.fullmatch(token) is not None or _CODE_CALL.match(token) is not None:
        return True
    if token == (name.group("qname") or name.group("name")).rpartition(".")[2]:
        return True  # f(token=token): a variable passed along
    if _SNAKE.fullmatch(token) is not None and classify(token):
        return True  # wandb.login(key=api_key): a variable named like a secret
    return verdict == 1 and _NUMBER.fullmatch(token) is not None


def _line_value_end(text: str, start: int, end: int) -> int:
    """A name at the start of a line owns the rest of it, up to a ``# comment``."""
    line_end = text.find("\n", end)
    line_end = len(text) if line_end == -1 else line_end
    comment = _COMMENT.search(text, start, line_end)
    stop = comment.start() if comment is not None else line_end
    while stop > start and text[stop - 1] in " \t\r":
        stop -= 1
    return max(stop, end)


# Extensions of program code, where a secret can only be a string literal (see bare=False).
_CODE_SUFFIXES = frozenset({
    "py", "pyi", "pyx", "pxd", "js", "jsx", "mjs", "cjs", "ts", "tsx", "go", "rs", "java", "kt",
    "kts", "scala", "c", "h", "cc", "cpp", "cxx", "hpp", "hh", "cu", "cuh", "rb", "php", "cs",
    "swift", "m", "mm", "lua", "jl", "r", "R", "pl", "pm", "dart", "groovy",
})
_DIFF_HEADER = re.compile(r"^diff --git [^\n]*$", re.MULTILINE)


def scrub_patch_text(
    patch: str, classify: Classify | None, hint: re.Pattern[str] | None
) -> str:
    """Scrub a ``git diff`` file by file: code files with ``bare=False``, others as text;
    binary hunks (base85, meaningless to scrub and fragile to touch) are left alone."""
    starts = [m.start() for m in _DIFF_HEADER.finditer(patch)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    bounds = [*starts, len(patch)]
    parts: list[str] = []
    for begin, end in itertools.pairwise(bounds):
        chunk = patch[begin:end]
        if "\nGIT binary patch\n" in chunk:
            parts.append(chunk)
            continue
        header = chunk[: chunk.find("\n")] if "\n" in chunk else chunk
        suffix = header.rstrip().rstrip('"').rpartition(".")[2]
        is_code = header.startswith("diff --git") and suffix in _CODE_SUFFIXES
        parts.append(scrub_string(chunk, classify, hint, bare=not is_code))
    return "".join(parts)
