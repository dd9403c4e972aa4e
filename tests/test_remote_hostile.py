"""A remote is untrusted input: forged records, bundles, aliases and blobs, and bad arguments.

A store pushes a small lineage (data -> ckpt v1, v2=best) to a remote; the test then forges one
thing on the remote, and pulls into a store that already holds a run of its own. Each forgery
must end as an ``IntegrityError`` (or, for an alias that can simply be left out, a reported
problem), with the destination's registry exactly as it was (no half import) and nothing
written outside the destination store — not in the remote, not in the source, not beside
them. Bad arguments (an unknown remote, a bad URL, KEY with --run) are refused before any I/O:
no store is created or changed.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from repro_core import ArtifactManager, hash_bytes, remote
from repro_core.errors import (
    ArtifactNotFoundError,
    IntegrityError,
    InvalidArgumentError,
    InvalidNameError,
    ReproError,
)
from repro_core.remote._records import version_uid

Forgery = Callable[[Path, dict[str, Any]], None]


@pytest.fixture(autouse=True)
def _no_stray_manager() -> Iterator[None]:
    yield
    ArtifactManager.reset_instance()


@pytest.fixture(scope="module")
def _template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Built once: src (prep: data; train: ckpt v1, v2=best, metrics) pushed to ``remote``;
    ``dst`` a store with a run of its own. Each test forges a copy of it."""
    base = tmp_path_factory.mktemp("hostile")
    src, dst, rem = base / "src", base / "dst", base / "remote"
    manager = ArtifactManager.reset_instance()
    prep = manager.init_run("prep", root=src)
    manager.log_artifact("data", "dataset", data={"rows": [1, 2, 3]})
    manager.finalize_run()
    train = manager.init_run("train", root=src)
    manager.use_artifact("data:v1")
    for i in range(2):
        manager.log_artifact("ckpt", "checkpoint", data=f"weights {i}".encode() * 64,
                             parent_artifacts=[f"ckpt:v{i}" if i else "data:v1"],
                             aliases=["best"] if i else None)
        manager.log_metrics({"loss": 1.0 / (i + 1), "nan": float("nan")}, step=i)
    manager.finalize_run()
    manager = ArtifactManager.reset_instance()
    manager.init_run("mine", root=dst)
    manager.log_artifact("notes", "evaluation", data={"mine": True})
    manager.finalize_run()
    ArtifactManager.reset_instance()
    report = remote.push(str(rem), root=src, show_progress=False)
    assert len(report.versions) == 3 and not report.problems
    return {"base": base, "prep": prep.id, "train": train.id}


