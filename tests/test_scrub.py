"""The single scrubber every stored string passes through: records (``scrub``), free text
(``scrub_text``), patches (``scrub_patch``) — nested trees, idempotence, byte-for-byte
preservation of content without secrets, and linear time on adversarial input."""

from __future__ import annotations

import json
import traceback

import pytest

from repro_core.capture import (
    REDACTED,
    capture_config,
    scrub,
    scrub_patch,
    scrub_text,
)
from repro_core.errors import SerializationError

MARK = "SUPERSECRET-MARKER-123"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0"
       ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")


@pytest.fixture(autouse=True)
def _no_user_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPRO_REDACT_ALLOW", raising=False)
    monkeypatch.delenv("REPRO_REDACT_DENY", raising=False)


# -- records -------------------------------------------------------------------------------------


def test_nested_records() -> None:
    record = {
        "runs": [{"db": {"url": f"postgres://u:{MARK}@db/x", "password": MARK}}, 3, None],
        "credentials": {"user": "bob", "token": MARK},  # a secret key holding a dict
        "api_keys": [MARK, MARK],  # … or a list
        "num_key_value_heads": 8, "key_dim": 64.0, "use_token": True, "password": None,
        "notes": f"call with Authorization: Bearer {MARK}",
        "pair": ("lr", f"token={MARK}"),
        7: f"https://{MARK}@host/x",
    }
    assert scrub(record) == {
        "runs": [{"db": {"url": f"postgres://{REDACTED}@db/x", "password": REDACTED}}, 3, None],
        "credentials": REDACTED,
        "api_keys": REDACTED,
        "num_key_value_heads": 8, "key_dim": 64.0, "use_token": True, "password": None,
        "notes": f"call with Authorization: Bearer {REDACTED}",
        "pair": ("lr", f"token={REDACTED}"),
        7: f"https://{REDACTED}@host/x",
    }


def test_fast_returns_and_input_untouched() -> None:
    assert scrub(None) is None
    empty: dict[str, object] = {}
    assert scrub(empty) is empty
    assert scrub(0) == 0 and scrub(1.5) == 1.5 and scrub("") == ""
    record = {"token": MARK}
    scrub(record)
    assert record == {"token": MARK}  # a copy is returned, the caller's dict is not changed
    assert scrub_text("") == "" and scrub_patch("") == ""


def test_allow_and_deny(monkeypatch: pytest.MonkeyPatch) -> None:
    record = {"key": "A", "pin": 1234, "text": f"{JWT} password: {MARK}"}
    assert scrub(record, allow=["*"]) == {"key": "A", "pin": 1234,
                                          "text": f"{REDACTED} password: {MARK}"}
    assert scrub(record, deny=["pin"]) == {"key": REDACTED, "pin": REDACTED,
                                           "text": f"{REDACTED} password: {REDACTED}"}
    monkeypatch.setenv("REPRO_REDACT_ALLOW", "key")
    assert scrub(record)["key"] == "A"


def test_keys_are_scrubbed_and_collisions_are_errors() -> None:
    assert scrub({f"https://u:{MARK}@h/": 1}) == {f"https://{REDACTED}@h/": 1}
    with pytest.raises(SerializationError, match="once credentials are redacted") as caught:
        scrub({f"https://a:{MARK}@h/": 1, f"https://b:{MARK}x@h/": 2})
    assert MARK not in str(caught.value)


def test_same_answer_as_capture_config() -> None:
    config = {
        "lr": 3e-4, "api_key": MARK, "num_key_value_heads": 8, "tokenizer": "gpt2",
        "db": {"password": MARK, "url": f"mysql://root:{MARK}@db/x", "port": 3306},
        "layers": [{"secret_sauce": [1, 2]}, {"name": "mlp"}],
        "headers": {"Authorization": f"Bearer {MARK}"}, "cmd": f"train.py --token {MARK}",
    }
    assert scrub(config) == capture_config(config)
    assert scrub(capture_config(config)) == capture_config(config)  # scrubbing twice: no-op
    assert MARK not in json.dumps(scrub(config))


