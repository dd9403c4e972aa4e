"""Digests are pinned to known values (BLAKE3 and SHA-256 test vectors) in every code path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from repro_core import constants
from repro_core._fsio import copy_range
from repro_core.errors import InvalidArgumentError
from repro_core.hashing import copy_and_hash, hash_bytes, hash_file, new_hasher, parse_digest

EMPTY_B3 = "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
ABC_B3 = "blake3:6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
ABC_SHA = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
# 40 MiB of a repeating 0..255 pattern: big enough for the parallel (multi-threaded) path.
BIG = bytes(range(256)) * 4096 * 40
BIG_B3 = "blake3:11057518892207f615a50a65beda19d7486fc25c37e76bc90153ccaabf6f5197"


def test_known_vectors() -> None:
    assert hash_bytes(b"") == EMPTY_B3
    assert hash_bytes(b"abc") == ABC_B3
    assert hash_bytes(b"abc", "sha256") == ABC_SHA


@pytest.mark.parametrize("algorithm", ["blake3", "sha256"])
def test_file_and_bytes_agree(tmp_path: Path, algorithm: str) -> None:
    for name, data in {"empty": b"", "small": b"abc", "big": BIG}.items():
        path = tmp_path / name
        path.write_bytes(data)
        assert hash_file(path, algorithm) == hash_bytes(data, algorithm)
    assert hash_file(tmp_path / "big") == BIG_B3


def test_incremental_equals_one_shot() -> None:
    h = new_hasher("blake3", parallel=True)
    for i in range(0, len(BIG), 3_000_001):
        h.update(BIG[i : i + 3_000_001])
    assert h.digest() == BIG_B3


def _short_copies(src: int, dst: int, count: int) -> int:
    return os.write(dst, os.read(src, min(count, 7777)))


@pytest.mark.parametrize("copy", [copy_range, _short_copies], ids=["kernel", "short-copies"])
def test_copy_and_hash_hashes_what_landed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy: object
) -> None:
    monkeypatch.setattr(constants, "IO_CHUNK", 1 << 20)  # many chunks: exercise the pipeline
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(BIG[: 3 << 20] + b"tail")
    h = new_hasher("blake3")
    with open(src, "rb") as s, open(dst, "w+b") as d:
        n = copy_and_hash(s.fileno(), d.fileno(), h, copy)  # type: ignore[arg-type]
    assert n == (3 << 20) + 4
    assert dst.read_bytes() == src.read_bytes()
    assert h.digest() == hash_bytes(src.read_bytes())


@pytest.mark.parametrize(
    "bad", ["", "blake3:", "md5:" + "0" * 32, "blake3:" + "g" * 64, "blake3:" + "A" * 64, 5, None]
)
def test_parse_digest_rejects(bad: object) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_digest(bad)


def test_unknown_algorithm() -> None:
    with pytest.raises(InvalidArgumentError, match="sha256"):
        hash_bytes(b"x", "md5")
