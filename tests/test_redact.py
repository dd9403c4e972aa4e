"""Secret redaction: names, values (URLs, query strings, token formats), allow/deny lists."""

from __future__ import annotations

import pytest

from repro_core.capture import (
    REDACTED,
    Redactor,
    capture_config,
    is_secret_name,
    redact_argv,
    redact_env,
    redact_text,
)

MARK = "SUPERSECRET-MARKER-123"


@pytest.fixture(autouse=True)
def _no_user_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPRO_REDACT_ALLOW", raising=False)
    monkeypatch.delenv("REPRO_REDACT_DENY", raising=False)


@pytest.mark.parametrize(
    "name",
    [
        "MY_API_KEY", "api-key", "GITHUB_TOKEN", "github_token", "DB_PASSWORD", "SMTP_PASS",
        "MYSQL_PWD", "AWS_REGION", "aws_access_key_id", "WANDB_API_KEY", "HF_TOKEN", "hf_token",
        "GOOGLE_APPLICATION_CREDENTIALS", "client_secret", "Private_Key", "db_passwd",
        "--api-key", "TOKENIZER_HF_TOKEN",
    ],
)
def test_secret_looking_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "PATH", "HOME", "lr", "PWD", "batch_size", "tokenizer_name", "pad_token", "eos_token_id",
        "TOKENIZERS_PARALLELISM", "PASSAGE_LEN", "CUDA_VISIBLE_DEVICES",
    ],
)
def test_ordinary_names(name: str) -> None:
    assert not is_secret_name(name)


def test_allow_and_deny_parameters_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MY_API_KEY": MARK, "LR_SCHEDULE": "cosine", "SMTP_PASS": MARK}
    assert redact_env(env) == {"LR_SCHEDULE": "cosine", "MY_API_KEY": REDACTED,
                               "SMTP_PASS": REDACTED}
    allowed = redact_env(env, allow=["my_api_*"], deny=["LR_*"])
    assert allowed == {"LR_SCHEDULE": REDACTED, "MY_API_KEY": MARK, "SMTP_PASS": REDACTED}

    monkeypatch.setenv("REPRO_REDACT_ALLOW", " SMTP_PASS , other")
    monkeypatch.setenv("REPRO_REDACT_DENY", "lr_schedule")
    from_env = redact_env(env)
    assert from_env == {"LR_SCHEDULE": REDACTED, "MY_API_KEY": REDACTED, "SMTP_PASS": MARK}


def test_deny_beats_allow() -> None:
    assert is_secret_name("LR", allow=["LR"], deny=["L*"])


def test_allowed_name_still_has_url_credentials_scrubbed() -> None:
    env = {"DATABASE_PASSWORD_URL": f"postgres://admin:{MARK}@db:5432/app"}
    out = redact_env(env, allow=["DATABASE_PASSWORD_URL"])
    assert out["DATABASE_PASSWORD_URL"] == f"postgres://{REDACTED}@db:5432/app"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"https://user:{MARK}@host/repo", f"https://{REDACTED}@host/repo"),
        (f"https://u:p@{MARK}@host/x", f"https://{REDACTED}@host/x"),  # "@" inside password
        (f"clone https://{MARK}@github.com/o/r now",
         f"clone https://{REDACTED}@github.com/o/r now"),
        (f"a=https://x:{MARK}@h1/ b=ssh://y:{MARK}@h2/",
         f"a=https://{REDACTED}@h1/ b=ssh://{REDACTED}@h2/"),
        (f"https://h/api?page=2&token={MARK}&x=1", f"https://h/api?page=2&token={REDACTED}&x=1"),
        (f"Server=db;User=app;Password={MARK};", f"Server=db;User=app;Password={REDACTED};"),
        ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
        ("https://github.com/org/repo@v1", "https://github.com/org/repo@v1"),
        ("lr=0.1 & mode=fast", "lr=0.1 & mode=fast"),
    ],
)
def test_redact_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


