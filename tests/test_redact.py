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
