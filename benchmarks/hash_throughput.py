"""Hashing and log_large_artifact throughput, side by side with the anchors, in one run.

    python benchmarks/hash_throughput.py --size 4GB [--dir /path/on/target/disk] [--repeat 3]

Anchors: hashlib sha256 in 8 KiB chunks (the seed's method), md5 (W&B / DVC), ``dd`` to
/dev/null (read bound; ``cat`` may splice without reading), ``cp`` of the same file (copy
bound; ``cp`` does not fsync) and ``cp`` + ``sync`` of the copy (what a durable copy costs).
``log_large_artifact`` runs in a child process with ``REPRO_FSYNC=full`` (default) and ``none``;
its peak RSS growth is measured there. The source file is read once first so every row reads
from the page cache. Prints a Markdown table (best of ``--repeat``); ratios are against ``cp``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

_UNITS = {"KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    upper = text.strip().upper().removesuffix("IB").removesuffix("B") + "B"
    for suffix in ("KB", "MB", "GB"):
        if upper.endswith(suffix):
            return int(float(upper[: -len(suffix)]) * _UNITS[suffix])
    return int(upper[:-1])


def make_file(path: Path, size: int) -> None:
    block = os.urandom(16 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)


def hashlib_chunks(path: Path, algo: str, chunk: int) -> None:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while data := f.read(chunk):
            h.update(data)


def best_of(repeat: int, fn: Callable[[], None], cleanup: Callable[[], None] | None = None
            ) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if cleanup:
            cleanup()
    return min(times)


_CHILD = r"""
import json, sys, threading, time
from pathlib import Path
import psutil
from repro_core import ArtifactManager
src, root = Path(sys.argv[1]), Path(sys.argv[2])
m = ArtifactManager(); m.init_run("bench", root=root)
proc, peak, done = psutil.Process(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.002)
base = proc.memory_info().rss
sampler = threading.Thread(target=sample); sampler.start()
t = time.perf_counter(); m.log_large_artifact("big", src); dt = time.perf_counter() - t
done.set(); sampler.join()
m.finalize_run()
print(json.dumps({"seconds": dt, "rss_growth_mb": (peak[0] - base) / 2**20}))
"""


def log_large(src: Path, work: Path, fsync: str) -> dict[str, float]:
    root = work / f"store-{fsync}"
    env = {**os.environ, "REPRO_FSYNC": fsync}
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(root)], env=env,
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(root, ignore_errors=True)


def existing_dir(text: str) -> Path:
    """``--dir`` must name an existing directory: argparse then prints one usage line and
    exits 2, instead of ``tempfile.mkdtemp`` failing with a traceback."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not an existing directory")
    return path


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one line and exit 2, as in the ``repro`` CLI (``-h`` has the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def main() -> None:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4GB")
    parser.add_argument("--dir", type=existing_dir, default=None,
                        help="an existing directory on the disk to measure")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="repro-bench-", dir=args.dir))
    src = work / "src.bin"
    try:
        make_file(src, size)
        run_all(src, work, size, args.repeat)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_all(src: Path, work: Path, size: int, repeat: int) -> None:
    from repro_core.hashing import hash_file

    subprocess.run(["cat", str(src)], stdout=subprocess.DEVNULL, check=True)  # warm the cache
    dst = work / "copy.bin"
    rows: list[tuple[str, float, str]] = []

    def rm_dst() -> None:
        dst.unlink(missing_ok=True)

    cp = best_of(repeat, lambda: subprocess.run(["cp", str(src), str(dst)], check=True), rm_dst)
    rows.append(("`cp` (copy, no fsync)", cp, ""))
    cp_sync = best_of(repeat, lambda: subprocess.run(
        f"cp '{src}' '{dst}' && sync '{dst}'", shell=True, check=True), rm_dst)
    rows.append(("`cp` + `sync` of the copy (durable copy)", cp_sync, ""))
    read = ["dd", f"if={src}", "of=/dev/null", "bs=16M", "status=none"]
    rows.append(("`dd bs=16M` > /dev/null (read bound)",
                 best_of(repeat, lambda: subprocess.run(read, check=True)), ""))
    rows.append(("repro hash (blake3, mmap, all cores)",
                 best_of(repeat, lambda: hash_file(src)), ""))
    rows.append(("repro hash (sha256, 16 MiB reads)",
                 best_of(repeat, lambda: hash_file(src, "sha256")), ""))
    rows.append(("seed: sha256, 8 KiB chunks",
                 best_of(repeat, lambda: hashlib_chunks(src, "sha256", 8192)), ""))
    rows.append(("md5, 1 MiB chunks (W&B/DVC)",
                 best_of(repeat, lambda: hashlib_chunks(src, "md5", 1 << 20)), ""))
    for fsync in ("none", "full"):
        results = [log_large(src, work, fsync) for _ in range(repeat)]
        best = min(results, key=lambda r: r["seconds"])
        rss = max(r["rss_growth_mb"] for r in results)
        rows.append((f"log_large_artifact, REPRO_FSYNC={fsync}", best["seconds"],
                     f"peak RSS +{rss:.0f} MB"))
    print_table(rows, size, cp)


def print_table(rows: list[tuple[str, float, str]], size: int, cp: float) -> None:
    gb = size / 1e9
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"file {size / (1 << 30):.2f} GiB, Python {platform.python_version()}\n")
    print("| operation | seconds | GB/s | time vs `cp` | note |")
    print("|---|---:|---:|---:|---|")
    for name, seconds, note in rows:
        print(f"| {name} | {seconds:.2f} | {gb / seconds:.2f} | {seconds / cp:.2f}x | {note} |")


if __name__ == "__main__":
    main()
