"""ArtifactManager end to end on a real store: round trips, versions, aliases, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_types import HOSTILE_NAMES

from repro_core import (
    ArtifactManager,
    ArtifactNotFoundError,
    ArtifactType,
    InvalidArgumentError,
    InvalidNameError,
    LocalStorageBackend,
    MissingFileError,
    RunState,
    RunStateError,
    SerializationError,
    StorageError,
    hash_bytes,
    verify_store,
)
from repro_core.registry import SCHEMA_VERSION, Registry, run_script
from repro_core.registry.schema import _SCHEMA_V1


def _store_files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_manager_is_a_singleton(manager: ArtifactManager) -> None:
    assert ArtifactManager() is manager
    assert ArtifactManager.reset_instance() is not manager


@pytest.mark.parametrize(
    "data",
    [
        {"b": [1, 2.5, None, True], "a": {"nested": "ü"}},
        [1, "two", {"three": 3.0}],
        "plain text ✓",
        b"\x00\x01binary\xff",
    ],
    ids=["dict", "list", "str", "bytes"],
)
def test_round_trip_plain_data(manager: ArtifactManager, run: object, data: object) -> None:
    meta = manager.log_artifact("thing", "dataset", data=data)
    assert meta.path is not None and meta.path.is_file()
    assert manager.load_artifact("thing:v1") == data
    assert manager.use_artifact("thing").path.read_bytes() == meta.path.read_bytes()


def test_round_trip_tensors_is_real_safetensors(manager: ArtifactManager, run: object) -> None:
    state = {
        "w": torch.randn(7, 3),
        "b16": torch.randn(5).to(torch.bfloat16),
        "idx": torch.arange(4, dtype=torch.int64),
        "mask": torch.tensor([True, False]),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 3),
        "strided": torch.randn(4, 6)[:, ::2],  # non-contiguous view
    }
    meta = manager.log_artifact("model", ArtifactType.MODEL, data=state)
    assert meta.format == "safetensors"
    loaded = load_file(str(manager.use_artifact("model").path))  # the official reader
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


def test_tensor_order_and_identity(manager: ArtifactManager, run: object) -> None:
    """Same tensors in another dict order give the same digest (no new version)."""
    a = {"x": torch.ones(2), "y": torch.zeros(3)}
    first = manager.log_artifact("m", "model", data=a)
    second = manager.log_artifact("m", "model", data={"y": torch.zeros(3), "x": torch.ones(2)})
    assert (second.version, second.hash) == (first.version, first.hash)


def test_round_trip_numpy(manager: ArtifactManager, run: object) -> None:
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    manager.log_artifact("arr", "dataset", data=arr)
    back = manager.load_artifact("arr")
    assert back.dtype == arr.dtype and np.array_equal(back, arr)


def test_round_trip_file_and_directory(manager: ArtifactManager, run: object,
                                       tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "empty").mkdir()
    files = {"a.txt": b"alpha", "sub/b.bin": os.urandom(5000), "sub/deep/c": b"",
             "dup1": b"same", "dup2": b"same"}
    for rel, content in files.items():
        (src / rel).write_bytes(content)
    single = manager.log_artifact("one", "dataset", file_path=src / "a.txt")
    assert manager.use_artifact("one").path.read_bytes() == b"alpha"
    assert single.format == "file" and single.size_bytes == 5

    meta = manager.log_artifact("tree", "dataset", file_path=src)
    assert meta.format == "directory" and meta.size_bytes == sum(map(len, files.values()))
    used = manager.use_artifact("tree:v1")
    assert used.path is not None
    for rel, content in files.items():
        assert (used.path / rel).read_bytes() == content, rel
    assert (used.path / "empty").is_dir()
    # Logging the same tree again is the same version; a changed file makes v1.
    assert manager.log_artifact("tree", "dataset", file_path=src).version == "v1"
    (src / "a.txt").write_bytes(b"changed")
    assert manager.log_artifact("tree", "dataset", file_path=src).version == "v2"
    assert (manager.use_artifact("tree:v1").path / "a.txt").read_bytes() == b"alpha"


def _blob_files(store_root: Path) -> dict[str, bytes]:
    """Every blob in the store, by its path under blobs/."""
    return {p.relative_to(store_root / "blobs").as_posix(): p.read_bytes()
            for p in (store_root / "blobs").rglob("*") if p.is_file()}


def test_directory_versions_store_shared_files_once(manager: ArtifactManager, run: object,
                                                    store_root: Path, tmp_path: Path) -> None:
    """Two versions of a directory sharing two of three files: 3 + 1 file blobs and one
    manifest per version; a file repeated inside one tree is one blob too (as in DVC)."""
    src = tmp_path / "data"
    (src / "sub").mkdir(parents=True)
    files = {"a.csv": os.urandom(3000), "sub/b.csv": os.urandom(3000), "c.csv": os.urandom(3000)}
    for rel, content in files.items():
        (src / rel).write_bytes(content)
    (src / "copy-of-a.csv").write_bytes(files["a.csv"])
    first = manager.log_artifact("data", "dataset", file_path=src)
    after_first = _blob_files(store_root)
    assert first.hash is not None
    manifest = LocalStorageBackend(store_root).blob_path(first.hash)
    assert sorted(after_first.values()) == sorted([*files.values(), manifest.read_bytes()])
    (src / "c.csv").write_bytes(b"changed" * 400)
    second = manager.log_artifact("data", "dataset", file_path=src)
    assert (first.version, second.version) == ("v1", "v2")
    blobs = _blob_files(store_root)
    assert len(blobs) == len(after_first) + 2  # the changed file and the second manifest
    contents = list(blobs.values())
    for content in (files["a.csv"], files["sub/b.csv"], files["c.csv"], b"changed" * 400):
        assert contents.count(content) == 1
    assert verify_store(store_root).ok


def test_versions_dedup_and_numeric_latest(manager: ArtifactManager, run: object) -> None:
    for i in range(12):
        assert manager.log_artifact("ds", "dataset", data={"i": i}).version == f"v{i + 1}"
    again = manager.log_artifact("ds", "dataset", data={"i": 11})
    assert again.version == "v12"  # identical to latest: no new version
    assert manager.use_artifact("ds").version == "v12"  # v11 after v9, not "v10" > "v12"
    assert manager.use_artifact("ds", "latest").version == "v12"
    # Content equal to an *older* version is a new version (W&B semantics).
    assert manager.log_artifact("ds", "dataset", data={"i": 0}).version == "v13"
    assert [m.version for m in manager.list_artifacts("ds")] == [f"v{i}" for i in range(1, 14)]


def test_aliases_and_digest_prefix(manager: ArtifactManager, run: object) -> None:
    v0 = manager.log_artifact("m", "model", data=b"zero", aliases=["best"])
    v1 = manager.log_artifact("m", "model", data=b"one")
    assert manager.use_artifact("m:best").version == "v1"
    assert sorted(v1.aliases) == ["latest"]
    manager.log_artifact("m", "model", data=b"one", aliases=["best"])  # moves 'best' to v1
    assert manager.use_artifact("m", "best").version == "v2"
    assert v0.hash is not None
    prefix = v0.hash[: len("blake3:") + 8]
    assert manager.use_artifact(f"m@{prefix}").version == "v1"
    assert manager.use_artifact("m", prefix).version == "v1"


def test_lookup_errors(manager: ArtifactManager, run: object) -> None:
    manager.log_artifact("m", "model", data=b"x")
    with pytest.raises(ArtifactNotFoundError, match=r"versions v1\.\.v1") as info:
        manager.use_artifact("m:v6")
    assert info.value.key == "m:v6"
    with pytest.raises(ArtifactNotFoundError):
        manager.use_artifact("m:nosuchalias")
    with pytest.raises(ArtifactNotFoundError, match="no artifact named"):
        manager.use_artifact("other")
    with pytest.raises(ArtifactNotFoundError, match="not 'dataset'"):
        manager.use_artifact("m", type="dataset")
    with pytest.raises(InvalidArgumentError, match="has type 'model'"):
        manager.log_artifact("m", "dataset", data=b"y")


def _same_prefix_contents() -> tuple[bytes, bytes]:
    """Two same-size contents whose BLAKE3 digests share their first 4 hex digits."""
    seen: dict[str, bytes] = {}
    for i in range(1 << 20):
        content = b"content-%06d" % i
        head = hash_bytes(content)[: len("blake3:") + 4]
        if head in seen:
            return seen[head], content
        seen[head] = content
    raise AssertionError("no shared prefix found")  # pragma: no cover


def test_digest_prefix_ambiguous_unique_and_unknown(manager: ArtifactManager, run: object,
                                                    store_root: Path) -> None:
    """A prefix two different digests share is refused as ambiguous (naming the count); one
    digest stored twice (v1 and v3) is not ambiguous and gives the newest version; a prefix
    nothing has says what the artifact does have."""
    first, second = _same_prefix_contents()
    short = hash_bytes(first)[: len("blake3:") + 4]
    assert manager.log_artifact("m", "model", data=first).version == "v1"
    assert manager.log_artifact("m", "model", data=second).version == "v2"
    assert manager.log_artifact("m", "model", data=first, aliases=["best"]).version == "v3"
    with pytest.raises(ArtifactNotFoundError, match=r"is ambiguous .*\(2 matches\)") as info:
        manager.use_artifact(f"m@{short}")
    assert info.value.key == f"m@{short}"
    assert manager.use_artifact(f"m@{hash_bytes(first)[:20]}").version == "v3"
    assert manager.use_artifact("m", hash_bytes(second)[:20]).version == "v2"
    unknown = "blake3:" + ("0" if short[-4:] != "0000" else "1") * 8
    with pytest.raises(ArtifactNotFoundError) as info:
        manager.use_artifact(f"m@{unknown}")
    assert str(info.value) == (f"'m@{unknown}' not found; default/m has versions v1..v3 and "
                               "aliases best, latest")
    with pytest.raises(ArtifactNotFoundError) as info:
        manager.use_artifact("nope:v1")
    assert str(info.value) == (f"no artifact named 'nope' in project 'default' of "
                               f"{store_root.absolute()}")


def test_relogging_latest_never_closes_a_cycle_through_a_run(manager: ArtifactManager,
                                                             store_root: Path) -> None:
    """ckpt:v1 → run "eval" (used it) → score:v1. Logging ckpt's content again from that run,
    naming score as parent, returns ckpt:v1 and adds neither the edge score → ckpt nor
    eval → ckpt: either would make ckpt its own ancestor."""
    from repro_core.lineage import LineageTracker

    manager.init_run("train")
    manager.log_artifact("ckpt", "model", data=b"frozen weights")
    manager.finalize_run()
    evaluation = manager.init_run("eval")
    manager.use_artifact("ckpt")
    manager.log_artifact("score", "evaluation", data={"acc": 0.5})
    again = manager.log_artifact("ckpt", "model", data=b"frozen weights",
                                 parent_artifacts=["score"])
    manager.finalize_run()
    assert again.version == "v1" and again.parent_artifacts == []
    assert manager.get_run(evaluation.id or "")["outputs"] == ["default/score:v1"]
    assert LineageTracker.from_store(store_root).detect_cycles() == []


def test_use_records_lineage_edges(manager: ArtifactManager, store_root: Path) -> None:
    first = manager.init_run("producer")
    ds = manager.log_artifact("ds", "dataset", data={"x": 1})
    manager.finalize_run()
    second = manager.init_run("consumer")
    manager.use_artifact("ds")
    model = manager.log_artifact("model", "model", data=b"w", parent_artifacts=["ds:v1"])
    manager.finalize_run()
    assert model.parent_artifacts == ["default/ds:v1"]
    lineage = manager.get_lineage("ds:v1")
    assert lineage["produced_by"]["id"] == first.id
    assert lineage["used_by"] == [second.id]
    assert lineage["children"] == ["default/model:v1"]
    assert manager.get_lineage("model")["run_inputs"] == ["default/ds:v1"]
    assert lineage["descendants"] == sorted([f"run:{second.id}", "default/model:v1"])
    assert manager.get_lineage("model")["ancestors"] == sorted(
        ["default/ds:v1", f"run:{first.id}", f"run:{second.id}"])
    exported = json.loads((store_root / "runs" / second.id / "run.json").read_text())
    assert exported["inputs"] == ["default/ds:v1"] and exported["outputs"] == ["default/model:v1"]
    assert exported["run"]["state"] == "completed"
    assert ds.run_id == first.id


def test_run_lifecycle(manager: ArtifactManager, store_root: Path) -> None:
    run = manager.init_run("r", config={"lr": 0.1}, project="proj", tags=["a"])
    assert run.id and run.is_rank_zero and run.dir == store_root / "runs" / run.id
    assert json.loads((run.dir / "config.json").read_text()) == {"lr": 0.1}
    with pytest.raises(RunStateError, match="still active"):
        manager.init_run("again")
    manager.set_run_state(RunState.FAILED, reason="diverged")
    manager.finalize_run()
    manager.finalize_run()  # idempotent
    stored = manager.get_run(run.id)
    assert stored["state"] == "failed" and stored["ended_at"]
    assert [s[0] for s in stored["states"]] == ["running", "failed"]  # one row per change


def test_no_active_run(manager: ArtifactManager) -> None:
    with pytest.raises(RunStateError, match="init_run"):
        manager.log_artifact("x", "dataset", data=b"x")
    with pytest.raises(RunStateError):
        manager.set_run_state("completed")


def test_bad_input_touches_nothing(manager: ArtifactManager, run: object, tmp_path: Path,
                                   store_root: Path) -> None:
    before = _store_files(store_root)
    cases: list[tuple[type[Exception], dict[str, object]]] = [
        (InvalidArgumentError, {"type": "weights", "data": b"x"}),
        (InvalidArgumentError, {"type": "model"}),
        (InvalidArgumentError, {"type": "model", "data": b"x", "file_path": tmp_path}),
        (MissingFileError, {"type": "model", "file_path": tmp_path / "missing.bin"}),
        (SerializationError, {"type": "model", "data": {"a": {"b": float("nan")}}}),
        (SerializationError, {"type": "model", "data": {"a": object()}}),
        (SerializationError, {"type": "model", "data": {1: "int key"}}),
        (SerializationError, {"type": "model", "data": np.array([object()])}),
        (SerializationError, {"type": "model", "data": {"t": torch.ones(1), "s": "str"}}),
        (SerializationError, {"type": "model", "data": 42}),
        (SerializationError, {"type": "model", "data": b"x", "metadata": {"m": {1, 2}}}),
        (ArtifactNotFoundError, {"type": "model", "data": b"x", "parent_artifacts": ["nope"]}),
        (InvalidArgumentError, {"type": "model", "data": b"x", "aliases": "best"}),
        (InvalidNameError, {"type": "model", "data": b"x", "aliases": ["v2"]}),
    ]
    for error, kwargs in cases:
        with pytest.raises(error):
            manager.log_artifact("victim", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SerializationError, match=r"data\['a'\]\['b'\]"):
        manager.log_artifact("victim", "model", data={"a": {"b": float("inf")}})
    assert _store_files(store_root) == before
    assert manager.list_artifacts() == []


def _tree_state(root: Path) -> dict[str, tuple[str, int, int, bytes]]:
    """Every entry under ``root``: kind, size, mtime and (files) content."""
    state: dict[str, tuple[str, int, int, bytes]] = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        kind = "dir" if path.is_dir() else "link" if path.is_symlink() else "file"
        content = path.read_bytes() if kind == "file" else b""
        state[path.relative_to(root).as_posix()] = (kind, st.st_size, st.st_mtime_ns, content)
    return state


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_write_nothing(manager: ArtifactManager, run: object, tmp_path: Path,
                                     store_root: Path, name: object) -> None:
    """Nothing is written beside the store (a name like ``../x``) nor inside it (no blob, no
    temp file, no registry change, no journal line) for a name that is refused."""
    before = _tree_state(tmp_path)
    # The run's store exists (writes would show): its SQLite file, or its PostgreSQL binding.
    assert {"store/registry.sqlite", "store/registry.url"} & set(before)
    with pytest.raises(InvalidNameError):
        manager.log_artifact(name, "dataset", data=b"x")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert _tree_state(tmp_path) == before
    assert manager.list_artifacts() == []


def test_log_large_artifact_streams(manager: ArtifactManager, run: object,
                                    tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 << 20))
    meta = manager.log_large_artifact("ckpt", big, chunk_size=8192)
    assert meta.type is ArtifactType.MODEL and meta.size_bytes == 3 << 20
    assert manager.use_artifact("ckpt").path.read_bytes() == big.read_bytes()
    with pytest.raises(InvalidArgumentError):
        manager.log_large_artifact("ckpt", big, chunk_size=0)


_RSS_CHILD = """
import os, sys
from repro_core import ArtifactManager, hash_file

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

