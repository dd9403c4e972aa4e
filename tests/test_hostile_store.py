"""A store is untrusted input: forged manifests, rows and blobs give ``IntegrityError``, and
nothing outside the store is ever created or changed.

Each forgery is made as someone with write access to the store would make it: the forged bytes
are put under the digest they hash to and the registry row is pointed at them with plain
``sqlite3``, so the store is *consistent* (``verify`` finds no corrupt blob) and only the
content is hostile. A sentinel directory beside the store is snapshotted (names, bytes, modes,
mtimes) before and after every attempt.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from repro_core import ArtifactManager, IntegrityError
from repro_core.hashing import hash_bytes
from repro_core.maintenance import verify_store

# -- helpers ------------------------------------------------------------------------------------


def _snapshot(top: Path, skip: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under ``top`` except ``skip``: type, mode, size, mtime and bytes."""
    seen: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [d for d in dirnames if Path(dirpath, d) != skip]
        for name in [*dirnames, *filenames]:
            path = Path(dirpath, name)
            st = path.lstat()
            body = path.read_bytes() if path.is_file() and not path.is_symlink() else None
            seen[str(path.relative_to(top))] = (st.st_mode, st.st_size, st.st_mtime_ns,
                                                st.st_nlink, body)
    st = top.lstat()
    seen["."] = (st.st_mode, st.st_mtime_ns)
    return seen


@pytest.fixture
def outside(tmp_path: Path, store_root: Path) -> Iterator[Path]:
    """A sentinel directory next to the store; the test fails if anything outside the store
    (this directory included) is created, deleted or changed."""
    sentinel = tmp_path / "outside"
    (sentinel / "sub").mkdir(parents=True)
    (sentinel / "victim.txt").write_bytes(b"precious")
    (sentinel / "sub" / "other.bin").write_bytes(b"\x00" * 10)
    yield sentinel
    # checked by each test through _unchanged(); the fixture only builds it


class _Guard:
    def __init__(self, top: Path, store_root: Path) -> None:
        self.top, self.store_root = top, store_root
        self.before = _snapshot(top, store_root)

    def assert_unchanged(self) -> None:
        after = _snapshot(self.top, self.store_root)
        assert after == self.before, sorted(set(after.items()) ^ set(self.before.items()))


def _escape(target: Path) -> str:
    """A relative path that climbs out of any directory and lands on ``target``."""
    return "../" * 40 + str(target).lstrip("/")


def _put_blob(store_root: Path, content: bytes) -> str:
    digest = hash_bytes(content)
    algo, hexdigest = digest.split(":")
    blob = store_root / "blobs" / algo / hexdigest[:2] / hexdigest[2:]
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        blob.write_bytes(content)
        blob.chmod(0o444)
    return digest


def _forge(store_root: Path, old_digest: str | None, content: bytes, *,
           size: int | None = None, fmt: str | None = None) -> str:
    """Store ``content`` under its digest and point the version that had ``old_digest`` at it."""
    digest = _put_blob(store_root, content)
    con = sqlite3.connect(store_root / "registry.sqlite")
    try:
        with con:
            (vid,) = con.execute("SELECT id FROM versions WHERE digest = ?",
                                 (old_digest,)).fetchone()
            con.execute("UPDATE version_blobs SET digest = ?, size = ? "
                        "WHERE version_id = ? AND digest = ?",
                        (digest, len(content), vid, old_digest))
            con.execute("UPDATE versions SET digest = ?, size = ?, format = COALESCE(?, format) "
                        "WHERE id = ?", (digest, len(content) if size is None else size, fmt, vid))
    finally:
        con.close()
    return digest


def _manifest(files: list[dict[str, Any]], dirs: list[Any] | None = None) -> bytes:
    return json.dumps({"format": "repro.directory/1", "files": files, "dirs": dirs or []},
                      sort_keys=True, separators=(",", ":")).encode()


