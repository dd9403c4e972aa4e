"""Spill files: buffered metrics the registry refused at finalize, kept on disk until imported.

When the registry refuses writes at finalize (disk full, a lock held past the busy timeout), the
writer retries with backoff and then writes what is left to ``<root>/spill/``; the next
``ArtifactManager`` that opens the store imports it with :func:`import_spills`. (Before, a full
disk at finalize lost 1,000,000 buffered points and left the run RUNNING after space was
freed.) Layout and format, UTF-8 JSON lines, one file per bounded part of the batch::

    <root>/spill/<run_id>-<spill_id>.jsonl     spill_id = <time_ns hex>-<part>-<random hex>
        {"format": "repro-spill", "version": 1, "spill_id": ..., "run_id": ...,
         "created_at": <unix>, "points": P, "rows": R}
        {"metric": "<name>", "steps": "<base64 int64 LE>", "vals": "<base64 float64 LE>",
         "times": "<base64 float64 LE>"}                  one line per metric name
        {"table": "online_updates", "rows": [[...], ...]}  one line per table
        {"end": true, "records": <number of lines between header and end>}

**Exactly once.** A spill is written to a unique temp file, fsynced, renamed into place and
the directory fsynced, so an importer never sees half a file. Import commits the rows together
with a marker row ``store_meta('spill:<spill_id>')`` in ONE transaction, then deletes the file.
A kill -9 between that commit and the delete leaves a file whose marker exists: the next import
deletes it without importing it again. Two processes importing at once are serialized by the
write transaction; the second finds the marker. A file that does not parse or validate (a store
is untrusted input) is renamed to ``*.invalid`` with a warning, never half-imported; one the
registry refuses now (disk still full) is kept for the next open.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _fsio, constants
from ._metrics_batch import Batch, write_part
from ._metrics_rows import check_key, check_row, pack, unpack
from ._safepath import read_untrusted, real_dirs
from .errors import IntegrityError, ReproError, SerializationError
from .registry import Registry
from .registry.dialect import DATA_ERRORS, DB_ERRORS

__all__ = ["SpillReport", "import_spills", "write_spill"]

SPILL_DIR = "spill"
# A spill part holds at most a bounded batch (metrics.MAX_PENDING_*); anything far larger
# is not ours, and reading it whole must not exhaust memory.
_MAX_SPILL_BYTES = 1 << 30
_FORMAT, _VERSION = "repro-spill", 1
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_SPILL_ID = re.compile(r"[0-9a-f]{1,16}-[0-9]{4,9}-[0-9a-f]{16}")
# The database refusing the data itself (a NULL in a NOT NULL column …: registry.dialect's
# DATA_ERRORS): the file is at fault, and retrying it at every open would never succeed.
# Other driver errors (full, locked, a lost server) are kept.
_INVALID: tuple[type[BaseException], ...] = (
    SerializationError, ValueError, KeyError, TypeError, AttributeError, RecursionError,
    MemoryError, *DATA_ERRORS)
_RETRY: tuple[type[BaseException], ...] = (*DB_ERRORS, OSError, ReproError)



@dataclass(frozen=True)
class SpillReport:
    """Spill files written (at finalize) or imported (at open), and what they hold."""

    files: tuple[Path, ...] = ()
    points: int = 0
    rows: int = 0
    invalid: tuple[Path, ...] = ()  # renamed to *.invalid: not a spill this repro can read
    kept: tuple[Path, ...] = ()  # the registry refused them now: retried at the next open

    def __bool__(self) -> bool:
        return bool(self.files or self.invalid or self.kept)


def write_spill(root: Path, run_id: str, part: Batch, index: int, *, segment: int = 0) -> Path:
    """Write one part as a spill file, atomically and durably; return its path."""
    spill_id = f"{time.time_ns():x}-{index:04d}-{secrets.token_hex(8)}"
    safe = run_id if _SAFE_NAME.fullmatch(run_id) else "run"
    path = root / SPILL_DIR / f"{safe}-{spill_id}.jsonl"
    real_dirs(root, SPILL_DIR)  # a planted spill -> /elsewhere would receive our file
    return _fsio.write_file_atomic(path, _encode(run_id, spill_id, part, segment))


def _encode(run_id: str, spill_id: str, part: Batch, segment: int) -> bytes:
    lines = [json.dumps({"format": _FORMAT, "version": _VERSION, "spill_id": spill_id,
                         "run_id": run_id, "created_at": time.time(), "points": part.points,
                         "rows": part.row_count, "segment": segment})]
    lines += [json.dumps({"metric": key, "steps": _b64(steps), "vals": _b64(vals),
                          "times": _b64(times)})
              for key, (steps, vals, times) in part.columns.items()]
    lines += [json.dumps({"table": table, "rows": rows}) for table, rows in part.rows.items()]
    lines.append(json.dumps({"end": True, "records": len(lines) - 1}))
    return ("\n".join(lines) + "\n").encode("utf-8")


def _b64(values: Any) -> str:
    return base64.b64encode(pack(values)).decode("ascii")


def import_spills(registry: Registry | str | os.PathLike[str]) -> SpillReport:
    """Import every spill file of the store whose registry this is (``registry.sqlite`` path
    or an open :class:`Registry`); idempotent and safe to run from several processes at once.

    Call it whenever a store is opened. Returns what was imported; warns (``RuntimeWarning``)
    about files renamed to ``*.invalid`` and about files the registry refused for now.
    """
    owned = not isinstance(registry, Registry)
    path = Path(registry.path if isinstance(registry, Registry) else registry)
    directory = path.parent / SPILL_DIR
    try:
        real_dirs(path.parent, SPILL_DIR)  # never import from (and rename in) a planted link
    except IntegrityError as exc:
        warnings.warn(f"metrics spill files not imported: {exc}", RuntimeWarning, stacklevel=2)
        return SpillReport()
    try:
        if not directory.is_dir() or (owned and not path.is_file()):
            return SpillReport()
        _sweep_stale_temp(directory)
        spills = sorted(directory.glob("*.jsonl"))
    except OSError as exc:  # opening the store must not fail over its spill folder
        warnings.warn(f"cannot list metrics spill files in {directory}: {exc}",
                      RuntimeWarning, stacklevel=2)
        return SpillReport()
    if not spills:
        return SpillReport()
    reg = Registry(path, create=False) if owned else registry
    assert isinstance(reg, Registry)
    try:
        return _import_all(reg, spills)
    finally:
        if owned:
            reg.close()


def _import_all(registry: Registry, spills: list[Path]) -> SpillReport:
    files, invalid, kept, points, rows = [], [], [], 0, 0
    for spill in spills:
        try:
            counts = _import_one(registry, spill)
        except _INVALID as exc:
            invalid.append(_quarantine(spill, exc))
            continue
        except _RETRY as exc:  # disk still full, locked, server away ...
            warnings.warn(f"could not import metrics spill file {spill} now ({exc}); it is "
                          "kept and retried when the store is next opened", RuntimeWarning,
                          stacklevel=3)
            kept.append(spill)
            continue
        if counts is not None:
            files.append(spill)
            points, rows = points + counts[0], rows + counts[1]
    return SpillReport(tuple(files), points, rows, tuple(invalid), tuple(kept))


def _import_one(registry: Registry, spill: Path) -> tuple[int, int] | None:
    """Import one file (None: another process got there first); then delete it."""
    data = read_untrusted(spill, _MAX_SPILL_BYTES)  # no symlink, FIFO or device; bounded
    if data is None:
        if not spill.exists() and not spill.is_symlink():
            return None  # imported and removed by another process meanwhile
        raise ValueError("not a regular spill file of a sane size")
    run_id, spill_id, batch, segment = _decode(data)
    if not registry._read("SELECT 1 FROM runs WHERE id = ?", (run_id,)):
        raise ValueError(f"run {run_id!r} is not in this registry")
    marker, counts = f"spill:{spill_id}", None
    with registry.transaction() as conn:
        if conn.execute("SELECT 1 FROM store_meta WHERE key = ?", (marker,)).fetchone() is None:
            write_part(conn, run_id, batch, {}, segment=segment)
            conn.execute("INSERT INTO store_meta (key, value) VALUES (?, ?)",
                         (marker, json.dumps({"file": spill.name, "at": time.time()})))
            counts = (batch.points, batch.row_count)
    spill.unlink(missing_ok=True)  # a crash before this: the marker makes the retry a no-op
    _fsio.fsync_dir(spill.parent)
    return counts


def _decode(data: bytes) -> tuple[str, str, Batch, int]:
    """Parse and validate a spill file; ValueError/SerializationError if anything is off."""
    lines = data.decode("utf-8").split("\n")
    if lines[-1] != "":
        raise ValueError("the file does not end with a newline (truncated)")
    header, *records, end = (json.loads(line) for line in lines[:-1])
    if header.get("format") != _FORMAT or header.get("version") != _VERSION:
        raise ValueError(f"not a {_FORMAT} v{_VERSION} file")
    run_id, spill_id = check_key(header.get("run_id")), header.get("spill_id")
    if not isinstance(spill_id, str) or not _SPILL_ID.fullmatch(spill_id):
        raise ValueError(f"bad spill id {spill_id!r}")
    segment = header.get("segment", 0)  # files written before v5 have none: the first
    if not isinstance(segment, int) or isinstance(segment, bool) or not 0 <= segment < 1_000_000:
        raise ValueError(f"bad segment {segment!r}")
    if end != {"end": True, "records": len(records)}:
        raise ValueError("the end record is missing or wrong (truncated)")
    batch = Batch()
    for record in records:
        _decode_record(record, run_id, batch)
    if (batch.points, batch.row_count) != (header.get("points"), header.get("rows")):
        raise ValueError("the counts in the header do not match the records")
    return run_id, spill_id, batch, segment


def _decode_record(record: dict[str, Any], run_id: str, batch: Batch) -> None:
    if "metric" in record:
        steps, vals, times = (unpack(code, base64.b64decode(record[name], validate=True))
                              for code, name in (("q", "steps"), ("d", "vals"), ("d", "times")))
        if not len(steps) == len(vals) == len(times) or (steps and min(steps) < 0):
            raise ValueError(f"metric {record['metric']!r}: bad columns")
        batch.extend(Batch(columns={check_key(record["metric"]): (steps, vals, times)}))
        return
    table, rows = record["table"], record["rows"]
    checked = [check_row(table, row)[1] for row in rows]
    if any(row[0] != run_id for row in checked):
        raise ValueError(f"{table} rows of another run than {run_id!r}")
    batch.rows.setdefault(table, []).extend(checked)


def _quarantine(spill: Path, exc: BaseException) -> Path:
    target = spill.with_suffix(".invalid")
    try:
        _fsio.replace(spill, target)
    except OSError:
        target = spill
    warnings.warn(f"metrics spill file {spill} is not valid ({type(exc).__name__}: {exc}); "
                  f"nothing was imported from it (kept as {target.name})", RuntimeWarning,
                  stacklevel=4)
    return target


def _sweep_stale_temp(directory: Path) -> None:
    """Temp files of spill writers killed mid-write (a live writer's is younger)."""
    cutoff = time.time() - constants.REPRO_STALE_TMP_SECONDS
    for temp in directory.glob(".*.tmp"):
        try:
            if temp.stat().st_mtime < cutoff:
                temp.unlink()
        except OSError:
            continue
