"""Tensor-level dedup: stored bytes, logging and loading time of N checkpoints, side by side.

    python benchmarks/dedup.py [--size-mb 1024] [--checkpoints 10] [--repeat 1]
                               [--load-repeat 5] [--wandb compute|run] [--dir DIR]
                               [--out FILE]

The model: a float32 state dict of ``--size-mb`` (default 1024 MiB) shaped like a small
transformer — an embedding, 8 blocks (qkv / proj / fc1 / fc2 weights and biases, two norms'
weights and biases: 12 tensors each), a final norm and a head: 100 tensors from a few KB to
~10 % of the bytes each. Fine-tuning only the last block: its 12 tensors (12 % of the tensors,
~10 % of the bytes) get a real in-place update (``t.add_(noise)``) before every checkpoint,
the other 90 % of the bytes are frozen. Every process builds the same tensors from the same
seed, so every mode logs byte-identical checkpoints (checked: the whole-file digests of (a)
and (b) must agree).

Rows, each in a fresh interpreter with its own store (``REPRO_HOME`` in a fresh temp dir
under ``--dir``, removed afterwards) and the default settings otherwise (``REPRO_FSYNC=full``:
every blob fsynced):

- anchors: ``safetensors.torch.save_file`` of the state dict to a new file per checkpoint, on
  the same disk, without and with ``os.fsync`` (file and directory) — repro fsyncs its blobs,
  a bare ``save_file`` does not, so "+ fsync" is the anchor of the same durability;
  ``safetensors.torch.load_file`` of the last one;
- (a) whole-file storage as before issue 14 (``REPRO_CHUNK_MIN_BYTES=off``):
  ``ArtifactManager().log_artifact("model", "checkpoint", data=state)`` per checkpoint;
- (b) tensor-level storage (``REPRO_CHUNK_MIN_BYTES`` unset: chunked from 32 MiB up), the same
  calls;
- (c) W&B offline ``wandb.Artifact`` + ``add_file`` + ``run.log_artifact``: W&B dedups whole
  files only, so it stores one full copy per distinct checkpoint. ``--wandb compute``
  (default) computes that (distinct whole-file digests of (a) x the size of the file
  ``save_file`` wrote); ``--wandb run`` runs it (``save_file`` then ``add_file``, which copies
  the file into W&B's staging dir; stored bytes = distinct files under W&B's dirs, the logged
  files themselves deleted after logging) — it writes each checkpoint twice, so it is slow at
  1 GB.

Logging time: one ``log_artifact`` (or ``save_file``) per checkpoint, with ``os.sync()``
(untimed) before each, so each starts with no dirty pages from the last; reported for the
first checkpoint (cold: nothing to dedup) and as the mean of the later ones. Every process
first logs (or saves) the full state dict once into a throw-away store (or file), untimed,
so no row pays for the first big write of a process. Stored bytes: the sizes of the distinct
files (inodes) under ``<store>/blobs`` (the registry's SQLite files are not counted).

Loading, in the (a) and (b) processes after their last checkpoint: ``load_artifact`` of it
with ``REPRO_VERIFY=full`` (default: every byte hashed) and ``size``, against
``safetensors.torch.load_file`` of the same tensors written by ``save_file`` (untimed) beside
the store. Both map the file (or the part blobs) lazily, so a bare call reads almost nothing:
the "load" columns therefore time the call **plus reading every tensor once** (``t.sum()``,
one torch thread), the same for every row; the call alone is printed below the table. Each
loader runs once untimed (warm page cache: nothing is dropped, which needs root; the tensors
are compared with the originals), then ``--load-repeat`` rounds of the three, interleaved so
that a busy machine slows them alike; medians, and the ratio to the ``load_file`` of the
same process.

Stored bytes are exact; times are the median over ``--repeat`` rounds (default 1: at 1 GB
and 10 checkpoints a round writes ~35 GB — 20 of them the two anchors' files — with at most
~13 GB on disk at once, and takes a few minutes on 2 cores; ``--checkpoints`` lowers both),
rows in an order rotated from round to round. Prints Markdown (also written to ``--out``),
with the command line. The temp dirs are removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

_MARK = "RESULT "
_BLOCKS = 8
_SEED = 1234
_LABELS = {
    "st": "`save_file` (anchor)",
    "st_fsync": "`save_file` + `os.fsync` (anchor)",
    "whole": "(a) repro whole-file (`REPRO_CHUNK_MIN_BYTES=off`)",
    "tensor": "**(b) repro tensor-level (default)**",
    "wandb": "(c) W&B offline `add_file`",
}


# -- the model ---------------------------------------------------------------------------------

def layout(size_bytes: int) -> list[tuple[str, tuple[int, ...], bool]]:
    """``(name, shape, trainable)`` of every tensor: 8 blocks of 12 d^2 floats (~10 % of the
    bytes each), an embedding and a head (~10 % each), biases and norms; the last block is
    trainable."""
    d = max(64, round(math.sqrt(0.8 * size_bytes / 4 / (12 * _BLOCKS)) / 64) * 64)
    vocab = max(64, round(0.1 * size_bytes / 4 / d))
    out: list[tuple[str, tuple[int, ...], bool]] = [("embed.weight", (vocab, d), False)]
    for b in range(_BLOCKS):
        train = b == _BLOCKS - 1
        for name, rows, cols in (("attn.qkv", 3 * d, d), ("attn.proj", d, d),
                                 ("mlp.fc1", 4 * d, d), ("mlp.fc2", d, 4 * d)):
            out.append((f"blocks.{b}.{name}.weight", (rows, cols), train))
            out.append((f"blocks.{b}.{name}.bias", (rows,), train))
        for norm in ("norm1", "norm2"):
            out.append((f"blocks.{b}.{norm}.weight", (d,), train))
            out.append((f"blocks.{b}.{norm}.bias", (d,), train))
    out += [("norm.weight", (d,), False), ("norm.bias", (d,), False),
            ("head.weight", (vocab, d), False)]
    return out


def build_state(size_bytes: int) -> tuple[dict[str, Any], list[str]]:
    import torch

    gen = torch.Generator().manual_seed(_SEED)
    state, trainable = {}, []
    for name, shape, train in layout(size_bytes):
        state[name] = torch.empty(shape).uniform_(-0.05, 0.05, generator=gen)
        if train:
            trainable.append(name)
    return state, trainable


def train_step(state: dict[str, Any], trainable: list[str], k: int) -> None:
    """What an optimizer step does to the trainable tensors: an in-place update."""
    import torch

    gen = torch.Generator().manual_seed(_SEED + 1 + k)
    with torch.no_grad():
        for name in trainable:
            state[name].add_(torch.randn(state[name].shape, generator=gen), alpha=1e-3)


def _nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# -- measuring -----------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    for target in (path, path.parent):
        fd = os.open(target, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def distinct_bytes(*roots: Path, skip_suffix: str | None = None) -> int:
    """Sizes of the distinct files (inodes) under ``roots``."""
    seen: dict[tuple[int, int], int] = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for name in files:
                if skip_suffix and name.endswith(skip_suffix):
                    continue
                st = os.lstat(os.path.join(dirpath, name))
                seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def _touch(tensors: dict[str, Any]) -> None:
    """Read every byte of every tensor once (a lazily mapped file is read here)."""
    for tensor in tensors.values():
        tensor.sum()


def _timed_loads(loaders: dict[str, Any], repeat: int, expected: dict[str, Any]
                 ) -> dict[str, dict[str, float]]:
    """Each loader once, untimed (warm cache; the tensors checked), then ``repeat`` rounds of
    each, interleaved (a busy machine slows them alike): the call alone and the call +
    reading every tensor; medians."""
    import torch

    for name, load in loaders.items():
        first = load()
        _touch(first)
        bad = [n for n in expected if n not in first or not torch.equal(first[n], expected[n])]
        if bad or len(first) != len(expected):
            raise SystemExit(f"{name}: loaded tensors differ from the originals: {bad[:5]}")
        del first
    calls: dict[str, list[float]] = {name: [] for name in loaders}
    reads: dict[str, list[float]] = {name: [] for name in loaders}
    names = list(loaders)
    for i in range(repeat):
        for name in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            tensors = loaders[name]()
            calls[name].append(time.perf_counter() - start)
            _touch(tensors)
            reads[name].append(time.perf_counter() - start)
            del tensors
    return {name: {"call": statistics.median(calls[name]), "read": statistics.median(reads[name])}
            for name in loaders}


def _worker_anchor(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    state, trainable = build_state(args.size_bytes)
    save_file(state, str(scratch / "warmup.safetensors"))  # untimed: the first big write
    os.unlink(scratch / "warmup.safetensors")
    times: dict[str, list[float]] = {"st": [], "st_fsync": []}
    last: dict[str, Path] = {}
    for k in range(args.checkpoints):
        train_step(state, trainable, k)
        for kind in ("st", "st_fsync"):
            path = scratch / f"{kind}-{k}.safetensors"
            os.sync()
            start = time.perf_counter()
            save_file(state, str(path))
            if kind == "st_fsync":
                _fsync(path)
            times[kind].append(time.perf_counter() - start)
            if kind in last:  # keep only the last file of each kind (disk)
                last[kind].unlink()
            last[kind] = path
    file_size = last["st"].stat().st_size
    return {"times": times, "file_size": file_size,
            "nbytes": _nbytes(state), "tensors": len(state), "trainable": len(trainable),
            "trainable_bytes": _nbytes({n: state[n] for n in trainable})}


def _worker_repro(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    from safetensors.torch import load_file, save_file

    from repro_core import ArtifactManager, constants

    state, trainable = build_state(args.size_bytes)
    warm = ArtifactManager.reset_instance()  # untimed: the same checkpoint, another store
    warm.init_run("bench-dedup-warmup", project="bench", root=scratch / "warmup-store")
    warm.log_artifact("model", "checkpoint", data=state)
    warm.finalize_run()
    ArtifactManager.reset_instance()
    shutil.rmtree(scratch / "warmup-store")
    store = Path(os.environ["REPRO_HOME"])
    manager = ArtifactManager.reset_instance()
    manager.init_run("bench-dedup", project="bench")
    times, digests, stored_after = [], [], []
    meta = None
    for k in range(args.checkpoints):
        train_step(state, trainable, k)
        os.sync()
        start = time.perf_counter()
        meta = manager.log_artifact("model", "checkpoint", data=state)
        times.append(time.perf_counter() - start)
        digests.append(meta.hash)
        stored_after.append(distinct_bytes(store / "blobs"))
    assert meta is not None
    manager.finalize_run()
    logical = meta.size_bytes
    reference = scratch / "reference.safetensors"  # the anchor of the loads, same disk
    save_file(state, str(reference))
    reader = ArtifactManager.reset_instance()  # no run: nothing recorded

    def load_artifact(verify: str) -> Any:
        os.environ["REPRO_VERIFY"] = verify
        constants.reload()  # (microseconds)
        return reader.load_artifact(meta.key)

    loads = _timed_loads({"load_file": lambda: load_file(str(reference)),
                          "full": lambda: load_artifact("full"),
                          "size": lambda: load_artifact("size")}, args.load_repeat, state)
    os.environ.pop("REPRO_VERIFY")
    constants.reload()
    return {"times": times, "digests": digests, "stored": stored_after[-1],
            "stored_after": stored_after, "logical": logical, "load": loads,
            "blob_files": sum(len(f) for _, _, f in os.walk(store / "blobs"))}


def _worker_wandb(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    import wandb
    from safetensors.torch import save_file

    state, trainable = build_state(args.size_bytes)
    run = wandb.init(mode="offline", dir=str(scratch), project="bench-dedup")
    warm = scratch / "warmup.safetensors"  # untimed: the first big write and artifact
    save_file(state, str(warm))
    artifact = wandb.Artifact("warmup", type="model")
    artifact.add_file(str(warm))
    run.log_artifact(artifact)
    os.unlink(warm)
    before = distinct_bytes(scratch, skip_suffix=".safetensors")
    times = []
    for k in range(args.checkpoints):
        train_step(state, trainable, k)
        path = scratch / f"model-{k}.safetensors"
        os.sync()
        start = time.perf_counter()
        save_file(state, str(path))
        artifact = wandb.Artifact("model", type="model")
        artifact.add_file(str(path))
        run.log_artifact(artifact)
        times.append(time.perf_counter() - start)
        path.unlink()  # W&B keeps its own copy; the user's file is not counted
    start = time.perf_counter()
    run.finish()
    finish = time.perf_counter() - start
    stored = distinct_bytes(scratch, skip_suffix=".safetensors") - before
    return {"times": times, "stored": stored, "finish": finish, "version": wandb.__version__}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(1)  # t.sum() in the loads: no straggling OpenMP thread on 2 cores
    scratch = Path(args.scratch)
    kind = args.worker
    if kind == "anchor":
        result = _worker_anchor(args, scratch)
    elif kind == "wandb":
        result = _worker_wandb(args, scratch)
    else:
        result = _worker_repro(args, scratch)
    print(_MARK + json.dumps(result), flush=True)


# -- the driver ------------------------------------------------------------------------------------

def _spawn(kind: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from _measure import run_worker

    scratch = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=work))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("REPRO_", "WANDB_"))}  # the defaults, except:
    env.update({"REPRO_HOME": str(scratch / "store"), "REPRO_PROGRESS": "0",
                "PYTHONWARNINGS": "ignore"})
    if kind == "whole":
        env["REPRO_CHUNK_MIN_BYTES"] = "off"
    if kind == "wandb":
        env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(scratch),
                    "WANDB_CACHE_DIR": str(scratch / "wandb-cache"),
                    "WANDB_DATA_DIR": str(scratch / "wandb-data"),
                    "WANDB_CONFIG_DIR": str(scratch / "wandb-config")})
    cmd = [sys.executable, __file__, "--worker", kind, "--scratch", str(scratch),
           "--size-mb", str(args.size_mb), "--checkpoints", str(args.checkpoints),
           "--load-repeat", str(args.load_repeat)]
    try:
        return run_worker(cmd, env, scratch, _MARK, f"{kind} worker")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _med(values: list[float]) -> float:
    return statistics.median(values)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def _fs_of(path: Path) -> str:
    """``device (fstype) mounted at``, from /proc/mounts (best effort)."""
    best = ("?", "?", "")
    try:
        real = str(path.resolve())
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) \
                        and len(mnt) > len(best[2]):
                    best = (dev, fstype, mnt)
    except OSError:
        pass
    return f"{best[0]} ({best[1]}) on {best[2] or '?'}"


def report(rounds: list[dict[str, dict[str, Any]]], args: argparse.Namespace, work: Path,
           command: str) -> str:
    anchor = [r["anchor"] for r in rounds]
    whole = [r["whole"] for r in rounds]
    tensor = [r["tensor"] for r in rounds]
    runs_wandb = [r["wandb"] for r in rounds if "wandb" in r]
    a0 = anchor[0]
    one = tensor[0]["logical"]
    n = args.checkpoints

    def first_later(results: list[dict[str, Any]], key: str | None = None
                    ) -> tuple[float, float, float]:
        series = [r["times"][key] if key else r["times"] for r in results]
        return (_med([s[0] for s in series]), _med([statistics.fmean(s[1:]) for s in series]),
                _med([statistics.fmean(s) for s in series]))

    st = first_later(anchor, "st")
    st_fsync = first_later(anchor, "st_fsync")
    load_file_read = _med([r["load"]["load_file"]["read"] for r in whole + tensor])
    load_file_call = _med([r["load"]["load_file"]["call"] for r in whole + tensor])

    def load(results: list[dict[str, Any]], verify: str, what: str = "read"
             ) -> tuple[float, float]:
        """Median seconds, and median ratio to the ``load_file`` timed beside it."""
        return (_med([r["load"][verify][what] for r in results]),
                _med([r["load"][verify][what] / r["load"]["load_file"][what] for r in results]))

    import safetensors
    import torch

    lines = [
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"safetensors {safetensors.__version__}, {time.strftime('%Y-%m-%d')}; "
        f"temp stores under {work.parent} on {_fs_of(work)}",
        "",
        f"Command: `{command}`",
        "",
        f"Model: {a0['tensors']} float32 tensors, {_mb(a0['nbytes'])} "
        f"({a0['nbytes'] / 2**20:,.0f} MiB); {a0['trainable']} trainable (the last block, "
        f"{100 * a0['trainable_bytes'] / a0['nbytes']:.1f} % of the bytes) updated in place "
        f"before each of {n} checkpoints, the rest frozen. One checkpoint = {_mb(one)} "
        f"({one:,} bytes as logged; `save_file` writes {a0['file_size']:,}). "
        f"Median of {len(rounds)} round(s); times in seconds.",
        "",
        "| mode | stored bytes | / one checkpoint | log s, first (cold) | log s, later (mean) "
        "| first / save_file | later / save_file | later / save_file+fsync "
        "| load s, verify=full | load s, verify=size | full / load_file | size / load_file |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, times in (("st", st), ("st_fsync", st_fsync)):
        bare = f"{load_file_read:.3f} (`load_file`)" if key == "st" else "—"
        lines.append(f"| {_LABELS[key]} | {_mb(a0['file_size'])} per file | — | {times[0]:.3f} "
                     f"| {times[1]:.3f} | {times[0] / st[2]:.2f}x | {times[1] / st[2]:.2f}x "
                     f"| {times[1] / st_fsync[2]:.2f}x | {bare} | {bare} "
                     f"| {'1.00x' if key == 'st' else '—'} | {'1.00x' if key == 'st' else '—'} |")
    for key, results in (("whole", whole), ("tensor", tensor)):
        times = first_later(results)
        stored = results[0]["stored"]
        full, full_ratio = load(results, "full")
        size, size_ratio = load(results, "size")
        lines.append(f"| {_LABELS[key]} | {_mb(stored)} | {stored / one:.2f}x | {times[0]:.3f} "
                     f"| {times[1]:.3f} | {times[0] / st[2]:.2f}x | {times[1] / st[2]:.2f}x "
                     f"| {times[1] / st_fsync[2]:.2f}x | {full:.3f} | {size:.3f} "
                     f"| {full_ratio:.2f}x | {size_ratio:.2f}x |")
    distinct = len(set(whole[0]["digests"]))
    if runs_wandb:
        times = first_later(runs_wandb)
        stored = runs_wandb[0]["stored"]
        how = (f"run: wandb {runs_wandb[0]['version']}, `save_file` + `add_file` + "
               f"`log_artifact` per checkpoint; `finish()` "
               f"{_med([r['finish'] for r in runs_wandb]):.2f} s more")
        lines.append(f"| {_LABELS['wandb']} ({how}) | {_mb(stored)} | {stored / one:.2f}x "
                     f"| {times[0]:.3f} | {times[1]:.3f} | {times[0] / st[2]:.2f}x "
                     f"| {times[1] / st[2]:.2f}x | {times[1] / st_fsync[2]:.2f}x | — | — | — "
                     "| — |")
    else:
        stored = distinct * a0["file_size"]
        lines.append(f"| {_LABELS['wandb']} (computed: {distinct} distinct files x "
                     f"{a0['file_size']:,} bytes; not run) | {_mb(stored)} "
                     f"| {stored / one:.2f}x | — | — | — | — | — | — | — | — | — |")

    t_first, t_later, _ = first_later(tensor)
    stored_ratio = tensor[0]["stored"] / one
    load_full = load(tensor, "full")[1]
    load_size = load(tensor, "size")[1]
    after = tensor[0]["stored_after"]
    new_later = statistics.fmean(b - a for a, b in itertools.pairwise(after)) if n > 1 else 0.0

    def verdict(value: float, target: float) -> str:
        return f"{value:.2f}x (target ≤ {target}: {'met' if value <= target else 'NOT met'})"

    same = whole[0]["digests"] == tensor[0]["digests"]
    lines += [
        "",
        "Targets, (b) tensor-level:",
        f"- stored / one checkpoint: {verdict(stored_ratio, 2)}; new bytes per later "
        f"checkpoint {_mb(new_later)} ({100 * new_later / one:.1f} % of one); "
        f"{tensor[0]['blob_files']} blob files",
        f"- logging, later checkpoints / bare `save_file`: {verdict(t_later / st[2], 1.15)}; "
        f"/ `save_file` + fsync: {t_later / st_fsync[2]:.2f}x",
        f"- logging, first (cold) checkpoint / bare `save_file`: "
        f"{verdict(t_first / st[2], 1.15)}; / `save_file` + fsync: "
        f"{t_first / st_fsync[2]:.2f}x",
        f"- logging, all {n} / {n} bare `save_file`: "
        f"{verdict(statistics.fmean([t_first] + [t_later] * (n - 1)) / st[2], 1.15)}",
        f"- `load_artifact` + read / `load_file` + read: verify=full {verdict(load_full, 1.2)}; "
        f"verify=size {verdict(load_size, 1.2)}",
        "",
        "Load, the call alone (tensors mapped lazily, nothing read yet): "
        f"`load_file` {load_file_call * 1e3:.2f} ms; "
        + "; ".join(f"{label} verify=full {load(res, 'full', 'call')[0] * 1e3:.1f} ms "
                    f"({load(res, 'full', 'call')[1]:.1f}x), verify=size "
                    f"{load(res, 'size', 'call')[0] * 1e3:.1f} ms "
                    f"({load(res, 'size', 'call')[1]:.1f}x)"
                    for label, res in (("(a)", whole), ("(b)", tensor))),
        "",
        "Per checkpoint, round 1, log s: "
        + "; ".join(f"{label} " + ", ".join(f"{t:.2f}" for t in res[0]["times"])
                    for label, res in (("(a)", whole), ("(b)", tensor)))
        + "; save_file " + ", ".join(f"{t:.2f}" for t in anchor[0]["times"]["st"])
        + "; save_file+fsync " + ", ".join(f"{t:.2f}" for t in anchor[0]["times"]["st_fsync"]),
        "",
        f"Whole-file digests of (a) and (b) identical for all {n} checkpoints: "
        f"{'yes' if same else 'NO'}; {distinct} distinct; loaded tensors equal the "
        "originals: yes (checked on every row's first load).",
        "",
        "Notes: repro fsyncs every blob (REPRO_FSYNC=full, the default) and a bare `save_file` "
        "does not: compare with the `save_file + os.fsync` row for the same durability. "
        "`os.sync()` (untimed) before each timed save; page cache warm (a full-size untimed "
        "warm-up in every process, an untimed load before the timed ones; nothing dropped). "
        "Load columns: the call + `t.sum()` over every tensor (both sides map lazily). "
        "Stored bytes: distinct files under `<store>/blobs`.",
    ]
    if one < 32 << 20:
        lines.append(f"\nWARNING: one checkpoint ({_mb(one)}) is under the default "
                     "REPRO_CHUNK_MIN_BYTES (32 MiB): (b) stored it whole.")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _existing_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing directory")
    return path


def main() -> None:
    parser = _Parser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024.0,
                        help="model size in MiB (default 1024)")
    parser.add_argument("--checkpoints", type=int, default=10, help="checkpoints (default 10)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds, fresh processes each; the median is reported (default 1)")
    parser.add_argument("--load-repeat", type=int, default=5,
                        help="timed loads per loader, after an untimed one (median; default 5)")
    parser.add_argument("--wandb", choices=["compute", "run"], default="compute",
                        help="W&B row: computed (default) or measured with wandb offline")
    parser.add_argument("--dir", type=_existing_dir, default=None,
                        help="an existing directory on the disk to measure (default: the "
                             "system temp dir)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.size_mb <= 0 or args.checkpoints < 2 or args.repeat < 1 or args.load_repeat < 1:
        parser.error("--size-mb must be > 0, --checkpoints >= 2, --repeat and --load-repeat "
                     ">= 1")
    args.size_bytes = int(args.size_mb * 2**20)
    if args.worker:
        worker(args)
        return
    command = shlex.join(["python", *sys.argv])
    base = args.dir or Path(tempfile.gettempdir())
    need = args.size_bytes * (args.checkpoints + 3) * (2 if args.wandb == "run" else 1)
    free = shutil.disk_usage(base).free
    if free < need * 1.1:
        sys.exit(f"{base} has {free / 1e9:.1f} GB free; this run needs about {need / 1e9:.1f} "
                 "GB (fewer --checkpoints, a smaller --size-mb, or another --dir)")
    if args.wandb == "run":
        try:
            import wandb  # noqa: F401
        except ModuleNotFoundError:
            sys.exit("--wandb run needs wandb (pip install 'repro-lightning[wandb]')")
    kinds = ["anchor", "whole", "tensor"] + (["wandb"] if args.wandb == "run" else [])
    work = Path(tempfile.mkdtemp(prefix="repro-bench-dedup-", dir=base))
    try:
        rounds = []
        for i in range(args.repeat):
            order = kinds[i % len(kinds):] + kinds[:i % len(kinds)]
            result = {}
            for kind in order:
                start = time.perf_counter()
                result[kind] = _spawn(kind, args, work)
                print(f"round {i + 1}/{args.repeat}: {kind} done in "
                      f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
            rounds.append(result)
        try:
            text = report(rounds, args, work, command)
        except Exception:
            print("raw results: " + json.dumps(rounds), file=sys.stderr)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
