"""FsspecStorageBackend upload/download rate to moto S3 on loopback, beside s3fs, boto3, W&B.

    python benchmarks/remote_throughput.py [--size 1GB] [--repeats 3] [--methods ...]
                                           [--quick] [--json]

``repro push`` / ``repro pull`` stand on the layer measured here:
``FsspecStorageBackend(s3://bucket/prefix).upload(file, digest)`` (one ``HeadObject`` to skip
a blob already there, then the file hashed while it streams up and published only when the
digest matches: a multipart upload of 16 MiB parts, 4 in flight, its defaults, or one
``PutObject`` when the file fits one part; a ``HeadObject`` after, to check what was
published) and ``.download(digest, target)`` (one ``HeadObject``, then one ``GetObject``
streamed in 8 MiB reads, hashed while written to a temp file beside the target, renamed when
the digest matches). The same file (``--size`` of random bytes, written once, untimed; its
digest computed once, untimed) against:

- **s3fs** ``put_file`` / ``get_file`` (``S3FileSystem`` defaults: up to 10 parts or ranges in
  flight at once), with repro's part size for the put (``chunksize=16 MiB``) and its read size
  for the get (``chunksize=8 MiB``) (``aws s3 cp`` equivalent);
- **boto3** ``upload_file`` / ``download_file`` with the default ``TransferConfig`` (8 MiB parts
  and ranges, 10 threads);
- **W&B offline** ``wandb.Artifact`` + ``add_file`` + ``run.log_artifact``, timed from making
  the artifact to the end of ``run.finish()`` (which waits for it); ``wandb.init`` is not
  timed. ``WANDB_MODE=offline``, ``WANDB_DIR`` / ``WANDB_DATA_DIR`` / ``WANDB_CACHE_DIR`` in a
  temp dir. W&B offline cannot download, so it has no download row.
- optionally (``--methods``, not by default) **s3fs1**: s3fs with ``max_concurrency=1``, i.e.
  one part or range in flight.

The S3 server is moto's ``ThreadedMotoServer`` on 127.0.0.1, in a **subprocess** of its own
(its CPU is not the client's; the table gives both). One bucket; every transfer writes a fresh
key, and each worker deletes what it wrote (and aborts any multipart upload) before it exits.
moto keeps each object in a temp file (in memory up to 5 MB) but *every* GET, ranged or not,
reads the whole object into the server's memory before slicing out the range: the download
rate of a big object on moto falls with the number of ranges, and the server's peak memory is
about (ranges in flight) x size. Real S3 does neither, so read the download rows as "on moto"
(repro's one streamed GET is spared that; s3fs's and boto3's ranged GETs are not).

Each round runs every method once, in an order rotated from round to round, each in a fresh
interpreter that first does the same transfer with a 1 MiB file, untimed (imports, the
connection pool, the bucket check). Before each timed transfer it syncs dirty pages (untimed)
and resets the peak RSS of itself and of the server (``VmHWM`` via ``/proc/PID/clear_refs``,
Linux); the source file is in the page cache (all methods alike) and no method fsyncs the
download. Reported per method: the median seconds and MB/s (1 MB = 10^6 bytes) over rounds,
each round's time, the CPU seconds of the client (every thread, plus children: W&B's service)
and of the server, the number of S3 requests (botocore ``before-send`` events; 0 for W&B), and
the peak RSS growth of the client process (not W&B's service) and of the server. Then repro's
upload rate over s3fs put's and boto3 upload's, and its download rate over s3fs get's and
boto3 download's, median and round by round, and whether the target is met:
repro upload >= 0.8x the raw s3fs put.

Prints Markdown tables (``--json``: one JSON document instead). ``--quick``: 32 MB, one round.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
from _measure import cpu_seconds

_MARK = "RESULT "
_TARGET = 0.8
_MIB = 1024 * 1024
_WARMUP = _MIB
_METHODS = {"repro": "**repro `FsspecStorageBackend`**",
            "s3fs": "s3fs `put_file` / `get_file`",
            "boto3": "boto3 `upload_file` / `download_file`",
            "wandb": "W&B offline `log_artifact`",
            "s3fs1": "s3fs, `max_concurrency=1`"}
_DEFAULT_METHODS = ["repro", "s3fs", "boto3", "wandb"]
_NO_DOWNLOAD = {"wandb"}
# Server memory: size x (ranges moto materializes at once: 10 in flight, + the object being
# completed from its parts) + the client's file and download in the page cache.
_MEMORY_FACTOR = 14
_DISK_FACTOR = 6  # the file, a download, W&B's staged copy, moto's parts + object + slack
_AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}
_AWS_DROP = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
             "AWS_SHARED_CREDENTIALS_FILE")


# -- the moto server (its own process) ------------------------------------------------------

def _serve() -> None:
    """Run moto on 127.0.0.1 (a free port), print it, serve until stdin closes."""
    import logging
    import threading

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(60)
    if starter.is_alive():
        sys.exit("the moto S3 server did not start within 60 s")
    print(f"PORT {server.get_host_and_port()[1]}", flush=True)
    sys.stdin.read()
    server.stop()


def _start_server(scratch: Path) -> tuple[subprocess.Popen[str], str]:
    tmp = scratch / "moto-tmp"  # moto's temp files (objects over 5 MB) go here
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)})
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 90)
    line = proc.stdout.readline() if ready else ""
    if not line.startswith("PORT "):
        _stop_server(proc)
        sys.exit(f"the moto server did not start (got {line!r})")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}"


def _stop_server(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(Exception):
        assert proc.stdin is not None
        proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _client() -> Any:
    import boto3

    return boto3.client("s3")  # endpoint and credentials from the AWS_* environment


def _empty(client: Any, bucket: str, prefix: str = "") -> None:
    """Delete every object under ``prefix`` and abort its multipart uploads."""
    for upload in client.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", []):
        client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"],
                                      UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=obj["Key"])


# -- measuring inside a worker --------------------------------------------------------------

def _status_mb(pid: int | str, field: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return float("nan")


def _reset_peak(pid: int | str) -> float:
    """VmHWM := VmRSS (Linux); returns VmRSS, or NaN where the peak cannot be reset."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return float("nan")
    return _status_mb(pid, "VmRSS")