root, big, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(big, "wb") as f:  # sparse, with a stamp every 16 MiB: unique content, no disk time
    f.truncate(size)
    for offset in range(0, size, 16 << 20):
        f.seek(offset)
        f.write(offset.to_bytes(8, "little") + os.urandom(8))
m = ArtifactManager()
m.init_run("rss", root=root)
m.log_artifact("warm-up", "model", data=b"w" * 4096)  # imports, SQLite, thread pools
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (peak RSS) to the current RSS
before = status("VmRSS")
meta = m.log_large_artifact("big", big)
peak = status("VmHWM")
m.finalize_run()
print(peak - before, meta.size_bytes, meta.hash == hash_file(big))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="needs Linux's /proc/self/clear_refs to reset the peak RSS")
def test_log_large_artifact_memory_stays_flat(tmp_path: Path) -> None:
    """Logging a 256 MiB file raises the process's peak RSS by about one 16 MiB copy buffer,
    not by the file's size (README: "flat memory", "peak RSS +16 MB")."""
    size = 256 << 20
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(tmp_path / "s"),
                          str(tmp_path / "big.bin"), str(size)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "REPRO_FSYNC": "none"})
    assert out.returncode == 0, out.stderr
    growth, logged, same = out.stdout.split()
    assert int(logged) == size and same == "True"
    assert int(growth) < size // 4, f"peak RSS grew by {int(growth) >> 20} MiB"