@pytest.fixture
def tree(manager: ArtifactManager, run: object, tmp_path: Path) -> tuple[Any, list[dict[str, Any]]]:
    """A logged directory and the file records of its (genuine) manifest."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"pwned!!!")
    (src / "sub" / "b.txt").write_bytes(b"also pwned")
    meta = manager.log_artifact("tree", "dataset", file_path=src)
    algo, hexdigest = meta.hash.split(":")
    raw = (manager.root / "blobs" / algo / hexdigest[:2] / hexdigest[2:]).read_bytes()
    return meta, json.loads(raw)["files"]


# -- forged directory manifests -----------------------------------------------------------------


def _paths_cases(outside: Path) -> dict[str, list[str]]:
    return {
        "dotdot-overwrite": [_escape(outside / "victim.txt"), "ok.txt"],
        "dotdot-create": ["ok.txt", _escape(outside / "created.txt")],
        "absolute": [str(outside / "victim.txt"), "ok.txt"],
        "inner-dotdot": ["a/../../../../../../../../../../../../x", "ok.txt"],
        "dot": ["./a.txt", "ok.txt"],
        "empty-component": ["a//b.txt", "ok.txt"],
        "backslash": ["..\\..\\x", "ok.txt"],
        "nul": ["a\x00b", "ok.txt"],
        "duplicate": ["same.txt", "same.txt"],
        "file-is-parent": ["a", "a/b.txt"],
        "empty": ["", "ok.txt"],
    }


@pytest.mark.parametrize("case", list(_paths_cases(Path("/x"))))
@pytest.mark.parametrize("verify", [True, False])
def test_forged_manifest_paths(manager: ArtifactManager, tree: tuple[Any, Any], outside: Path,
                               store_root: Path, case: str, verify: bool) -> None:
    meta, records = tree
    paths = _paths_cases(outside)[case]
    forged = [dict(r, path=p) for r, p in zip(records, paths, strict=True)]
    _forge(store_root, meta.hash, _manifest(forged), size=meta.size_bytes)
    guard = _Guard(store_root.parent, store_root)
    with pytest.raises(IntegrityError):
        manager.use_artifact(meta.key, verify=verify)
    guard.assert_unchanged()
    report = verify_store(store_root)
    assert [p.kind for p in report.problems] == ["manifest"], report.problems
    assert report.problems[0].versions == (meta.key,)
    guard.assert_unchanged()


@pytest.mark.parametrize("dirs", [["ESCAPE"], ["OUTSIDE"], ["x/../.."], [7], ["a.txt"],
                                  ["sub"], "notalist"])
def test_forged_manifest_dirs(manager: ArtifactManager, tree: tuple[Any, Any], outside: Path,
                              store_root: Path, dirs: Any) -> None:
    meta, records = tree
    if dirs == ["ESCAPE"]:
        dirs = [_escape(outside / "made-by-repro")]
    elif dirs == ["OUTSIDE"]:
        dirs = [str(outside / "made-by-repro")]
    body = json.dumps({"format": "repro.directory/1", "files": records, "dirs": dirs}).encode()
    _forge(store_root, meta.hash, body, size=meta.size_bytes)
    guard = _Guard(store_root.parent, store_root)
    with pytest.raises(IntegrityError):
        manager.use_artifact(meta.key)
    guard.assert_unchanged()


def _malformed(records: list[dict[str, Any]]) -> dict[str, bytes]:
    good = records[0]
    return {
        "not-json": b"{this is not json",
        "not-utf8": b'{"format": "\xff\xfe"}',
        "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
        "deep-dict": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        "list": b"[]",
        "number": b"12",
        "wrong-format": _manifest(records).replace(b"repro.directory/1", b"other/9"),
        "missing-files": json.dumps({"format": "repro.directory/1", "dirs": []}).encode(),
        "missing-key": _manifest([{k: v for k, v in good.items() if k != "digest"}]),
        "files-not-list": json.dumps({"format": "repro.directory/1", "files": {"a": 1},
                                      "dirs": []}).encode(),
        "record-not-dict": _manifest(["a.txt"]),  # type: ignore[list-item]
        "path-not-str": _manifest([dict(good, path=["a"])]),
        "digest-traversal": _manifest([dict(good, digest="blake3:../../../../etc/passwd")]),
        "digest-short": _manifest([dict(good, digest="blake3:abc")]),
        "size-negative": _manifest([dict(good, size=-1)]),
        "size-bool": _manifest([dict(good, size=True)]),
        "size-str": _manifest([dict(good, size="8")]),
        "executable-str": _manifest([dict(good, executable="yes")]),
        "huge-size": _manifest([dict(good, size=10**30)]),
    }


@pytest.mark.parametrize("case", list(_malformed([{"path": "a", "digest": "d", "size": 1,
                                                   "executable": False}])))
def test_malformed_manifest_is_an_integrity_error(manager: ArtifactManager,
                                                  tree: tuple[Any, Any], outside: Path,
                                                  store_root: Path, case: str) -> None:
    meta, records = tree
    _forge(store_root, meta.hash, _malformed(records)[case], size=meta.size_bytes)
    guard = _Guard(store_root.parent, store_root)
    for verify in (True, False):
        with pytest.raises(IntegrityError):
            manager.use_artifact(meta.key, verify=verify)
    guard.assert_unchanged()
    report = verify_store(store_root)
    assert "manifest" in [p.kind for p in report.problems], report.problems


def test_manifest_sizes_must_add_up(manager: ArtifactManager, tree: tuple[Any, Any],
                                    store_root: Path) -> None:
    meta, records = tree
    _forge(store_root, meta.hash, _manifest(records), size=meta.size_bytes + 1)
    with pytest.raises(IntegrityError):
        manager.use_artifact(meta.key)


def test_cache_symlinked_outside_is_refused(manager: ArtifactManager, tree: tuple[Any, Any],
                                            outside: Path, store_root: Path) -> None:
    """``<store>/cache`` planted as a symlink to a directory outside: nothing is built there."""
    meta, _ = tree
    cache = store_root / "cache"
    if cache.exists():
        os.rename(cache, store_root / "cache.genuine")
    cache.symlink_to(outside, target_is_directory=True)
    guard = _Guard(store_root.parent, store_root)
    with pytest.raises(IntegrityError, match="symlink"):
        manager.use_artifact(meta.key)
    guard.assert_unchanged()


def test_blob_planted_as_symlink_is_not_served(manager: ArtifactManager, run: object,
                                               outside: Path, store_root: Path) -> None:
    """A blob replaced by a symlink to a file outside with the same bytes is never linked to
    (writing into the served path would change the outside file)."""
    meta = manager.log_artifact("w", "model", data=b"precious")  # same bytes as the victim
    algo, hexdigest = meta.hash.split(":")
    blob = store_root / "blobs" / algo / hexdigest[:2] / hexdigest[2:]
    blob.unlink()
    blob.symlink_to(outside / "victim.txt")
    guard = _Guard(store_root.parent, store_root)
    for verify in (True, False):
        with pytest.raises(IntegrityError):
            manager.use_artifact(meta.key, verify=verify)
    guard.assert_unchanged()


def test_forged_row_digest_is_an_integrity_error(manager: ArtifactManager, run: object,
                                                 store_root: Path) -> None:
    meta = manager.log_artifact("w", "model", data=b"bytes")
    con = sqlite3.connect(store_root / "registry.sqlite")
    with con:
        con.execute("UPDATE versions SET digest = 'blake3:../../etc' WHERE digest = ?",
                    (meta.hash,))
    con.close()
    with pytest.raises(IntegrityError):
        manager.use_artifact(meta.key)


# -- forged payloads: npy, safetensors, json, text ----------------------------------------------


def _npy(header: str, body: bytes = b"", version: bytes = b"\x01\x00") -> bytes:
    text = header.encode("latin1")
    pad = -(10 + len(text) + 1) % 64
    return b"\x93NUMPY" + version + struct.pack("<H", len(text) + pad + 1) + text \
        + b" " * pad + b"\n" + body


_NPY_CASES = {
    "huge-shape": _npy("{'descr': '<f8', 'fortran_order': False, 'shape': (10**12,), }"
                       .replace("10**12", str(10**12)), b"\x00" * 8),
    "huge-2d": _npy("{'descr': '<f8', 'fortran_order': False, 'shape': (4294967296, "
                    "4294967296), }", b"\x00" * 8),
    "object-dtype": _npy("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }",
                         b"\x80\x04N."),
    "short-body": _npy("{'descr': '<f8', 'fortran_order': False, 'shape': (4,), }", b"\x00" * 8),
    "long-body": _npy("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", b"\x00" * 16),
    "negative-shape": _npy("{'descr': '<f8', 'fortran_order': False, 'shape': (-1,), }"),
    "bad-descr": _npy("{'descr': 'nonsense', 'fortran_order': False, 'shape': (1,), }",
                      b"\x00" * 8),
    "not-a-dict": _npy("[1, 2, 3]"),
    "bad-magic": b"NOTNUMPY" + b"\x00" * 64,
    "truncated": b"\x93NUMPY\x01",
    "bad-version": _npy("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }",
                        b"\x00" * 8, version=b"\x09\x00"),
}


@pytest.mark.parametrize("case", list(_NPY_CASES))
def test_forged_npy_is_an_integrity_error(manager: ArtifactManager, run: object,
                                          store_root: Path, case: str) -> None:
    np = pytest.importorskip("numpy")
    meta = manager.log_artifact("arr", "dataset", data=np.zeros(3))
    _forge(store_root, meta.hash, _NPY_CASES[case])
    with pytest.raises(IntegrityError):
        manager.load_artifact(meta.key)


def _st(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def _t(dtype: str, shape: list[Any], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


_ST_CASES = {
    "huge-header-length": _st({}, length=2**62),
    "header-longer-than-file": _st(b'{"w":{}}', length=1000),
    "header-over-100MB": _st(b"{}", length=100_000_001),
    "not-json": _st(b"{not json", b""),
    "not-utf8": _st(b'{"\xff":1}'),
    "deep-nesting": _st(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "list-header": _st([1, 2]),
    "offsets-beyond-file": _st({"w": _t("F32", [4], 0, 16)}, b"\x00" * 8),
    "offsets-huge": _st({"w": _t("F32", [2], 2**63, 2**63 + 8)}, b"\x00" * 8),
    "overlapping": _st({"a": _t("F32", [2], 0, 8), "b": _t("F32", [2], 4, 12)}, b"\x00" * 12),
    "gap": _st({"a": _t("F32", [1], 0, 4), "b": _t("F32", [1], 8, 12)}, b"\x00" * 12),
    "trailing-bytes": _st({"a": _t("F32", [1], 0, 4)}, b"\x00" * 12),
    "reversed-offsets": _st({"a": _t("F32", [1], 4, 0)}, b"\x00" * 4),
    "bad-dtype": _st({"w": _t("Q99", [1], 0, 4)}, b"\x00" * 4),
    "dtype-not-str": _st({"w": _t(4, [1], 0, 4)}, b"\x00" * 4),  # type: ignore[arg-type]
    "shape-mismatch": _st({"w": _t("F32", [3], 0, 16)}, b"\x00" * 16),
    "shape-negative": _st({"w": _t("F32", [-1], 0, 4)}, b"\x00" * 4),
    "shape-float": _st({"w": _t("F32", [1.0], 0, 4)}, b"\x00" * 4),
    "shape-huge": _st({"w": _t("F32", [2**62, 2**62], 0, 4)}, b"\x00" * 4),
    "offsets-not-pair": _st({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}},
                            b"\x00" * 4),
    "missing-dtype": _st({"w": {"shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4),
    "tensor-not-dict": _st({"w": [1, 2]}, b""),
    "metadata-not-str": _st({"__metadata__": {"a": 1}}),
    "truncated-length": b"\x08\x00\x00",
}


@pytest.mark.parametrize("case", list(_ST_CASES))
def test_forged_safetensors_is_an_integrity_error(manager: ArtifactManager, run: object,
                                                  store_root: Path, case: str) -> None:
    torch = pytest.importorskip("torch")
    meta = manager.log_artifact("model", "model", data={"w": torch.zeros(2)})
    _forge(store_root, meta.hash, _ST_CASES[case])
    with pytest.raises(IntegrityError):
        manager.load_artifact(meta.key)


def test_genuine_safetensors_pass_the_header_checks(manager: ArtifactManager,
                                                    run: object) -> None:
    torch = pytest.importorskip("torch")
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b": torch.tensor([True, False]), "c": torch.zeros(0, 4, dtype=torch.int64),
               "d": torch.ones(3, dtype=torch.bfloat16), "e": torch.tensor(5, dtype=torch.int16)}
    meta = manager.log_artifact("model", "model", data=tensors)
    back = manager.load_artifact(meta.key)
    assert set(back) == set(tensors)
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key


@pytest.mark.parametrize(("fmt_data", "forged"), [
    ({"a": 1}, b"{not json"),
    ({"a": 1}, b"[" * 100_000 + b"]" * 100_000),
    ({"a": 1}, b'"\xff\xfe"'),
    ("text", b"\xff\xfe\xfd"),
])
def test_forged_json_and_text_are_integrity_errors(manager: ArtifactManager, run: object,
                                                   store_root: Path, fmt_data: object,
                                                   forged: bytes) -> None:
    meta = manager.log_artifact("thing", "config", data=fmt_data)
    _forge(store_root, meta.hash, forged)
    with pytest.raises(IntegrityError):
        manager.load_artifact(meta.key)


def test_names_a_manifest_would_refuse_are_refused_when_logging(manager: ArtifactManager,
                                                                run: object, tmp_path: Path,
                                                                store_root: Path) -> None:
    """What ``use_artifact`` refuses to build is refused before anything is stored."""
    from repro_core import InvalidArgumentError

    src = tmp_path / "src"
    src.mkdir()
    (src / "a\\b.txt").write_bytes(b"x")
    before = sorted(store_root.rglob("*"))
    with pytest.raises(InvalidArgumentError, match="backslash"):
        manager.log_artifact("tree", "dataset", file_path=src)
    assert sorted(store_root.rglob("*")) == before