@pytest.fixture
def pushed(_template: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """A private copy of the template's stores and remote (see ``_template``)."""
    for part in ("src", "dst", "remote"):
        shutil.copytree(_template["base"] / part, tmp_path / part, symlinks=True)
    return {"src": tmp_path / "src", "dst": tmp_path / "dst", "remote": tmp_path / "remote",
            "prep": _template["prep"], "train": _template["train"], "tmp": tmp_path}


# -- reading and forging the remote -------------------------------------------------------------


def record_file(rem: Path, rel: str) -> Path:
    return rem / "meta" / rel


def read_record(rem: Path, rel: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(record_file(rem, rel).read_bytes())
    return data


def write_record(rem: Path, rel: str, data: bytes | dict[str, Any]) -> None:
    path = record_file(rem, rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.chmod(0o644)
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())


def blob_file(rem: Path, digest: str) -> Path:
    hexdigest = digest.split(":", 1)[1]
    return rem / "blobs" / "blake3" / hexdigest[:2] / hexdigest[2:]


def put_blob(rem: Path, data: bytes) -> str:
    """A blob the remote holds under its true digest (a forged bundle that is a good blob)."""
    digest = hash_bytes(data)
    path = blob_file(rem, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


V2 = "versions/default/ckpt/000000000002.json"
V1 = "versions/default/ckpt/000000000001.json"


def _edit_version(**changes: Any) -> Forgery:
    def forge(rem: Path, info: dict[str, Any]) -> None:
        write_record(rem, V2, read_record(rem, V2) | changes)
    return forge


def _consistent_version(**changes: Any) -> Forgery:
    """Fields changed and the uid recomputed to match (only the field checks can catch it)."""
    def forge(rem: Path, info: dict[str, Any]) -> None:
        record = read_record(rem, V2) | changes
        record["uid"] = version_uid(record["project"], record["name"], record["digest"],
                                    record["created_at"], record["run_id"])
        write_record(rem, V2, record)
    return forge


def _copy_to(rel: str) -> Forgery:
    def forge(rem: Path, info: dict[str, Any]) -> None:
        write_record(rem, rel, record_file(rem, V1).read_bytes())
    return forge


def _raw(rel: str, data: bytes) -> Forgery:
    def forge(rem: Path, info: dict[str, Any]) -> None:
        write_record(rem, rel, data)
    return forge


def _huge(rem: Path, info: dict[str, Any]) -> None:
    path = record_file(rem, V2)
    path.chmod(0o644)
    with open(path, "r+b") as fh:  # sparse: 17 MiB on paper, no time to write
        fh.truncate(17 * 1024 * 1024)


def _bundle_lines(rem: Path, run_id: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    record = read_record(rem, f"runs/{run_id}.json")
    lines = gzip.decompress(blob_file(rem, record["bundle"]).read_bytes()).splitlines()
    return record, [json.loads(line) for line in lines]


def _rebundle(rem: Path, run_id: str, record: dict[str, Any], payload: bytes) -> None:
    digest = put_blob(rem, payload)
    write_record(rem, f"runs/{run_id}.json",
                 record | {"bundle": digest, "bundle_size": len(payload)})


def _bad_gzip(rem: Path, info: dict[str, Any]) -> None:
    record, _ = _bundle_lines(rem, info["train"])
    _rebundle(rem, info["train"], record, b"\x1f\x8b\x08\x00not really gzip" * 10)


def _wrong_run(rem: Path, info: dict[str, Any]) -> None:
    """prep's record names train's bundle: the bundle's run is not the run it is filed under."""
    train = read_record(rem, f"runs/{info['train']}.json")
    prep = read_record(rem, f"runs/{info['prep']}.json")
    write_record(rem, f"runs/{info['prep']}.json",
                 prep | {"bundle": train["bundle"], "bundle_size": train["bundle_size"]})


def _chunk_lengths(rem: Path, info: dict[str, Any]) -> None:
    record, lines = _bundle_lines(rem, info["train"])
    for line in lines:
        if "c" in line:
            line["c"][2] += 1  # count no longer matches the arrays' lengths
            break
    else:
        raise AssertionError("the bundle has no metric chunk")
    _rebundle(rem, info["train"], record,
              gzip.compress(b"".join(json.dumps(x).encode() + b"\n" for x in lines)))


def _chunk_arrays(rem: Path, info: dict[str, Any]) -> None:
    record, lines = _bundle_lines(rem, info["train"])
    chunk = next(line["c"] for line in lines if "c" in line)
    chunk[6] = base64.b64encode(base64.b64decode(chunk[6])[:-3]).decode()  # vals: 3 bytes short
    _rebundle(rem, info["train"], record,
              gzip.compress(b"".join(json.dumps(x).encode() + b"\n" for x in lines)))


def _bundle_run_row(rem: Path, info: dict[str, Any]) -> None:
    record, lines = _bundle_lines(rem, info["train"])
    lines[0]["run"]["evil"] = "extra column"
    _rebundle(rem, info["train"], record,
              gzip.compress(b"".join(json.dumps(x).encode() + b"\n" for x in lines)))


def _bundle_project(rem: Path, info: dict[str, Any]) -> None:
    record, lines = _bundle_lines(rem, info["train"])
    lines[0]["run"]["project"] = "../escape"
    _rebundle(rem, info["train"], record,
              gzip.compress(b"".join(json.dumps(x).encode() + b"\n" for x in lines)))


def _parent_cycle(rem: Path, info: dict[str, Any]) -> None:
    """v1's parent is v2 and v2's is v1: parents are not part of a uid, so each record is
    well-formed on its own."""
    v2 = read_record(rem, V2)
    write_record(rem, V1, read_record(rem, V1) | {"parents": [[v2["uid"], "default", "ckpt", 2]]})


def _flip_blob(rem: Path, info: dict[str, Any]) -> None:
    digest = read_record(rem, V2)["digest"]
    path = blob_file(rem, digest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o644)
    path.write_bytes(bytes(data))


def _alias_raw(data: bytes) -> Forgery:
    return _raw("aliases/default/ckpt/best.json", data)


def _alias_renamed(rem: Path, info: dict[str, Any]) -> None:
    rel = "aliases/default/ckpt/best.json"
    write_record(rem, rel, read_record(rem, rel) | {"alias": "prod"})


FORGERIES: dict[str, tuple[Forgery, str]] = {
    "version-bad-digest": (_edit_version(digest="blake3:" + "zz" * 32), "damaged or forged"),
    "version-uid-mismatch": (_edit_version(created_at="2001-01-01T00:00:00+00:00"),
                             "uid does not match"),
    "version-digest-swapped": (_edit_version(digest="blake3:" + "ab" * 32),
                               "uid does not match"),
    "version-path-number-mismatch": (_copy_to("versions/default/ckpt/000000000007.json"),
                                     "not the version its path names"),
    "version-filed-under-other-name": (_copy_to("versions/default/data/000000000001.json"),
                                       "not the version its path names"),
    "version-dotdot-name": (_consistent_version(name="../../escape"), "damaged or forged"),
    "version-dotdot-path": (_raw("versions/default/a..b/000000000001.json", b"{}"),
                            "name repro never writes"),
    "version-blob-path": (_consistent_version(blobs=[["blake3:../../etc", 3]]),
                          "damaged or forged"),
    "version-huge": (_huge, "limit"),
    "version-filename-escape": (_edit_version(filename="../../escape"), "bad file name"),
    "version-parent-cycle": (_parent_cycle, "its own ancestor"),
    "bundle-run-project": (_bundle_project, "invalid project name"),
    "version-not-json": (_raw(V2, b"\x00\xffnot json at all"), "damaged or forged"),
    "version-not-a-record": (_raw(V2, b"[1, 2, 3]"), "damaged or forged"),
    "version-newer-format": (_edit_version(format_version=99), "newer repro"),
    "version-no-blobs": (_consistent_version(blobs=[]), "names no blob"),
    "version-negative-number": (_edit_version(number=-2), "bad version number"),
    "bundle-bad-gzip": (_bad_gzip, "run bundle"),
    "bundle-wrong-run": (_wrong_run, "not the run it is filed under"),
    "bundle-chunk-count": (_chunk_lengths, "does not add up"),
    "bundle-chunk-arrays": (_chunk_arrays, "does not add up"),
    "bundle-run-columns": (_bundle_run_row, "other columns"),
    "blob-content-mismatch": (_flip_blob, "is corrupt: its bytes hash to"),
    "alias-not-json": (_alias_raw(b"{not json"), "damaged or forged"),
    "alias-renamed": (_alias_renamed, "not the alias its path names"),
}


def registry_dump(root: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{root / 'registry.sqlite'}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def files_outside(tmp: Path, store: Path) -> dict[str, str]:
    """Every file under ``tmp`` but outside ``store``, with a hash of its bytes (and where a
    link points): what a pull may never create, change or remove.

    Left out: a directory remote's ``cache/identity/`` (reading a corrupt blob through the
    local backend forgets its "last known good" record there, by design, so that re-logging
    the bytes repairs it) and SQLite's ``-wal``/``-shm`` files (opening a registry)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(tmp):
        here = Path(dirpath)
        if here == store or store in here.parents:
            dirnames[:] = []
            continue
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            path = here / name
            rel = str(path.relative_to(tmp))
            if "/cache/identity/" in rel or rel.endswith(("-wal", "-shm")):
                continue
            out[rel] = (os.readlink(path) if path.is_symlink()
                        else hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.mark.parametrize("case", sorted(FORGERIES))
def test_forged_remote_is_refused_and_nothing_is_imported(pushed: dict[str, Any],
                                                          case: str) -> None:
    forge, message = FORGERIES[case]
    rem, dst, tmp = pushed["remote"], pushed["dst"], pushed["tmp"]
    forge(rem, pushed)
    before, outside = registry_dump(dst), files_outside(tmp, dst)
    with pytest.raises(IntegrityError, match=message):
        remote.pull(str(rem), root=dst, show_progress=False)
    assert registry_dump(dst) == before
    assert files_outside(tmp, dst) == outside
    assert not (tmp / "escape").exists() and not (tmp.parent / "escape").exists()


def test_forged_alias_naming_another_artifact_is_reported_not_applied(
        pushed: dict[str, Any]) -> None:
    rem, dst = pushed["remote"], pushed["dst"]
    data = read_record(rem, "versions/default/data/000000000001.json")
    rel = "aliases/default/ckpt/best.json"
    write_record(rem, rel, read_record(rem, rel) | {"uid": data["uid"], "number": 1})
    report = remote.pull(str(rem), root=dst, show_progress=False)
    assert any("best" in p and "another artifact" in p for p in report.problems)
    manager = ArtifactManager.reset_instance()
    manager.set_root(dst)
    assert manager.use_artifact("ckpt:latest").version == "v2"
    with pytest.raises(ArtifactNotFoundError):
        manager.use_artifact("ckpt:best")
    assert all("best" not in m.aliases for m in manager.list_artifacts("data"))


def test_forged_latest_alias_is_ignored(pushed: dict[str, Any]) -> None:
    """``latest`` is each store's own (the highest number): a record for it changes nothing."""
    rem, dst = pushed["remote"], pushed["dst"]
    best = read_record(rem, "aliases/default/ckpt/best.json")
    v1 = read_record(rem, V1)
    write_record(rem, "aliases/default/ckpt/latest.json",
                 best | {"alias": "latest", "uid": v1["uid"], "number": 1})
    remote.pull(str(rem), root=dst, show_progress=False)
    manager = ArtifactManager.reset_instance()
    manager.set_root(dst)
    assert manager.use_artifact("ckpt:latest").version == "v2"


def test_blob_tampered_on_s3_is_refused(manager: ArtifactManager, tmp_path: Path,
                                        s3_bucket: str, s3_env: Any) -> None:
    """The same through S3: an object whose bytes are not its digest, and a forged record."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    url = f"s3://{s3_bucket}/hostile"
    manager.init_run("train", root=src)
    manager.log_artifact("ckpt", "checkpoint", data=b"weights" * 100)
    manager.finalize_run()
    ArtifactManager.reset_instance()
    remote.push(url, root=src, show_progress=False)
    client = s3_env.client()
    digest = hash_bytes(b"weights" * 100).split(":", 1)[1]
    key = f"hostile/blobs/blake3/{digest[:2]}/{digest[2:]}"
    client.put_object(Bucket=s3_bucket, Key=key, Body=b"weightz" * 100)
    with pytest.raises(IntegrityError):
        remote.pull(url, root=dst, show_progress=False)
    assert not dst.exists()  # a failed first pull leaves no store behind
    dst.mkdir()
    manager = ArtifactManager.reset_instance()
    manager.init_run("own", root=dst)  # an existing store: a failed pull changes nothing
    manager.finalize_run()
    client.put_object(Bucket=s3_bucket, Key="hostile/meta/versions/default/ckpt/000000000001.json",
                      Body=b'{"kind": "version", "format_version": 1, "name": "../x"}')
    with pytest.raises(IntegrityError):
        remote.pull(url, root=dst, show_progress=False)
    assert manager.list_artifacts() == []


# -- bad arguments: refused before any I/O ------------------------------------------------------


def test_bad_arguments_are_refused_before_any_io(pushed: dict[str, Any]) -> None:
    src, dst, rem, tmp = pushed["src"], pushed["dst"], pushed["remote"], pushed["tmp"]
    fresh = tmp / "fresh"
    stores = {"src": registry_dump(src), "dst": registry_dump(dst)}
    outside = files_outside(tmp, tmp / "nothing")
    calls: list[tuple[type[ReproError], Callable[[], Any]]] = [
        (ArtifactNotFoundError, lambda: remote.push("nosuch", root=src, show_progress=False)),
        (ArtifactNotFoundError, lambda: remote.pull("nosuch", root=dst, show_progress=False)),
        (InvalidArgumentError, lambda: remote.pull("nosuch", root=fresh, show_progress=False)),
        (InvalidArgumentError, lambda: remote.push("ftp://host/x", root=src,
                                                   show_progress=False)),
        (InvalidArgumentError, lambda: remote.pull("ftp://host/x", root=dst,
                                                   show_progress=False)),
        (InvalidArgumentError, lambda: remote.pull("ftp://host/x", root=fresh,
                                                   show_progress=False)),
        (InvalidArgumentError, lambda: remote.add_remote("o", "ftp://host/x", root=src)),
        (InvalidArgumentError, lambda: remote.add_remote("o", "ftp://host/x", root=fresh)),
        (InvalidArgumentError, lambda: remote.push(str(rem), "ckpt:v1", run=pushed["train"],
                                                   root=src, show_progress=False)),
        (InvalidArgumentError, lambda: remote.pull(str(rem), "ckpt:v1", run=pushed["train"],
                                                   root=dst, show_progress=False)),
        (InvalidArgumentError, lambda: remote.pull(str(rem), "ckpt:v1", run=pushed["train"],
                                                   root=fresh, show_progress=False)),
        (InvalidArgumentError, lambda: remote.pull(str(rem), "ckpt:v1", all=True,
                                                   root=fresh, show_progress=False)),
        (InvalidNameError, lambda: remote.pull(str(rem), "../ckpt:v1", root=fresh,
                                               show_progress=False)),
        (InvalidNameError, lambda: remote.push(str(rem), "ckpt:v1/../x", root=src,
                                               show_progress=False)),
    ]
    for error, call in calls:
        with pytest.raises(error):
            call()
        assert not fresh.exists()
        assert {"src": registry_dump(src), "dst": registry_dump(dst)} == stores
        assert files_outside(tmp, tmp / "nothing") == outside