# -- idempotence ---------------------------------------------------------------------------------

TEXTS = [
    f"Authorization: Bearer {MARK}", '{"Authorization": "Basic dXNlcjpodW50ZXIy"}',
    f"token={JWT}", f'DB_PASSWORD = "{MARK}"', f"password: {MARK}", f"export API_KEY={MARK}",
    f"--password {MARK} --lr 0.1", f"https://u:{MARK}@h/x?token={MARK}&page=2",
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0\nSuperSecret0123\n"
    "-----END PRIVATE KEY-----\n",
    "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0\nSuperSecret0123\n# cut",
    f"passphrase: a b {MARK} # c",
    "hf_" + "a1B2" * 9, f"Bearer {MARK}9", 'headers = {"Authorization": f"Bearer {tok}"}',
    f"hooks.slack.com/services/T0/B0/{MARK}", "password = <redacted>", f"user=bob pwd_x={MARK}",
]


@pytest.mark.parametrize("text", TEXTS)
def test_text_is_idempotent_and_leak_free(text: str) -> None:
    once = scrub_text(text)
    assert MARK not in once and "SuperSecret0123" not in once and "MIIE" not in once
    assert "dXNlcjpo" not in once
    assert scrub_text(once) == once
    assert scrub_patch(once) == scrub_patch(scrub_patch(once))


def test_record_is_idempotent() -> None:
    record = {"a": TEXTS, "token": MARK, "n": {"jwt": [1, 2], "x": TEXTS[0]}}
    once = scrub(record)
    assert scrub(once) == once
    assert MARK not in json.dumps(once)


# -- nothing changes where nothing is secret -----------------------------------------------------