def test_threads_share_one_run(manager: ArtifactManager, run: object) -> None:
    """RLock, no deadlock: 8 threads log concurrently (the seed's original deadlocked)."""
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(10):
                manager.log_artifact(f"t{i}", "metrics", data={"j": j})
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(manager.list_artifacts()) == 80


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_reopens_registry(manager: ArtifactManager, run: object,
                               store_root: Path) -> None:
    manager.log_artifact("pre", "dataset", data=b"parent")
    pid = os.fork()
    if pid == 0:  # child: must open its own SQLite connection
        code = 0
        try:
            manager.log_artifact("child", "dataset", data=b"child")
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    manager.log_artifact("post", "dataset", data=b"parent again")
    names = {m.name for m in manager.list_artifacts()}
    assert names == {"pre", "child", "post"}
    assert verify_store(store_root).ok


@pytest.mark.sqlite_only("WAL is SQLite's journal mode")
def test_registry_schema_and_wal(manager: ArtifactManager, run: object,
                                 store_root: Path) -> None:
    manager.log_artifact("x", "dataset", data=b"x")
    reg = Registry(store_root / "registry.sqlite")
    assert reg._read("PRAGMA journal_mode")[0][0] == "wal"
    assert reg._read("SELECT version FROM schema_version")[0][0] == SCHEMA_VERSION
    assert reg.hash_algorithm() == "blake3"
    assert (store_root / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f59")
    reg.close()


@pytest.mark.sqlite_only("a v1 store was a SQLite file")
def test_v1_registry_is_migrated_in_place(tmp_path: Path) -> None:
    """A store written by the first release opens, keeps its rows and gains the new tables."""
    import sqlite3

    path = tmp_path / "registry.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    run_script(conn, _SCHEMA_V1)
    conn.execute("INSERT INTO schema_version VALUES (1)")
    conn.execute("INSERT INTO store_meta VALUES ('hash_algorithm', 'sha256')")
    conn.execute("INSERT INTO artifacts VALUES ('old', 'dataset', '2026-01-01')")
    conn.execute("COMMIT")
    conn.close()
    reg = Registry(path)
    assert reg._read("SELECT version FROM schema_version")[0][0] == SCHEMA_VERSION
    assert reg.hash_algorithm() == "sha256"
    assert reg._read("SELECT name FROM artifacts") == [("old",)]
    assert reg._read("SELECT COUNT(*) FROM metric_chunks") == [(0,)]
    reg.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    with pytest.raises(StorageError, match="newer than this repro"):
        Registry(path).integrity_check()


def test_dedup_still_links_the_logging_run(manager: ArtifactManager) -> None:
    """Run B logging content identical to latest gets no new version, but the registry still
    says B logged it (W&B links the artifact to both runs); re-logging what B used is no edge."""
    a = manager.init_run("a")
    manager.log_artifact("env", "environment", data={"python": "3.11"})
    manager.finalize_run()
    b = manager.init_run("b")
    same = manager.log_artifact("env", "environment", data={"python": "3.11"})
    used = manager.use_artifact("env")
    manager.log_artifact("env", "environment", data={"python": "3.11"})
    manager.finalize_run()
    assert a.id and b.id and same.version == "v1" and same.run_id == a.id
    assert manager.get_run(b.id)["outputs"] == ["default/env:v1"]
    assert manager.get_run(b.id)["inputs"] == []  # logged first, so reading it back is no input
    assert used.key == "default/env:v1"
    lineage = manager.get_lineage("env:v1")
    assert f"run:{b.id}" in lineage["ancestors"] and lineage["descendants"] == []


@pytest.mark.slow
@pytest.mark.parametrize(("tail", "state", "reason"), [
    ("pass", "completed", "finalize_run() was not called"),
    ("raise ValueError('boom')", "failed", "uncaught ValueError: boom"),
])
def test_open_run_is_finished_at_exit(tmp_path: Path, tail: str, state: str,
                                      reason: str) -> None:
    """A script that never calls finalize_run() does not leave its run RUNNING forever."""
    import subprocess
    import sys

    code = (
        "import sys\nfrom repro_core import ArtifactManager\n"
        "m = ArtifactManager(); r = m.init_run('forgot', root=sys.argv[1]); print(r.id)\n"
        "m.log_metrics({'loss': 1.0})\n" + tail + "\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s")],
                          capture_output=True, text=True)
    run_id = proc.stdout.split()[0]
    manager = ArtifactManager.reset_instance()
    manager.set_root(tmp_path / "s")
    stored = manager.get_run(run_id)
    assert stored["state"] == state and stored["ended_at"]
    assert reason in stored["states"][-1][2]
    assert manager.get_metrics(run_id)["loss"][0][1] == 1.0  # flushed before the state
    ArtifactManager.reset_instance()
