"""The store commands on chunked content (issue 14): `repro verify`, `repro du`,
`repro artifacts` / `repro show` and `repro gc`, on a real store written by a real model.

What each test proves (the failure it would catch):

- ``test_verify_names_the_tensor_and_every_version_sharing_a_flipped_blob``: a flipped byte
  in a frozen layer's blob (one blob, three checkpoints) is one problem naming the tensor and
  exactly those three versions, in text and JSON; the checkpoint from before the freeze still
  verifies and loads.
- ``test_verify_reports_a_forged_or_missing_chunk_manifest``: damage to a manifest is a problem
  of that version (exit 1), never a traceback (exit 2).
- ``test_verify_hashes_chunked_files_whole_and_catches_parts_in_the_wrong_order``: a forged
  manifest listing the version's own intact parts in another order passes every blob's check;
  verify hashes the parts as the file they make and reports the manifest.
- ``test_verify_names_the_tensor_and_file_of_a_chunked_file_in_a_directory``: a bad part of a
  chunked ``model.safetensors`` inside a directory version is named by tensor and file.
- ``test_du_and_stored_bytes_are_exact``: logical, stored and saved bytes for a constructed
  store (three checkpoints sharing a frozen layer, two artifacts with identical content), in
  `du`, `verify --json`, `artifacts` and `show`; per-version stored bytes add up to du's.
- ``test_gc_keeps_every_referenced_part_and_removes_an_aborted_logs_orphans``: gc after
  chunked logs deletes nothing referenced; the parts a failed log left behind go, and the
  parts it shared with logged versions stay.
- ``test_gc_removes_assembled_files_not_used_for_the_grace_period``: assembled copies
  (``cache/assembled``) go once unused for the grace period, a dead build's temp file goes,
  a recently used copy stays; the version is put together again afterwards.
- ``test_an_old_store_without_chunks``: a schema v7 store (no ``manifest`` column, nothing
  chunked) verifies and reports its usage, and is left at v7.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from helpers.damage import flip_byte
from torch import nn

from repro_core import ArtifactManager, IntegrityError, constants
from repro_core.chunks.manifest import ChunkManifest, encode
from repro_core.chunks.read import manifest_of
from repro_core.cli import main
from repro_core.cli._common import fmt_size
from repro_core.hashing import hash_bytes, hash_file
from repro_core.registry import Registry
from repro_core.registry.versions import VersionQueries
from repro_core.store.local import LocalStorageBackend
from repro_core.types import parse_key

MiB = 1 << 20
LAYER = 512 * 512 * 4  # one float32 512x512 weight: its own part (>= chunks.split.SMALL_TENSOR)


@pytest.fixture
def chunky(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk anything of 256 KiB or more, verify by hashing (as in production)."""
    monkeypatch.setattr(constants, "REPRO_CHUNK_MIN_BYTES", 1 << 18)
    monkeypatch.setattr(constants, "REPRO_VERIFY", "full")


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def _json(root: Path, *args: str) -> Any:
    code, out = invoke(*args, "--root", str(root), "--json")
    assert code in (0, 1), out
    return json.loads(out)


def _table_rows(out: str) -> list[list[str]]:
    """The cells of a rich table as printed (header row first)."""
    return [[cell.strip() for cell in line.strip()[1:-1].split(line.strip()[0])]
            for line in out.splitlines() if line.strip()[:1] in ("┃", "│")]


def _registry(root: Path) -> Registry:
    return Registry(root / "registry.sqlite", readonly=True)


def _manifest(manager: ArtifactManager, key: str) -> ChunkManifest:
    registry = _registry(manager.root)
    try:
        row = registry.resolve(parse_key(key))
        store = LocalStorageBackend(manager.root, algorithm=registry.hash_algorithm())
        return manifest_of(store, registry, row, full=True)
    finally:
        registry.close()


def _part(manifest: ChunkManifest, tensor: str) -> str:
    (digest,) = [p.digest for p in manifest.parts if p.tensors == (tensor,)]
    return digest


def _blob_path(root: Path, digest: str) -> Path:
    algo, hexdigest = digest.split(":")
    return root / "blobs" / algo / hexdigest[:2] / hexdigest[2:]


def _blobs_on_disk(root: Path) -> set[str]:
    return {f"{p.parent.parent.name}:{p.parent.name}{p.name}"
            for p in (root / "blobs").glob("*/*/*") if p.is_file()}