def test_known_token_formats_are_scrubbed_anywhere() -> None:
    hf = "hf_" + "a1B2" * 9
    gh = "ghp_" + "Z9y8" * 9
    text = f"export X={hf} and Y={gh}; commit 0123456789abcdef0123456789abcdef01234567"
    out = redact_text(text)
    assert hf not in out and gh not in out
    assert out.count(REDACTED) == 2
    assert "0123456789abcdef0123456789abcdef01234567" in out  # a git sha is not a token


def test_redact_argv() -> None:
    argv = ["train.py", "--api-key", MARK, f"--token={MARK}", "--lr", "0.1",
            f"https://u:{MARK}@h/r", "--password", "--verbose"]
    out = redact_argv(argv)
    assert out == ["train.py", "--api-key", REDACTED, f"--token={REDACTED}", "--lr", "0.1",
                   f"https://{REDACTED}@h/r", "--password", "--verbose"]


def test_tree_scrubs_nested_strings_only() -> None:
    tree = {"a": [f"https://u:{MARK}@h/", 3, None], "b": {"c": f"x https://{MARK}@h"}}
    out = Redactor().tree(tree)
    assert MARK not in repr(out)
    assert out["a"][1:] == [3, None]


def test_config_allow_and_deny() -> None:
    cfg = {"api_key": MARK, "optimizer": "adam", "nested": {"secret_sauce": MARK}}
    default = capture_config(cfg)
    assert default == {"api_key": REDACTED, "optimizer": "adam",
                       "nested": {"secret_sauce": REDACTED}}
    tuned = capture_config(cfg, redact_allow=["secret_sauce"], redact_deny=["optimizer"])
    assert tuned == {"api_key": REDACTED, "optimizer": REDACTED,
                     "nested": {"secret_sauce": MARK}}


# -- issue 8 item 9: names the original rules missed ------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "AUTHORIZATION", "HTTP_AUTHORIZATION", "proxy-authorization", "X_AUTHORIZATION_HEADER",
        "JWT", "AUTH_JWT", "jwt_secret", "MY_JWT", "SLACK_WEBHOOK_URL", "webhook",
        "DISCORD_WEBHOOK", "GPG_PASSPHRASE", "ssh_passphrase", "SESSION", "SESSION_ID",
        "JSESSIONID", "PHPSESSID", "user_session_id", "BEARER", "GITHUB_PAT",
        "AZURE_STORAGE_CONNECTION_STRING", "x-auth", "model.api_key", "db.password",
    ],
)
def test_secret_looking_names_added(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        # ML hyper-parameters and harmless names next to the new patterns
        "session_length", "num_sessions", "session_name", "SESSION_TIMEOUT", "KeyError",
        "TokenizerWarning", "ValueError", "SSH_AUTH_SOCK", "model.pad_token",
        "tokenizer.eos_token_id",
        # a DSN is scrubbed by value (URL userinfo, password=…), not hidden by name: the host
        # and database name are worth keeping
        "SENTRY_DSN", "DATABASE_DSN",
    ],
)
def test_ordinary_names_next_to_new_patterns(name: str) -> None:
    assert not is_secret_name(name)


def test_dsn_values_lose_credentials_keep_host() -> None:
    env = {"SENTRY_DSN": f"https://{MARK}@o1.ingest.sentry.io/42",
           "DATABASE_DSN": f"host=db.internal dbname=app user=bob password={MARK}"}
    out = redact_env(env)
    assert out == {"DATABASE_DSN": f"host=db.internal dbname=app user=bob password={REDACTED}",
                   "SENTRY_DSN": f"https://{REDACTED}@o1.ingest.sentry.io/42"}


def test_new_env_names_redacted() -> None:
    names = ["AUTHORIZATION", "JWT", "SLACK_WEBHOOK_URL", "GPG_PASSPHRASE", "SESSION_ID"]
    assert redact_env(dict.fromkeys(names, MARK)) == dict.fromkeys(sorted(names), REDACTED)