TRAINING_CONFIG = {
    "seed": 1234, "model": {
        "name_or_path": "meta-llama/Llama-2-7b-hf", "num_key_value_heads": 8,
        "num_attention_heads": 32, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "torch_dtype": "bfloat16", "attn_implementation": "flash_attention_2",
    },
    "tokenizer": {"tokenizer_name": "meta-llama/Llama-2-7b-hf", "pad_token": "<pad>",
                  "eos_token_id": 2, "max_tokens": 4096, "padding_side": "left"},
    "optimizer": {"name": "adamw", "lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                  "weight_decay": 0.1},
    "scheduler": "cosine_with_warmup: 500 steps", "session_length": 128,
    "data": {"train": "s3://bucket/train-*.parquet", "url": "https://huggingface.co/datasets/x",
             "text_field": "text", "filter": "len(text) > 10 and lang == 'en'"},
    "trainer": {"precision": "bf16-mixed", "devices": 8, "strategy": "fsdp",
                "gradient_clip_val": 1.0, "log_every_n_steps": 10,
                "callbacks": ["ModelCheckpoint(monitor='val/loss', mode=min)"]},
    "ttrl": {"reward": "exact_match", "kl_coef": 0.05, "key_dim": 64, "temperature": 0.7},
    "command": "python train.py --config cfg.yaml --lr 3e-4 trainer.devices=8",
}

TRACEBACK = '''Traceback (most recent call last):
  File "/home/u/train.py", line 41, in <module>
    main(api_key=args.api_key, token=token)
  File "/home/u/train.py", line 30, in main
    tokenizer.pad_token = tokenizer.eos_token
  File "/home/u/.venv/lib/python3.11/site-packages/x.py", line 7, in f
    value = self.cache[key]
KeyError: 'model.layers.0.self_attn.k_proj.weight'
'''


def test_realistic_config_traceback_and_patch_unchanged() -> None:
    assert scrub(TRAINING_CONFIG) == TRAINING_CONFIG
    assert json.dumps(scrub(TRAINING_CONFIG)) == json.dumps(TRAINING_CONFIG)
    assert scrub_text(TRACEBACK) == TRACEBACK
    try:
        raise KeyError("model.embed_tokens.weight")
    except KeyError:
        real = traceback.format_exc()
    assert scrub_text(real) == real
    patch = (
        "diff --git a/train.py b/train.py\n--- a/train.py\n+++ b/train.py\n@@ -1,2 +1,5 @@\n"
        " import os\n-lr = 0.1\n+lr = 3e-4\n+api_key = os.environ.get('WANDB_API_KEY')\n"
        "+wandb.login(key=api_key)\n+tokenizer.pad_token = tokenizer.eos_token\n"
        "+def f(token: str | None = None, key=lambda x: x[1]) -> None: ...\n"
        "diff --git a/cfg.yaml b/cfg.yaml\n--- a/cfg.yaml\n+++ b/cfg.yaml\n@@ -1 +1,3 @@\n"
        "-lr: 0.1\n+lr: 3e-4\n+num_key_value_heads: 8\n+token_budget: 1e6\n"
    )
    assert scrub_patch(patch) == patch


def test_code_files_keep_bare_values_other_files_do_not() -> None:
    body = "@@ -0,0 +1 @@\n+token = tok\n"
    py = f"diff --git a/x.py b/x.py\n{body}"
    env = f"diff --git a/x.env b/x.env\n{body}"
    assert scrub_patch(py) == py  # an expression in code
    assert scrub_patch(env) == env.replace("= tok", f"= {REDACTED}")  # a literal elsewhere
    binary = ("diff --git a/k.bin b/k.bin\nGIT binary patch\nliteral 12\n"
              "zcmV+password=abc\n\nliteral 0\n")
    assert scrub_patch(binary) == binary


# -- linear time ----------------------------------------------------------------------------------

# Each would make a backtracking or rescanning implementation quadratic (or worse).
ADVERSARIAL = [
    "a." * 50, "a-" * 50, "a" * 100, "=?a" * 30, "?a" * 50, "a.://" * 5, "x://" + "a@" * 40,
    "password: '" + "x" * 100, "password=" * 10, "--password " * 10, "key:" * 20,
    "-----BEGIN PRIVATE KEY-----" * 3, "eyJ" * 30, "eyJaaaa.eyJ" * 10, "Bearer " * 10,
    "Basic " + "A" * 100, "hf_" + "a" * 60 + "_", " " * 100, "\t-" * 50, '"a' * 50,
    "token: str" + " |" * 40, "password" + "\\" * 80 + '"', "a=b" * 30, "hooks" * 20,
    "sk-" * 20, "xsk-" + "-" * 40, "github_pat_" * 5, "AKIA" * 10, "Bearer x" * 10,
    "-----BEGIN PRIVATE KEY-----\\n" + "Ab1" * 30, "\\nA" * 40, "eyJab.eyJab." * 8,
    "export " * 10, "password: 'x\\'" * 10, "--" * 50, '"token"]' * 10,
]


@pytest.mark.timeout(120)
def test_five_megabytes_of_adversarial_text_finish() -> None:
    line = "".join(ADVERSARIAL)
    blob = (line * (1_000_000 // len(line) + 1))[:1_000_000]
    patch = "diff --git a/x.py b/x.py\n" + "\n".join(
        "+" + piece * (1_000_000 // len(piece)) for piece in ADVERSARIAL[:4]
    ) + "\n"
    for text in (blob, blob.replace("\n", " ")):
        assert scrub_text(text)
    assert scrub_patch(patch)
    assert scrub_patch("\n".join(["+" + blob] * 2))  # one 2 MB line


@pytest.mark.timeout(120)
@pytest.mark.parametrize("piece", ADVERSARIAL)
def test_each_adversarial_piece_alone(piece: str) -> None:
    text = piece * (200_000 // len(piece))
    assert isinstance(scrub_text(text), str)
    assert isinstance(scrub_patch("diff --git a/x.yaml b/x.yaml\n+" + text), str)


def test_scrub_text_code_mode() -> None:
    source = f'def f():\n    API_KEY = "{MARK}"\n    token = get_token()\n    key = tok\n'
    assert scrub_text(source, code=True) == source.replace(MARK, REDACTED)
    assert scrub_text(source).endswith(f"key = {REDACTED}\n")  # as free text: a bare literal