def _model() -> nn.Sequential:
    """Two bias-free 512x512 layers: the state dict is exactly two 1 MiB tensors, each its own
    part, so what two checkpoints share is known to the byte."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 512, bias=False), nn.Linear(512, 512, bias=False))


def _train(model: nn.Module, steps: int = 2) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        x, y = torch.randn(8, 512), torch.randn(8, 512)
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _checkpoints(manager: ArtifactManager, count: int
                 ) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """One checkpoint of the whole model; then both layers trained once more, layer 0 frozen
    and ``count - 1`` checkpoints, layer 1 trained between them: checkpoints 2.. share layer
    0's blob, checkpoint 1 shares only the header (same shapes, same header bytes)."""
    model = _model()
    _train(model)
    saved = [(manager.log_artifact("ft", "checkpoint", data=_state(model)).key, _state(model))]
    _train(model)
    model[0].requires_grad_(False)
    for _ in range(count - 1):
        _train(model)
        state = _state(model)
        saved.append((manager.log_artifact("ft", "checkpoint", data=state).key, state))
    return saved


def _same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


# -- verify -------------------------------------------------------------------------------------


def test_verify_names_the_tensor_and_every_version_sharing_a_flipped_blob(
        manager: ArtifactManager, run: Any, chunky: None) -> None:
    saved = _checkpoints(manager, 4)
    (k1, s1), (k2, _), (k3, _), (k4, _) = saved
    root = manager.root
    frozen = _part(_manifest(manager, k2), "0.weight")
    assert all(_part(_manifest(manager, k), "0.weight") == frozen for k in (k3, k4))
    assert _part(_manifest(manager, k1), "0.weight") != frozen  # trained before the freeze
    assert _json(root, "verify")["ok"] is True

    flip_byte(_blob_path(root, frozen), 4321)
    report = _json(root, "verify")
    assert report["ok"] is False
    assert report["problems"] == [{"digest": frozen, "kind": "digest",
                                   "message": report["problems"][0]["message"],
                                   "versions": sorted([k2, k3, k4]),
                                   "holds": ["tensor '0.weight'"]}]
    code, out = invoke("verify", "--root", str(root))
    assert code == 1
    users = ", ".join(sorted([k2, k3, k4]))
    assert f"DIGEST {frozen} holding tensor '0.weight' (used by {users})" \
        in " ".join(out.split()), out
    # one version's check names every version that shares the bad blob
    one = _json(root, "verify", k3)
    assert [(p["versions"], p["holds"]) for p in one["problems"]] == [
        (sorted([k2, k3, k4]), ["tensor '0.weight'"])]
    # sizes only: a flipped byte keeps the size, nothing to report
    assert _json(root, "verify", "--size-only")["ok"] is True

    # the checkpoint from before the freeze shares nothing bad: verified and loaded as logged
    assert _json(root, "verify", k1)["ok"] is True
    _same(manager.load_artifact(k1), s1)
    assert hash_file(manager.use_artifact(k1).path) == _registry_digest(root, k1)
    with pytest.raises(IntegrityError, match=r"0\.weight"):
        manager.load_artifact(k3)


def _registry_digest(root: Path, key: str) -> str:
    registry = _registry(root)
    try:
        return registry.resolve(parse_key(key)).digest
    finally:
        registry.close()


def test_verify_reports_a_forged_or_missing_chunk_manifest(
        manager: ArtifactManager, run: Any, chunky: None) -> None:
    (k1, _), (k2, s2), (k3, _) = _checkpoints(manager, 3)
    root = manager.root
    registry = _registry(root)
    rows = {k: registry.resolve(parse_key(k)) for k in (k1, k2, k3)}
    registry.close()
    # k1: its row names a manifest the registry records no blob for (a forged row)
    con = sqlite3.connect(root / "registry.sqlite")
    with con:
        con.execute("UPDATE versions SET manifest = ? WHERE id = ?",
                    (rows[k2].manifest, rows[k1].id))
    con.close()
    # k3: its manifest blob is gone
    _blob_path(root, str(rows[k3].manifest)).unlink()

    code, out = invoke("verify", "--root", str(root), "--json")
    assert code == 1, out
    problems = {(p["digest"], p["kind"]): p for p in json.loads(out)["problems"]}
    forged = problems[(rows[k2].manifest, "manifest")]
    assert forged["versions"] == [k1] and "registry" in forged["message"]
    missing = problems[(rows[k3].manifest, "missing")]
    assert missing["versions"] == [k3] and missing["holds"] == ["chunk manifest"]
    assert len(problems) == 2
    code, out = invoke("verify", "--root", str(root))
    assert code == 1 and "Traceback" not in out and "MANIFEST" in out and k1 in out
    _same(manager.load_artifact(k2), s2)  # the version whose manifest was borrowed: intact