# -- value rules: headers, JWTs, private keys -----------------------------------------------------

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
BASIC = "dXNlcjpodW50ZXIy"  # base64("user:hunter2")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"Authorization: Bearer {MARK}", f"Authorization: Bearer {REDACTED}"),
        (f"authorization: token {MARK}", f"authorization: token {REDACTED}"),
        (f"Authorization: {MARK}", f"Authorization: {REDACTED}"),
        (f'curl -H "Authorization: Bearer {MARK}" https://api/x',
         f'curl -H "Authorization: Bearer {REDACTED}" https://api/x'),
        (f'{{"Authorization": "Bearer {MARK}", "Accept": "json"}}',
         f'{{"Authorization": "Bearer {REDACTED}", "Accept": "json"}}'),
        (f"{{'authorization': '{MARK}'}}", f"{{'authorization': '{REDACTED}'}}"),
        (f"Proxy-Authorization: Basic {BASIC}", f"Proxy-Authorization: Basic {REDACTED}"),
        ("sent Bearer 9f8e7d6c5b4a3 to the API", f"sent Bearer {REDACTED} to the API"),
        (f"sent Basic {BASIC} to the API", f"sent Basic {REDACTED} to the API"),
        (f"token={JWT}", f"token={REDACTED}"),
        (f"cookie value {JWT} end", f"cookie value {REDACTED} end"),
        # not credentials
        ("uses Bearer authentication", "uses Bearer authentication"),
        ("Basic usage: Basic training of a basic model",) * 2,
        ('headers = {"Authorization": f"Bearer {token}"}',
         'headers = {"Authorization": f"Bearer {token}"}'),
        ("Authorization: Bearer ${API_TOKEN}", "Authorization: Bearer ${API_TOKEN}"),
    ],
)
def test_auth_headers_and_jwts(text: str, expected: str) -> None:
    assert redact_text(text) == expected


KEY = "SuperSecretKeyMaterial0123"  # what key material looks like: base64, no dashes
PEM_BODY = f"MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\n{KEY}+/abc=\n"


@pytest.mark.parametrize("label", ["", "RSA ", "EC ", "OPENSSH ", "ENCRYPTED "])
def test_private_key_blocks(label: str) -> None:
    text = (f"key:\n-----BEGIN {label}PRIVATE KEY-----\n{PEM_BODY}"
            f"-----END {label}PRIVATE KEY-----\ndone\n")
    out = redact_text(text)
    assert KEY not in out and "MIIEvQ" not in out
    assert out.startswith(f"key:\n-----BEGIN {label}PRIVATE KEY-----\n")
    assert out.endswith(f"-----END {label}PRIVATE KEY-----\ndone\n")
    assert out.count("\n") == text.count("\n")  # lines kept: a patch keeps its hunk sizes


def test_private_key_block_in_a_patch_and_unterminated() -> None:
    patch = ("+-----BEGIN RSA PRIVATE KEY-----\n+Proc-Type: 4,ENCRYPTED\n+MIIEvQIBADAN\n+"
             f"{KEY}\n+\n+-----END RSA PRIVATE KEY-----\n context\n")
    out = redact_text(patch)
    assert out.splitlines() == [
        "+-----BEGIN RSA PRIVATE KEY-----", f"+{REDACTED}", f"+{REDACTED}", f"+{REDACTED}", "+",
        "+-----END RSA PRIVATE KEY-----", " context",
    ]
    cut = f"x\n-----BEGIN PRIVATE KEY-----\nMIIEvQIBADAN\n{KEY}\n# [repro: patch truncated]\n"
    out = redact_text(cut)
    assert KEY not in out and "MIIEvQ" not in out
    assert out.endswith("\n# [repro: patch truncated]\n")
    pgp = f"-----BEGIN PGP PRIVATE KEY BLOCK-----\n\n{KEY}\n-----END PGP PRIVATE KEY BLOCK-----"
    assert KEY not in redact_text(pgp)
    public = "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA\n"
    assert redact_text(public) == public


def test_private_key_escaped_in_one_line_and_code_between_two_literals() -> None:
    escaped = ('{"pem": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0\\n'
               f'{KEY}\\n-----END PRIVATE KEY-----\\n"}}')
    out = redact_text(escaped)
    assert out == ('{"pem": "-----BEGIN PRIVATE KEY-----\\n<redacted>\\n<redacted>\\n'
                   '-----END PRIVATE KEY-----\\n"}')
    code = ('BEGIN = "-----BEGIN PRIVATE KEY-----"\n'
            "def parse(text: str) -> str:\n    return text.split(BEGIN)[1]\n"
            'END = "-----END PRIVATE KEY-----"\n')
    assert redact_text(code) == code