class _Requests:
    """Counts the S3 requests botocore sends (any client: boto3's or s3fs's aiobotocore)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def watch(self, client: Any) -> None:
        client.meta.events.register("before-send.s3", self._count)

    def _count(self, event_name: str = "", **_: Any) -> None:
        op = event_name.rsplit(".", 1)[-1]
        self.counts[op] = self.counts.get(op, 0) + 1

    def take(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


class _Meter:
    """Wall time, CPU (client and server), peak RSS growth (client and server), requests."""

    def __init__(self, server_pid: int, requests: _Requests) -> None:
        self.server = psutil.Process(server_pid)
        self.requests = requests

    def __enter__(self) -> _Meter:
        os.sync()
        self.requests.take()
        self.rss0 = _reset_peak("self")
        self.srv_rss0 = _reset_peak(self.server.pid)
        self.cpu0, self.srv_cpu0 = cpu_seconds(), sum(self.server.cpu_times()[:2])
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.result = {
            "seconds": time.perf_counter() - self.start,
            "cpu": cpu_seconds() - self.cpu0,
            "server_cpu": sum(self.server.cpu_times()[:2]) - self.srv_cpu0,
            "peak_mb": _status_mb("self", "VmHWM") - self.rss0,
            "server_peak_mb": _status_mb(self.server.pid, "VmHWM") - self.srv_rss0,
            "requests": self.requests.take()}


# -- the methods: (warm-up, then timed) upload and download of one file --------------------

class _Repro:
    def __init__(self, bucket: str, prefix: str, requests: _Requests) -> None:
        from repro_core.store import FsspecStorageBackend

        self.backend = FsspecStorageBackend(f"s3://{bucket}/{prefix}")
        requests.watch(self.backend._fs().s3)

    def upload(self, path: Path, digest: str) -> str:
        self.backend.upload(path, digest)
        return self.backend.blob_key(digest).split("/", 1)[1]

    def download(self, key: str, digest: str, target: Path) -> None:
        self.backend.download(digest, target)


class _S3fs:
    def __init__(self, bucket: str, prefix: str, requests: _Requests,
                 concurrency: int | None = None) -> None:
        import s3fs

        from repro_core import constants
        from repro_core.store.fsspec_backend import DEFAULT_BLOCK_SIZE

        self.fs = s3fs.S3FileSystem(max_concurrency=concurrency or 10, skip_instance_cache=True)
        self.put_chunk, self.get_chunk = DEFAULT_BLOCK_SIZE, constants.REMOTE_READ_CHUNK
        self.bucket, self.prefix = bucket, prefix
        requests.watch(self.fs.s3)

    def upload(self, path: Path, digest: str) -> str:
        key = f"{self.prefix}/{path.name}"
        self.fs.put_file(str(path), f"{self.bucket}/{key}", chunksize=self.put_chunk)
        return key

    def download(self, key: str, digest: str, target: Path) -> None:
        self.fs.get_file(f"{self.bucket}/{key}", str(target), chunksize=self.get_chunk)


class _Boto3:
    def __init__(self, bucket: str, prefix: str, requests: _Requests) -> None:
        self.client, self.bucket, self.prefix = _client(), bucket, prefix
        requests.watch(self.client)

    def upload(self, path: Path, digest: str) -> str:
        key = f"{self.prefix}/{path.name}"
        self.client.upload_file(str(path), self.bucket, key)
        return key

    def download(self, key: str, digest: str, target: Path) -> None:
        self.client.download_file(self.bucket, key, str(target))


class _Wandb:
    """``log_artifact`` into an offline run; the run is started untimed (``wandb.init``)."""

    def __init__(self, bucket: str, prefix: str, requests: _Requests) -> None:
        import wandb

        self.wandb, self.run, self.n = wandb, None, 0
        self.start_run()

    def start_run(self) -> None:
        self.run = self.wandb.init(project="bench", dir=os.environ["WANDB_DIR"])

    def upload(self, path: Path, digest: str) -> str:
        self.n += 1
        artifact = self.wandb.Artifact(f"blob-{self.n}", type="bench")
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)
        self.run.finish()  # waits for the artifact
        return ""


def _make(method: str, bucket: str, prefix: str, requests: _Requests) -> Any:
    if method == "s3fs1":
        return _S3fs(bucket, prefix, requests, concurrency=1)
    kinds = {"repro": _Repro, "s3fs": _S3fs, "boto3": _Boto3, "wandb": _Wandb}
    return kinds[method](bucket, prefix, requests)


def _same(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(16 * _MIB), fb.read(16 * _MIB)
            if x != y:
                return False
            if not x:
                return True


def _check_remote(client: Any, bucket: str, key: str, size: int) -> None:
    if key:
        got = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
        assert got == size, f"{key}: {got} bytes on the server, not {size}"


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    from repro_core.hashing import hash_file

    spec = json.loads(args.spec)
    source, scratch = Path(spec["file"]), Path(spec["scratch"])
    bucket, prefix = spec["bucket"], f"{spec['prefix']}-{uuid.uuid4().hex[:8]}"
    requests, client = _Requests(), _client()
    small = scratch / "warmup.bin"
    small.write_bytes(os.urandom(_WARMUP))
    method = _make(args.worker, bucket, prefix, requests)
    try:  # warm-up: the same transfer with 1 MiB, untimed
        key = method.upload(small, hash_file(small))
        if args.worker in _NO_DOWNLOAD:
            method.start_run()
        else:
            method.download(key, hash_file(small), scratch / "warmup.back")
        with _Meter(spec["server_pid"], requests) as up:
            key = method.upload(source, spec["digest"])
        _check_remote(client, bucket, key, source.stat().st_size)
        result = {"method": args.worker, "bytes": source.stat().st_size, "upload": up.result}
        if args.worker not in _NO_DOWNLOAD:
            target = scratch / "download.bin"
            with _Meter(spec["server_pid"], requests) as down:
                method.download(key, spec["digest"], target)
            assert _same(source, target), f"{args.worker}: the download differs from the file"
            target.unlink()
            result["download"] = down.result
        return result
    finally:
        _empty(client, bucket, prefix)


# -- the driver -----------------------------------------------------------------------------

def _rotate(items: list[str], n: int) -> list[str]:
    k = n % len(items)
    return items[k:] + items[:k]


def _spawn(method: str, spec: dict[str, Any], env: dict[str, str], scratch: Path
           ) -> dict[str, Any]:
    work = scratch / f"{method}-{uuid.uuid4().hex[:8]}"
    (work / "wandb").mkdir(parents=True)
    wandb_dir = str(work / "wandb")
    env = {**env, "WANDB_DIR": wandb_dir, "WANDB_DATA_DIR": wandb_dir,
           "WANDB_CACHE_DIR": wandb_dir, "WANDB_CONFIG_DIR": wandb_dir,
           "REPRO_HOME": str(work / "repro-home")}
    cmd = [sys.executable, __file__, "--worker", method,
           "--spec", json.dumps({**spec, "scratch": str(work)})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work,
                              timeout=3600)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode != 0 or not lines:
        sys.exit(f"{method} worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                 f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(_MARK):])  # type: ignore[no-any-return]


def _write_file(path: Path, size: int) -> None:
    with path.open("wb") as f:
        left = size
        while left:
            n = min(left, 16 * _MIB)
            f.write(os.urandom(n))
            left -= n


def _worker_env(endpoint: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _AWS_DROP}
    return {**env, **_AWS, "AWS_ENDPOINT_URL": endpoint, "WANDB_MODE": "offline",
            "WANDB_SILENT": "true", "REPRO_PROGRESS": "0", "PYTHONWARNINGS": "ignore"}


def _run(args: argparse.Namespace, scratch: Path) -> list[list[dict[str, Any]]]:
    from repro_core.hashing import hash_file

    source = scratch / "payload.bin"
    _write_file(source, args.size)
    digest = hash_file(source)
    server, endpoint = _start_server(scratch)
    env = _worker_env(endpoint)
    os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
    for name in _AWS_DROP:
        os.environ.pop(name, None)
    client, bucket = _client(), f"bench-{uuid.uuid4().hex[:12]}"
    try:
        client.create_bucket(Bucket=bucket)
        rounds = []
        for i in range(args.repeats):
            spec = {"file": str(source), "digest": digest, "bucket": bucket,
                    "prefix": f"round{i}", "server_pid": server.pid}
            rounds.append([_spawn(m, spec, env, scratch)
                           for m in _rotate(args.methods, i)])
        _empty(client, bucket)
        client.delete_bucket(Bucket=bucket)
        return rounds
    finally:
        _stop_server(server)


def _fit_size(size: int, scratch: str) -> tuple[int, str]:
    available = psutil.virtual_memory().available
    free = shutil.disk_usage(scratch).free
    fits = min(available // _MEMORY_FACTOR, free // _DISK_FACTOR) // _MIB * _MIB
    if size <= fits:
        return size, ""
    return max(fits, 8 * _MIB), (
        f"asked for {size / 1e6:.0f} MB but {available / 1e9:.1f} GB of available memory / "
        f"{free / 1e9:.1f} GB of free disk hold only {fits / 1e6:.0f} MB "
        f"(x{_MEMORY_FACTOR} memory: moto's GETs, x{_DISK_FACTOR} disk): measured with that")


# -- the summary and the tables -------------------------------------------------------------

def _med(rows: list[dict[str, Any]], field: str) -> float:
    return statistics.median(r[field] for r in rows)


def _summary(rounds: list[list[dict[str, Any]]], methods: list[str]) -> dict[str, Any]:
    by = {m: [next(r for r in rnd if r["method"] == m) for rnd in rounds] for m in methods}
    size = rounds[0][0]["bytes"]
    out: dict[str, Any] = {"bytes": size, "rounds": rounds, "upload": {}, "download": {},
                           "ratios": {}}
    for direction in ("upload", "download"):
        for m in methods:
            rows = [r[direction] for r in by[m] if direction in r]
            if rows:
                out[direction][m] = {
                    "seconds": _med(rows, "seconds"), "mb_s": size / 1e6 / _med(rows, "seconds"),
                    "all_seconds": [r["seconds"] for r in rows], "cpu": _med(rows, "cpu"),
                    "server_cpu": _med(rows, "server_cpu"), "peak_mb": _med(rows, "peak_mb"),
                    "server_peak_mb": _med(rows, "server_peak_mb"),
                    "requests": rows[0]["requests"]}
    for direction, other in (("upload", "s3fs"), ("upload", "boto3"), ("upload", "s3fs1"),
                             ("download", "s3fs"), ("download", "boto3"),
                             ("download", "s3fs1")):
        if "repro" in by and other in by:
            # throughput ratio = their seconds / repro's seconds, round by round
            per = [o[direction]["seconds"] / r[direction]["seconds"]
                   for r, o in zip(by["repro"], by[other], strict=True)]
            out["ratios"][f"{direction}_vs_{other}"] = {"median": statistics.median(per),
                                                        "rounds": per}
    ratio = out["ratios"].get("upload_vs_s3fs", {}).get("median")
    out["target"] = {"ratio": ratio, "min": _TARGET,
                     "met": None if ratio is None else ratio >= _TARGET}
    return out


def _print_table(direction: str, summary: dict[str, Any]) -> None:
    rows = summary[direction]
    print(f"\n{direction.capitalize()}, {summary['bytes'] / 1e6:.0f} MB, median of "
          f"{len(summary['rounds'])} round(s)\n")
    print("| method | s (median) | MB/s | all rounds s | client CPU s | server CPU s "
          "| S3 requests | client peak RSS +MB | server peak RSS +MB |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for m, row in rows.items():
        runs = ", ".join(f"{s:.2f}" for s in row["all_seconds"])
        print(f"| {_METHODS[m]} | {row['seconds']:.2f} | {row['mb_s']:.0f} | {runs} "
              f"| {row['cpu']:.2f} | {row['server_cpu']:.2f} | {sum(row['requests'].values())} "
              f"| {row['peak_mb']:.0f} | {row['server_peak_mb']:.0f} |")


def _print(summary: dict[str, Any], machine: str, note: str) -> None:
    print(machine)
    if note:
        print(f"\nNOTE: {note}")
    _print_table("upload", summary)
    _print_table("download", summary)
    print("\nS3 requests of the first round:")
    for direction in ("upload", "download"):
        for m, row in summary[direction].items():
            ops = ", ".join(f"{op} {n}" for op, n in sorted(row["requests"].items()))
            print(f"- {direction}, {m}: {ops or 'none'}")
    print()
    for name, ratio in summary["ratios"].items():
        direction, other = name.split("_vs_")
        print(f"repro {direction} rate / {other}'s: {ratio['median']:.3f} (rounds: "
              f"{', '.join(f'{x:.3f}' for x in ratio['rounds'])})")
    target = summary["target"]
    if target["ratio"] is not None:
        verdict = "met" if target["met"] else "NOT met"
        print(f"\nTarget: repro upload >= {_TARGET}x the raw s3fs put: {target['ratio']:.3f}x, "
              f"{verdict}")


def _machine(args: argparse.Namespace) -> str:
    memory = psutil.virtual_memory()
    versions = ", ".join(f"{p} {version(p)}" for p in ("moto", "s3fs", "boto3", "botocore",
                                                       "blake3", "wandb"))
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{memory.total / 2**30:.1f} GiB memory ({memory.available / 2**30:.1f} GiB "
            f"available at the start), Python {platform.python_version()}, {versions}; "
            f"moto ThreadedMotoServer on 127.0.0.1 in a subprocess; "
            f"{time.strftime('%Y-%m-%d')}")


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgG]i?)?[bB]?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GB, 256MB, 64MiB)")
    unit = (match.group(2) or "").lower()
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "ki": 2**10, "mi": 2**20, "gi": 2**30}[unit]
    return int(float(match.group(1)) * scale)


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size", type=_parse_size, default=_parse_size("1GB"),
                        help="file size, e.g. 1GB, 256MB, 64MiB (default 1GB)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--methods", default=",".join(_DEFAULT_METHODS),
                        help=f"comma-separated, of {', '.join(_METHODS)} "
                             f"(default {','.join(_DEFAULT_METHODS)})")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 MB, 1 round")
    parser.add_argument("--json", action="store_true", help="one JSON document, no tables")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker", choices=list(_METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(_METHODS)
    if unknown or not args.methods:
        parser.error(f"unknown --methods {sorted(unknown)}; choose from {', '.join(_METHODS)}")
    if args.quick:
        args.size, args.repeats = 32 * 10**6, 1
    return args


def main() -> None:
    args = _parse()
    if args.serve:
        _serve()
        return
    if args.worker:
        print(_MARK + json.dumps(_worker(args)), flush=True)
        return
    machine = _machine(args)
    with tempfile.TemporaryDirectory(prefix="repro-bench-remote-") as scratch:
        args.size, note = _fit_size(args.size, scratch)
        summary = _summary(_run(args, Path(scratch)), args.methods)
    if args.json:
        print(json.dumps({"machine": machine, "note": note,
                          "args": {k: v for k, v in vars(args).items()
                                   if k not in ("serve", "worker", "spec")},
                          **summary}, indent=1))
        return
    _print(summary, machine, note)


if __name__ == "__main__":
    main()
