"""Names, keys, enums and metadata records: the grammar users type, validated before any I/O."""

from __future__ import annotations

import json

import pytest

from repro_core import ArtifactMetadata, ArtifactType, RunState
from repro_core.errors import InvalidArgumentError, InvalidNameError
from repro_core.types import ParsedKey, parse_key, validate_alias, validate_name

HOSTILE_NAMES: list[object] = [
    "", ".", "..", "../x", "../../etc/passwd", "a/b", "/abs", "/", "a\\b", "a\x00b", "\x00",
    "x" * 129, " lead", "trail ", "a b", "-dash", "_under", ".hidden", "a..b", "name:v1",
    "name@x", "ünïcode", "tab\t", "new\nline", "C:\\win", "~home", "$VAR", "a*b", None, 3,
    b"bytes", ["list"],
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_rejected(name: object) -> None:
    with pytest.raises(InvalidNameError) as info:
        validate_name(name)
    assert info.value.name == name


@pytest.mark.parametrize("name", ["a", "mnist-train", "resnet50.v2", "A_b-9.z", "x" * 128])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


def test_alias_cannot_look_like_version() -> None:
    assert validate_alias("best") == "best"
    with pytest.raises(InvalidNameError):
        validate_alias("v3")


@pytest.mark.parametrize(
    ("key", "version", "expected"),
    [
        ("ds", None, ParsedKey("ds", alias="latest")),
        ("ds:v3", None, ParsedKey("ds", version=3)),
        ("ds:12", None, ParsedKey("ds", version=12)),
        ("ds:best", None, ParsedKey("ds", alias="best")),
        ("ds", "v7", ParsedKey("ds", version=7)),
        ("ds", "7", ParsedKey("ds", version=7)),
        ("ds", "latest", ParsedKey("ds", alias="latest")),
        ("ds@blake3:abcd12", None, ParsedKey("ds", digest_prefix="blake3:abcd12")),
        ("ds", "blake3:abcd", ParsedKey("ds", digest_prefix="blake3:abcd")),
    ],
)
def test_parse_key(key: str, version: str | None, expected: ParsedKey) -> None:
    assert parse_key(key, version) == expected


@pytest.mark.parametrize("key", ["ds@", "ds@blake3:zz", "ds@md5:abcd", "../x:v1", "ds:v1:x", ""])
def test_bad_keys(key: str) -> None:
    with pytest.raises(InvalidNameError):
        parse_key(key)


def test_key_and_version_both_is_ambiguous() -> None:
    with pytest.raises(InvalidArgumentError):
        parse_key("ds:v1", "v2")


def test_artifact_type_coercion() -> None:
    assert ArtifactType.coerce("MODEL") is ArtifactType.MODEL
    assert ArtifactType.coerce(" dataset ") is ArtifactType.DATASET
    assert ArtifactType.MODEL.value == "model"
    assert [m.name for m in ArtifactType][:3] == ["DATASET", "MODEL", "CHECKPOINT"]
    with pytest.raises(InvalidArgumentError, match="expected one of"):
        ArtifactType.coerce("weights")


def test_run_state_members() -> None:
    assert {s.name for s in RunState} >= {"RUNNING", "COMPLETED", "FAILED", "INTERRUPTED"}
    assert not RunState.RUNNING.is_terminal and RunState.FAILED.is_terminal


def test_metadata_json_round_trip() -> None:
    meta = ArtifactMetadata(name="m", type="model", version="v2", hash="blake3:" + "0" * 64,
                            size_bytes=3, metadata={"a": [1, 2]}, aliases=["best"])
    assert meta.created_at.endswith("+00:00")  # UTC ISO-8601
    text = json.dumps(meta.to_dict())
    back = ArtifactMetadata.from_dict(json.loads(text))
    assert back == meta
    assert back.type is ArtifactType.MODEL and back.key == "default/m:v2"
    assert back.version_number == 2