# -- assignments in text (code, patches, .env files, logs) ----------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f'DB_PASSWORD = "{MARK}"', f'DB_PASSWORD = "{REDACTED}"'),
        (f"password: {MARK}", f"password: {REDACTED}"),
        (f'api_key="{MARK}"', f'api_key="{REDACTED}"'),
        (f"export AWS_SECRET_ACCESS_KEY={MARK}/K7MDENG+bPx==",
         f"export AWS_SECRET_ACCESS_KEY={REDACTED}"),
        (f"+SECRET_TOKEN = '{MARK}'", f"+SECRET_TOKEN = '{REDACTED}'"),
        (f'-DB_PASSWORD = "{MARK}"', f'-DB_PASSWORD = "{REDACTED}"'),
        (f'    os.environ["DB_PASSWORD"] = "{MARK}"',
         f'    os.environ["DB_PASSWORD"] = "{REDACTED}"'),
        (f'password: str = "{MARK}"', f'password: str = "{REDACTED}"'),
        (f'{{"password": "{MARK}", "user": "bob"}}',
         f'{{"password": "{REDACTED}", "user": "bob"}}'),
        (f"user=bob password={MARK} host=db", f"user=bob password={REDACTED} host=db"),
        (f"passphrase: correct horse {MARK}  # old", f"passphrase: {REDACTED}  # old"),
        (f"python train.py --password {MARK} --lr 0.1",
         f"python train.py --password {REDACTED} --lr 0.1"),
        (f"train.py db.password={MARK} model.lr=0.1",
         f"train.py db.password={REDACTED} model.lr=0.1"),
        (f"ValueError: invalid token: {MARK}", f"ValueError: invalid token: {REDACTED}"),
        ('PIN = "1234"', 'PIN = "1234"'),
        ('password = "1234"', f'password = "{REDACTED}"'),  # a quoted number is text
        (f"client_secret => '{MARK}'", f"client_secret => '{REDACTED}'"),
        (f"token := {MARK}", f"token := {REDACTED}"),
    ],
)
def test_assignments_in_text(text: str, expected: str) -> None:
    assert redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "password_length = 12", "num_key_value_heads: 8", "max_token_length=2048",
        "token_budget = 1e6", "password = None", "api_key: null", "token = True",
        'password = ""', "password=${DB_PASSWORD}", "token: ${{ secrets.GITHUB_TOKEN }}",
        "password = $(cat /run/secrets/db)", "token = self.token", "api_key = args.api_key",
        'api_key = os.environ["API_KEY"]', "key = jax.random.PRNGKey(0)",
        "KeyError: 'lr'", "if password == 'x':", "token != other",
        "def f(token: str | None = None) -> None:", "self.pad_token = eos_token",
        "tokenizer.pad_token = tokenizer.eos_token", "AUTH_HOST=auth.example.com",
        "url: https://example.com:8080/x", "time 12:30:45", "std::string key;",
        "C:\\Users\\key\\file", "password:", "token = {token}", "api_key = <your key>",
    ],
)
def test_assignments_that_are_not_secrets(text: str) -> None:
    assert redact_text(text) == text


def test_allowed_name_keeps_its_assignment(monkeypatch: pytest.MonkeyPatch) -> None:
    text = f"password_hint = 'ask bob' and api_key = '{MARK}'"
    assert redact_text(text) == f"password_hint = '{REDACTED}' and api_key = '{REDACTED}'"
    monkeypatch.setenv("REPRO_REDACT_ALLOW", "password_hint")
    assert redact_text(text) == f"password_hint = 'ask bob' and api_key = '{REDACTED}'"


