"""Chunked versions (``chunks``) everywhere a version row is copied: remotes, recover, W&B,
``repro migrate`` and a shared PostgreSQL registry.

A chunked version's row names its chunk manifest (``versions.manifest``); its blobs are the
parts and the manifest, and its digest is the whole file's — no blob. Every copy of the row
must carry the manifest (a row without it would be served as one missing blob) and every
transfer must move the parts, only those the other side lacks. What each test proves:

- push/pull (a directory and a moto S3 remote): a second checkpoint of a model whose frozen
  layers did not change sends only its new part and its manifest; a fresh store pulls both
  back loadable (equal tensors) and byte-identical (``use_artifact().path`` hashes to the
  version's digest); a content-defined (``cdc``) file round-trips the same way;
- a forged remote record (manifest outside its blobs, not a digest, of format 1, or a part
  posing as the manifest) is an ``IntegrityError`` and nothing is imported;
- ``repro recover`` gives the manifest column back from the journal, and skips a forged line;
- ``repro migrate`` SQLite → PostgreSQL → SQLite keeps chunked versions loadable;
- a host sharing the PostgreSQL registry fetches the parts from the remote;
- a W&B (offline, real ``wandb``) mirror gets the real file, never the manifest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from test_wandb_suite import logged_artifacts, manifest, offline_env

from repro_core import ArtifactManager, constants, remote
from repro_core.chunks import parse_manifest
from repro_core.errors import IntegrityError
from repro_core.hashing import hash_bytes, hash_file
from repro_core.recover import recover_store
from repro_core.store.local import LocalStorageBackend

_THRESHOLD = 256 << 10


@pytest.fixture(autouse=True)
def _chunked(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Chunk anything from 256 KiB up (the default, 32 MiB, would need big test models)."""
    monkeypatch.setattr(constants, "REPRO_CHUNK_MIN_BYTES", _THRESHOLD)
    ArtifactManager.reset_instance()
    yield
    ArtifactManager.reset_instance()


def _manager(root: Path) -> ArtifactManager:
    manager = ArtifactManager.reset_instance()
    manager.set_root(root)
    return manager