def test_verify_hashes_chunked_files_whole_and_catches_parts_in_the_wrong_order(
        manager: ArtifactManager, run: Any, chunky: None) -> None:
    """A manifest naming the version's own, intact parts in another order passes every
    blob's check; only the parts hashed as the file they make show the forgery."""
    (key, _), (other, state) = _checkpoints(manager, 2)
    root = manager.root
    genuine = _manifest(manager, key)
    header, first, second = genuine.parts
    assert (first.size, second.size) == (LAYER, LAYER)
    forged = dataclasses.replace(genuine, parts=(
        header, dataclasses.replace(first, digest=second.digest),
        dataclasses.replace(second, digest=first.digest)))
    raw = encode(forged)
    digest = hash_bytes(raw)
    _blob_path(root, digest).parent.mkdir(parents=True, exist_ok=True)
    _blob_path(root, digest).write_bytes(raw)
    row_id = _row_id(root, key)
    con = sqlite3.connect(root / "registry.sqlite")
    with con:
        con.execute("UPDATE version_blobs SET digest = ?, size = ? WHERE version_id = ? AND "
                    "digest = ?", (digest, len(raw), row_id, _manifest_digest(root, key)))
        con.execute("UPDATE versions SET manifest = ? WHERE id = ?", (digest, row_id))
    con.close()

    assert _json(root, "verify", "--size-only")["ok"] is True  # every blob is intact
    report = _json(root, "verify")
    assert [(p["digest"], p["kind"], p["versions"]) for p in report["problems"]] == [
        (digest, "manifest", [key])]
    assert "put together hash to" in report["problems"][0]["message"]
    _same(manager.load_artifact(other), state)


def test_verify_names_the_tensor_and_file_of_a_chunked_file_in_a_directory(
        manager: ArtifactManager, run: Any, chunky: None, tmp_path: Path) -> None:
    model = _model()
    (tmp_path / "state").mkdir()
    safetensors.torch.save_file(_state(model), str(tmp_path / "state" / "model.safetensors"))
    (tmp_path / "state" / "notes.txt").write_text("small, stored whole")
    key = manager.log_artifact("state", "checkpoint", file_path=tmp_path / "state").key
    registry = _registry(manager.root)
    row = registry.resolve(parse_key(key))
    blobs = dict(registry.blobs_of(row.id))
    registry.close()
    big = [d for d, n in blobs.items() if n == LAYER]
    assert len(big) == 2, "model.safetensors is not stored per tensor"
    assert _json(manager.root, "verify")["ok"] is True
    flip_byte(_blob_path(manager.root, big[0]), 99)
    (problem,) = _json(manager.root, "verify")["problems"]
    assert (problem["digest"], problem["kind"], problem["versions"]) == (big[0], "digest", [key])
    assert len(problem["holds"]) == 1
    assert problem["holds"][0] in ("tensor '0.weight' of file 'model.safetensors'",
                                   "tensor '1.weight' of file 'model.safetensors'")


def _row_id(root: Path, key: str) -> int:
    registry = _registry(root)
    try:
        return registry.resolve(parse_key(key)).id
    finally:
        registry.close()


def _manifest_digest(root: Path, key: str) -> str:
    registry = _registry(root)
    try:
        return str(registry.resolve(parse_key(key)).manifest)
    finally:
        registry.close()


# -- du, artifacts, show ------------------------------------------------------------------------