def test_denied_name_redacts_numbers_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REPRO_REDACT_DENY", "PIN")
    assert redact_text("PIN = 1234\npassword_length = 12") == (
        f"PIN = {REDACTED}\npassword_length = 12")
    assert redact_text("f(pin=1234, password_length=12)") == (
        f"f(pin={REDACTED}, password_length=12)")
    assert capture_config({"pin": 1234, "password_length": 12}) == {
        "pin": REDACTED, "password_length": 12}


# -- argv ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--password", MARK], ["--password", REDACTED]),
        (["--db-password", MARK], ["--db-password", REDACTED]),
        (["--token", MARK], ["--token", REDACTED]),
        ([f"--password={MARK}"], [f"--password={REDACTED}"]),
        (["--password", f"-{MARK}"], ["--password", REDACTED]),  # one dash: still a value
        (["--password", "--lr", "0.1"], ["--password", "--lr", "0.1"]),  # two: the next flag
        (["--jwt", MARK, "--webhook-url", MARK], ["--jwt", REDACTED, "--webhook-url", REDACTED]),
        (["--authorization", MARK], ["--authorization", REDACTED]),
        ([f"db.password={MARK}", "lr=0.1"], [f"db.password={REDACTED}", "lr=0.1"]),  # Hydra
        ([f"+db.password={MARK}"], [f"+db.password={REDACTED}"]),
        (["--header", f"Authorization: Bearer {MARK}"],
         ["--header", f"Authorization: Bearer {REDACTED}"]),
        (["--no-password", "train.py"], ["--no-password", "train.py"]),  # a boolean switch
        (["-p", "8080"], ["-p", "8080"]),  # too ambiguous to redact
        (["--password"], ["--password"]),
    ],
)
def test_redact_argv_forms(argv: list[str], expected: list[str]) -> None:
    assert redact_argv(argv) == expected


def test_config_keys_and_values_use_the_same_rules() -> None:
    cfg = {
        "headers": {"Authorization": f"Bearer {MARK}", "Accept": "json"},
        "notes": f"password: {MARK}",
        f"https://u:{MARK}@host/data": 1,
        "jwt": MARK, "session_length": 128, "session_name": "exp1",
    }
    assert capture_config(cfg) == {
        "headers": {"Authorization": REDACTED, "Accept": "json"},
        "notes": f"password: {REDACTED}",
        f"https://{REDACTED}@host/data": 1,
        "jwt": REDACTED, "session_length": 128, "session_name": "exp1",
    }


@pytest.mark.parametrize(
    "text",
    [
        # the quote after the separator closes the string the name is in
        'print("password: " + masked)', "msg = 'token=' + tok", '["password:", "user"]',
        # f-strings with fields are computed values
        'token = f"{prefix}-{secrets.token_hex(6)}"', 'url = f"Bearer {token}"',
        # code in tracebacks: annotations, lambdas, variables named like secrets
        "def f(key: str, token: Optional[str] = None):", "sorted(xs, key=lambda r: r.parts)",
        "wandb.login(key=api_key)", "monkeypatch: pytest.MonkeyPatch,",
        "sort_keys=True, separators=(',', ':')", '"num_key_value_heads": 8, "lr": 0.1',
    ],
)
def test_code_shapes_are_not_values(text: str) -> None:
    assert redact_text(text) == text


def test_quoted_key_at_line_start_does_not_own_the_line() -> None:
    text = f'"jwt": "{MARK}", "session_length": 128'
    assert redact_text(text) == f'"jwt": "{REDACTED}", "session_length": 128'
    assert redact_text(f"jwt: {MARK} x") == f"jwt: {REDACTED}"  # YAML-like: the line


def test_deny_pattern_without_a_literal_word_scans_every_name() -> None:
    """``L?`` has no two-letter word to look for: every name is tried (the slow path)."""
    policy = Redactor(deny=("L?",))
    assert policy.text("f(LR=0.1, lr_x=2)\nlr: 3") == f"f(LR={REDACTED}, lr_x=2)\nlr: {REDACTED}"
    assert Redactor(deny=("*",)).text("f(a=1) b: x") == f"f(a={REDACTED}) b: {REDACTED}"
    assert Redactor(allow=("*",)).text(f"password: {MARK} {JWT}") == f"password: {MARK} {REDACTED}"