def _model() -> torch.nn.Sequential:
    """~3 MB of float32: 1 MiB and 2 MiB weights (a part each), a small head."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(),
                               torch.nn.Linear(1024, 512), torch.nn.ReLU(),
                               torch.nn.Linear(512, 10))


def _state(model: torch.nn.Module) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _fine_tune(model: torch.nn.Sequential, steps: int) -> None:
    """A few real optimizer steps on the head only (the rest is frozen)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model[4].parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(steps)
    for _ in range(steps):
        x = torch.randn(8, 256, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _log_checkpoints(root: Path) -> list[dict[str, Any]]:
    """Two chunked checkpoints (v1, v2) of one fine-tune; their state dicts."""
    model = _model()
    manager = _manager(root)
    manager.init_run("finetune", config={"frozen": "0,2"})
    states = []
    for steps in (1, 2):
        _fine_tune(model, steps)
        states.append(_state(model))
        manager.log_artifact("ckpt", "checkpoint", data=states[-1])
    manager.finalize_run()
    return states


def _rows(root: Path) -> dict[tuple[str, int], tuple[str, int, str | None]]:
    """(name, number) -> (digest, size, manifest) of every version of a SQLite store."""
    conn = sqlite3.connect(root / "registry.sqlite")
    try:
        return {(name, v): (d, s, m) for name, v, d, s, m in conn.execute(
            "SELECT name, version, digest, size, manifest FROM versions")}
    finally:
        conn.close()


def _blobs(root: Path, name: str, version: int) -> set[tuple[str, int]]:
    conn = sqlite3.connect(root / "registry.sqlite")
    try:
        return {(d, s) for d, s in conn.execute(
            "SELECT b.digest, b.size FROM version_blobs b JOIN versions v ON v.id ="
            " b.version_id WHERE v.name = ? AND v.version = ?", (name, version))}
    finally:
        conn.close()


def _assert_identical(root: Path, key: str, state: dict[str, Any] | None = None,
                      data: bytes | None = None) -> None:
    """Loadable and byte for byte the logged file (its whole digest)."""
    manager = _manager(root)
    if state is not None:
        loaded = manager.load_artifact(key)
        assert set(loaded) == set(state)
        for name, tensor in state.items():
            assert torch.equal(loaded[name], tensor), name
    meta = manager.use_artifact(key)
    assert meta.path is not None and meta.hash is not None
    assert hash_file(meta.path, "blake3") == meta.hash
    if data is not None:
        assert meta.path.read_bytes() == data


def _remote(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if kind == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/chunks"
    return str(tmp_path / "remote")


# -- push / pull --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dir", "s3"])
def test_a_second_checkpoint_pushes_only_its_new_parts(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    source, fresh = tmp_path / "source", tmp_path / "fresh"
    url = _remote(kind, tmp_path, request)
    states = _log_checkpoints(source)
    rows = _rows(source)
    assert all(m is not None for _, _, m in rows.values()), rows  # both chunked
    first = remote.push(url, "ckpt:v1", root=source, show_progress=False)
    v1, v2 = _blobs(source, "ckpt", 1), _blobs(source, "ckpt", 2)
    assert (first.blobs, first.bytes) == (len(v1), sum(s for _, s in v1))
    second = remote.push(url, root=source, show_progress=False)
    new = v2 - v1  # the head's part and the new manifest: the frozen layers are shared
    assert len(new) == 2 and sum(s for _, s in new) < 64 << 10, new
    assert (second.blobs, second.bytes) == (2, sum(s for _, s in new))
    assert second.versions == ["default/ckpt:v2"]

    pulled = remote.pull(url, root=fresh, show_progress=False)
    assert sorted(pulled.versions) == ["default/ckpt:v1", "default/ckpt:v2"]
    assert pulled.blobs == len(v1 | v2) and not pulled.problems
    assert _rows(fresh) == rows  # the manifest column came along
    for number, state in ((1, states[0]), (2, states[1])):
        _assert_identical(fresh, f"ckpt:v{number}", state)


def test_a_content_defined_file_round_trips(tmp_path: Path, s3_bucket: str) -> None:
    source, fresh = tmp_path / "source", tmp_path / "fresh"
    url = f"s3://{s3_bucket}/cdc"
    data = random.Random(7).randbytes(3 << 20)  # no safetensors header: FastCDC chunks
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    manager = _manager(source)
    manager.init_run("export")
    meta = manager.log_artifact("blob", "model", file_path=path)
    manager.finalize_run()
    (digest, size, manifest_digest), = _rows(source).values()
    assert (digest, size) == (hash_bytes(data, "blake3"), len(data)) == (meta.hash, len(data))
    assert manifest_digest is not None
    stored = LocalStorageBackend(source).blob_path(manifest_digest)
    chunks = parse_manifest(stored.read_bytes())
    assert chunks.method == "cdc" and len(chunks.parts) >= 2
    pushed = remote.push(url, root=source, show_progress=False)
    assert pushed.blobs == len(chunks.blobs()) + 1  # every chunk and the manifest, no more
    edited = data[:-100] + bytes(100)  # cut points before the edit stay where they were
    path.write_bytes(edited)
    manager.init_run("export-again")
    manager.log_artifact("blob", "model", file_path=path)
    manager.finalize_run()
    again = remote.push(url, root=source, show_progress=False)
    assert again.blobs == 2  # the last chunk and the manifest
    remote.pull(url, root=fresh, show_progress=False)
    assert _rows(fresh) == _rows(source)
    _assert_identical(fresh, "blob:v1", data=data)
    _assert_identical(fresh, "blob:v2", data=edited)
    served = _manager(fresh).use_artifact("blob:v1").path
    assert served is not None and served.name == "weights.bin"  # served under its name


# -- forged remote records ----------------------------------------------------------------------


def _forge_manifest(record: dict[str, Any]) -> None:
    record["manifest"] = "blake3:" + "ab" * 32  # a digest, but none of its blobs


def _forge_not_a_digest(record: dict[str, Any]) -> None:
    record["manifest"] = "../../blobs/x"


def _forge_old_format(record: dict[str, Any]) -> None:
    record["format_version"] = 1  # a format-1 record never names a manifest


def _forge_a_part(record: dict[str, Any]) -> None:
    """A part posing as the manifest (it is among the blobs, but describes nothing)."""
    record["manifest"] = next(d for d, s in record["blobs"] if d != record["manifest"])


@pytest.mark.parametrize("forge", [_forge_manifest, _forge_not_a_digest, _forge_old_format,
                                   _forge_a_part], ids=lambda f: f.__name__[7:])
def test_a_forged_chunked_record_is_refused(forge: Any, tmp_path: Path) -> None:
    source, fresh, url = tmp_path / "source", tmp_path / "fresh", tmp_path / "remote"
    _log_checkpoints(source)
    remote.push(str(url), root=source, show_progress=False)
    path = url / "meta" / "versions" / "default" / "ckpt" / f"{1:012d}.json"
    record = json.loads(path.read_bytes())
    assert record["format_version"] == 2 and record["manifest"] in {
        d for d, _ in record["blobs"]}
    forge(record)
    os.chmod(path, 0o644)
    path.write_text(json.dumps(record))
    with pytest.raises(IntegrityError, match="forged"):
        remote.pull(str(url), root=fresh, show_progress=False)
    registry = fresh / "registry.sqlite"
    if registry.exists():
        assert _rows(fresh) == {}  # nothing was imported


# -- recover ------------------------------------------------------------------------------------


def _journal(root: Path) -> Path:
    (journal,) = (root / "runs").glob("*/events.jsonl")
    return journal


def test_recover_gives_back_the_manifest_column(tmp_path: Path) -> None:
    root = tmp_path / "store"
    states = _log_checkpoints(root)
    data = random.Random(3).randbytes(3 << 20)  # FastCDC: a few chunks
    manager = _manager(root)
    manager.init_run("more")
    (tmp_path / "raw.bin").write_bytes(data)
    manager.log_artifact("raw", "dataset", file_path=tmp_path / "raw.bin")
    manager.log_artifact("small", "dataset", data=b"not chunked")
    manager.finalize_run()
    before = _rows(root)
    assert sum(m is not None for _, _, m in before.values()) == 3
    # an older journal (no "manifest" key) for the small version, and two forged lines
    journals = {j.parent.name: j for j in (root / "runs").glob("*/events.jsonl")}
    more = next(j for j in journals.values() if b'"raw"' in j.read_bytes())
    lines = [json.loads(line) for line in more.read_text().splitlines()]
    for line in lines:
        if line.get("name") == "small":
            assert line.pop("manifest") is None
    raw = next(line for line in lines if line.get("name") == "raw")
    outside = dict(raw, version=7, manifest="blake3:" + "cd" * 32)
    part = dict(raw, version=8, manifest=next(  # a chunk, not a manifest
        d for d, _ in raw["blobs"] if d != raw["manifest"]))
    more.write_text("".join(json.dumps(line) + "\n" for line in [*lines, outside, part]))
    for name in os.listdir(root):
        if name.startswith("registry.sqlite"):
            os.replace(root / name, tmp_path / name)
    report = recover_store(root)
    assert _rows(root) == before
    problems = " | ".join(report.problems)
    assert "default/raw:v7" in problems and "not among its blobs" in problems, problems
    assert "default/raw:v8" in problems, problems
    _assert_identical(root, "ckpt:v1", states[0])
    _assert_identical(root, "ckpt:v2", states[1])
    _assert_identical(root, "raw:v1", data=data)
    assert _manager(root).load_artifact("small:v1") == b"not chunked"


def test_a_pulled_run_journal_recovers_chunked_versions(tmp_path: Path) -> None:
    """A pulled run's journal is derived from the registry (``remote/_exports.py``): it must
    name the manifest as the original does, or a recovered store loses it."""
    source, fresh, url = tmp_path / "source", tmp_path / "fresh", tmp_path / "remote"
    states = _log_checkpoints(source)
    remote.push(str(url), root=source, show_progress=False)
    remote.pull(str(url), root=fresh, show_progress=False)
    before = _rows(fresh)
    events = [json.loads(line) for line in _journal(fresh).read_text().splitlines()]
    assert {e["manifest"] for e in events if e["event"] == "version"} == {
        m for _, _, m in before.values()}
    for name in os.listdir(fresh):
        if name.startswith("registry.sqlite"):
            os.remove(fresh / name)
    recover_store(fresh)
    assert _rows(fresh) == before
    _assert_identical(fresh, "ckpt:v2", states[1])


# -- migrate and a shared PostgreSQL registry ---------------------------------------------------


def test_migrate_there_and_back_keeps_chunked_versions(tmp_path: Path, pg_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from pg_support import PASSWORD

    from repro_core.registry.engine_postgres import close_connections
    from repro_core.registry.migrate import migrate

    root = tmp_path / "store"
    states = _log_checkpoints(root)
    before = _rows(root)
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # the store's URL has no password
    try:
        migrate(root, pg_url)
        registry = _manager(root).registry()
        assert registry.engine == "postgresql"
        assert {(r.name, r.version): (r.digest, r.size, r.manifest)
                for r in (registry.get_version(int(v)) for (v,) in registry._read(
                    "SELECT id FROM versions"))} == before
        _assert_identical(root, "ckpt:v2", states[1])  # served from PostgreSQL's rows
        ArtifactManager.reset_instance()
        migrate(root, "sqlite")
    finally:
        ArtifactManager.reset_instance()
        close_connections()
    assert _rows(root) == before
    _assert_identical(root, "ckpt:v1", states[0])


def test_a_host_sharing_the_registry_fetches_the_parts(tmp_path: Path, pg_url: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from repro_core.registry.engine_postgres import close_connections

    monkeypatch.setenv("REPRO_REGISTRY", pg_url)
    url = str(tmp_path / "remote")
    host_a, host_b = tmp_path / "host-a", tmp_path / "host-b"
    try:
        manager = _manager(host_a)
        manager.init_run("host-a", remote=url)
        state = _state(_model())
        manager.log_artifact("ckpt", "checkpoint", data=state)
        manager.finalize_run()  # the mirror has pushed parts and manifest
        manager = _manager(host_b)
        manager.init_run("host-b")  # a store of its own, no blob of A's
        assert not LocalStorageBackend(host_b).blob_path(
            manager.registry().get_version(1).manifest or "").exists()
        loaded = manager.load_artifact("ckpt:v1")  # parts and manifest fetched from the remote
        assert all(torch.equal(loaded[k], v) for k, v in state.items())
        meta = manager.use_artifact("ckpt:v1")
        assert meta.path is not None and hash_file(meta.path, "blake3") == meta.hash
        manager.finalize_run()
    finally:
        ArtifactManager.reset_instance()
        close_connections()


# -- W&B ----------------------------------------------------------------------------------------


def test_wandb_gets_the_real_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "w").mkdir()
    wandb_dir = offline_env(tmp_path / "w", monkeypatch)
    root = tmp_path / "store"
    data = random.Random(11).randbytes(1 << 20)
    (tmp_path / "model.bin").write_bytes(data)
    manager = _manager(root)
    manager.init_run("train")
    meta = manager.log_artifact("model", "model", file_path=tmp_path / "model.bin")
    manager.finalize_run()
    (_, _, manifest_digest), = _rows(root).values()
    assert manifest_digest is not None  # chunked
    shutil.rmtree(root / "cache", ignore_errors=True)  # nothing assembled before the push
    report = remote.push("wandb://repro-mirror", root=root, show_progress=False)
    assert report.versions == ["default/model:v1"] and report.bytes == len(data)
    (artifact,) = logged_artifacts(wandb_dir)
    ((_, (size, _, staged)),) = manifest(artifact).items()
    assert size == len(data) and staged == data  # the real bytes, never the manifest
    assert hash_bytes(staged, "blake3") == meta.hash