def test_du_and_stored_bytes_are_exact(manager: ArtifactManager, chunky: None) -> None:
    run = manager.init_run("train")
    (k1, _), (k2, _), (k3, _) = _checkpoints(manager, 3)
    config = {"lr": 0.1, "layers": [512, 512]}
    manager.log_artifact("cfg-a", "config", data=config)
    manager.log_artifact("cfg-b", "config", data=config)  # same bytes: one blob
    manager.finalize_run()
    root = manager.root

    registry = _registry(root)
    rows = registry.list_versions()
    blobs = {v.key: dict(registry.blobs_of(v.id)) for v in rows}
    registry.close()
    size = {v.key: v.size for v in rows}
    manifests = {v.key: blobs[v.key][v.manifest] for v in rows if v.manifest}
    header = size[k1] - 2 * LAYER  # the header part: the file less its two tensors
    assert sorted(blobs[k1].values()) == sorted([header, LAYER, LAYER, manifests[k1]])
    everything = {d: n for b in blobs.values() for d, n in b.items()}
    cfg = size["default/cfg-a:v1"]
    # built up by hand: v1 is stored whole (header, two layers, manifest); v2 adds both layers
    # (layer 0 was trained once more before the freeze) and its manifest, v3 its trained
    # layer 1 and manifest; the second config adds nothing
    stored = (size[k1] + manifests[k1] + 2 * LAYER + manifests[k2] + LAYER + manifests[k3]
              + cfg)
    assert stored == sum(everything.values())
    logical = 3 * size[k1] + 2 * cfg
    expected = {"versions": 5, "chunked_versions": 3, "logical_bytes": logical,
                "stored_bytes": stored, "blobs": 4 + 3 + 2 + 1,
                "saved_bytes": logical - stored, "ratio": pytest.approx(logical / stored)}
    assert _json(root, "du") == expected
    assert _json(root, "verify")["dedup"] == expected
    code, out = invoke("du", "--root", str(root))
    assert code == 0 and out.splitlines() == [
        "versions: 5 (3 chunked)",
        f"logical:  {fmt_size(logical)} ({logical} bytes)",
        f"stored:   {fmt_size(stored)} ({stored} bytes) in 10 blob(s)",
        f"saved:    {fmt_size(logical - stored)} ({logical - stored} bytes), "
        f"ratio {logical / stored:.2f}x"]

    new = {k1: size[k1] + manifests[k1], k2: 2 * LAYER + manifests[k2],
           k3: LAYER + manifests[k3], "default/cfg-a:v1": cfg, "default/cfg-b:v1": 0}
    listed = _json(root, "artifacts")
    assert {r["key"]: r["stored_bytes"] for r in listed} == new
    assert sum(new.values()) == stored
    assert {r["key"] for r in listed if r["manifest"]} == {k1, k2, k3}
    code, out = invoke("artifacts", "ft", "--root", str(root))
    table = _table_rows(out)
    assert code == 0 and table[0][5:7] == ["size", "stored"]
    assert [row[5:7] for row in table[1:]] == [["2.0 MiB", "2.0 MiB"], ["2.0 MiB", "2.0 MiB"],
                                               ["2.0 MiB", "1.0 MiB"]]

    shown = _json(root, "show", str(run.id))
    assert shown["outputs"] == [k1, k2, k3, "default/cfg-a:v1", "default/cfg-b:v1"]
    assert [(o["key"], o["size"], o["stored_bytes"]) for o in shown["output_versions"]] == [
        (k, size[k], new[k]) for k in shown["outputs"]]
    code, out = invoke("show", str(run.id), "--root", str(root))
    assert code == 0 and f"{k3} (2.0 MiB, 1.0 MiB new)" in out
    assert f"default/cfg-b:v1 ({cfg} B, 0 B new)" in out

    # a pruned checkpoint leaves du (gc may take its blobs): what only it held (both layers,
    # its manifest) is no longer counted, the header it shares is now v2's
    manager.prune_version(k1)
    after = _json(root, "du")
    assert after["logical_bytes"] == logical - size[k1]
    assert after["stored_bytes"] == stored - 2 * LAYER - manifests[k1]
    listed = {r["key"]: r["stored_bytes"] for r in _json(root, "artifacts")}
    assert listed[k1] is None and listed[k2] == header + 2 * LAYER + manifests[k2]
    assert sum(v for v in listed.values() if v is not None) == after["stored_bytes"]


# -- gc -----------------------------------------------------------------------------------------


def test_gc_keeps_every_referenced_part_and_removes_an_aborted_logs_orphans(
        manager: ArtifactManager, run: Any, chunky: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    saved = _checkpoints(manager, 3)
    root = manager.root
    before = _blobs_on_disk(root)
    nothing = _json(root, "gc", "--delete", "--grace", "0")
    assert nothing["blobs"] == [] and _blobs_on_disk(root) == before

    # a log that dies between its blobs and its registry row (as a crash would)
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("registry write failed")

    model = _model()
    model.load_state_dict(saved[-1][1])
    model[0].requires_grad_(False)
    _train(model)
    with monkeypatch.context() as patch:
        patch.setattr(VersionQueries, "add_version", fail)
        with pytest.raises(RuntimeError, match="registry write failed"):
            manager.log_artifact("ft", "checkpoint", data=_state(model))
    orphans = _blobs_on_disk(root) - before
    assert len(orphans) == 2  # the new layer 1 and the manifest; header and layer 0 were there

    young = _json(root, "gc", "--delete")  # within the grace period: kept as evidence
    assert young["blobs"] == [] and young["kept_young"] == 2
    dry = _json(root, "gc", "--grace", "0")
    assert sorted(dry["blobs"]) == sorted(orphans) and _blobs_on_disk(root) >= orphans
    gone = _json(root, "gc", "--delete", "--grace", "0")
    assert sorted(gone["blobs"]) == sorted(orphans)
    assert _blobs_on_disk(root) == before
    assert _json(root, "verify")["ok"] is True
    for key, state in saved:
        _same(manager.load_artifact(key), state)


def test_gc_removes_assembled_files_not_used_for_the_grace_period(
        manager: ArtifactManager, run: Any, chunky: None) -> None:
    (k1, _), (k2, _) = _checkpoints(manager, 2)
    root = manager.root
    paths = {k: manager.use_artifact(k).path for k in (k1, k2)}
    entries = {k: p.parent for k, p in paths.items()}
    assert all(e.parent.parent.name == "assembled" and (e / ".identity").is_file()
               for e in entries.values())
    size = paths[k1].stat().st_size + (entries[k1] / ".identity").stat().st_size

    fresh = _json(root, "gc", "--delete")
    assert fresh["assembled"] == 0 and all(e.is_dir() for e in entries.values())

    long_ago = time.time() - 7200
    os.utime(entries[k1] / ".identity", (long_ago, long_ago))
    dead = entries[k2] / ".tmp-0123456789abcdef"  # a build killed a day and more ago
    dead.write_bytes(b"x" * 1000)
    os.utime(dead, (time.time() - 2 * 86400,) * 2)

    dry = _json(root, "gc")
    assert (dry["assembled"], dry["assembled_bytes"]) == (2, size + 1000)
    assert entries[k1].is_dir() and dead.exists()
    code, out = invoke("gc", "--root", str(root))
    assert code == 0 and "would remove 2 assembled file(s) from the cache" in out
    done = _json(root, "gc", "--delete")
    assert (done["assembled"], done["blobs"]) == (2, [])
    assert not entries[k1].exists() and not dead.exists()
    assert paths[k2].is_file()  # used within the grace period: kept, only the dead temp went
    again = manager.use_artifact(k1).path  # put together again
    assert hash_file(again) == _registry_digest(root, k1)


# -- an old store -------------------------------------------------------------------------------


def test_an_old_store_without_chunks(manager: ArtifactManager, run: Any,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A store the previous repro wrote (schema v7: no ``manifest`` column, big content as one
    blob) is read as it is: verify, du and artifacts work, the file stays at v7."""
    monkeypatch.setattr(constants, "REPRO_CHUNK_MIN_BYTES", None)  # chunking off: as before
    model = _model()
    first = manager.log_artifact("old", "checkpoint", data=_state(model))
    _train(model)
    manager.log_artifact("old", "checkpoint", data=_state(model))
    manager.log_artifact("copy", "checkpoint", data=_state(model))  # same bytes as old:v2
    manager.finalize_run()
    root = manager.root
    con = sqlite3.connect(root / "registry.sqlite")
    with con:
        con.execute("ALTER TABLE versions DROP COLUMN manifest")
        con.execute("UPDATE schema_version SET version = 7")
    con.close()

    verified = _json(root, "verify")
    assert verified["ok"] is True and verified["blobs_checked"] == 2
    usage = _json(root, "du")
    assert usage == verified["dedup"]
    assert (usage["versions"], usage["chunked_versions"], usage["blobs"]) == (3, 0, 2)
    assert usage["logical_bytes"] == 3 * first.size_bytes
    assert usage["stored_bytes"] == 2 * first.size_bytes
    listed = {r["key"]: r["stored_bytes"] for r in _json(root, "artifacts")}
    assert listed == {"default/old:v1": first.size_bytes, "default/old:v2": first.size_bytes,
                      "default/copy:v1": 0}
    flip_byte(_blob_path(root, first.hash), 100)
    report = _json(root, "verify")
    assert [(p["digest"], p["versions"], p["holds"]) for p in report["problems"]] == [
        (first.hash, ["default/old:v1"], [])]
    con = sqlite3.connect(root / "registry.sqlite")
    assert con.execute("SELECT version FROM schema_version").fetchone() == (7,)
    con.close()
