"""A run's registry rows as one content-addressed blob: the *bundle* a remote carries.

What a run owns in the registry — its row and state history, the versions it logged and used
(by uid), its metrics (the stored chunks, bit-exact: NaN and ±inf included), its TTRL
experiences and online updates — is written as gzip'd JSON lines into a temp file, hashed and
uploaded like any blob. A bundle is streamed in both directions: a run with millions of
metric points never sits in memory whole.

Line 1 is the header ``{"bundle": 1, "run": {...}, "states": [...], "outputs": [[uid, at]],
"inputs": [[uid, at]], "blobs": [[digest, size]]}``; then ``{"c": [key, segment, count,
first, last, steps, vals, times]}`` per metric chunk (base64 arrays), ``{"e": [...]}`` per
experience and ``{"u": [...]}`` per online update (its model version by uid). A bundle read
back is untrusted: ``read_bundle`` checks every field and raises ``IntegrityError``.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._metrics_rows import check_key
from ..errors import IntegrityError, ReproError
from ..registry.dialect import DBConnection
from ..registry.records import RUN_COLUMNS
from ..types import RunState, validate_project
from ._records import RUN_ID, _blob, _digest, _size, _text, _uid

__all__ = ["BUNDLE_FORMAT", "Bundle", "read_bundle", "write_bundle"]

BUNDLE_FORMAT = 1
_RUN_FIELDS = [c.strip() for c in RUN_COLUMNS.split(",")]
_EXPERIENCE = ("experience_id", "input", "output", "payload_digest", "payload_size",
               "metadata", "time")
_UPDATE = ("update_id", "experience_id", "reward", "confidence", "kl_divergence",
           "model_version", "metadata", "time")
_MAX_LINE = 64 * 1024 * 1024
_TERMINAL = {s.value for s in RunState} - {RunState.RUNNING.value}


@dataclass
class Bundle:
    """A run's rows as read back from a bundle (checked)."""

    run: dict[str, Any]
    states: list[tuple[str, str, str | None]]
    outputs: list[tuple[str, str]]
    inputs: list[tuple[str, str]]
    blobs: list[tuple[str, int]]
    chunks: list[tuple[Any, ...]] = field(default_factory=list)
    experiences: list[tuple[Any, ...]] = field(default_factory=list)
    updates: list[tuple[Any, ...]] = field(default_factory=list)


def revision(conn: DBConnection, run_id: str) -> tuple[int, int, int]:
    """``(finished, segment, rows)``: how far a run has got (orders two copies of it)."""
    state, segment = conn.execute("SELECT state, segment FROM runs WHERE id = ?",
                                  (run_id,)).fetchone()
    rows = sum(conn.execute(sql, (run_id,)).fetchone()[0] or 0 for sql in (
        "SELECT SUM(c.count) FROM metric_chunks c JOIN metric_series s ON s.id = c.series_id"
        " WHERE s.run_id = ?",
        "SELECT COUNT(*) FROM experiences WHERE run_id = ?",
        "SELECT COUNT(*) FROM online_updates WHERE run_id = ?",
        "SELECT COUNT(*) FROM run_outputs WHERE run_id = ?",
        "SELECT COUNT(*) FROM run_inputs WHERE run_id = ?"))
    return (int(state in _TERMINAL), int(segment or 0), int(rows))


def write_bundle(conn: DBConnection, run_id: str, uids: dict[int, str],
                 target: Path, *, models: dict[int, str] | None = None
                 ) -> list[tuple[str, int]]:
    """Write the run's bundle to ``target``; returns the blobs it needs (TTRL payloads).
    ``uids`` maps local version ids to uids (edges to versions not in it are left out).
    ``models`` (default ``uids``) names an online update's model version even when the
    remote lacks it (``push KEY`` sends part of a run): written as ``null`` it would read
    back as "made before any checkpoint", a wrong answer; a puller that lacks the version
    leaves such an update out instead (``_pull``)."""
    models = uids if models is None else models
    row = conn.execute(f"SELECT {RUN_COLUMNS} FROM runs WHERE id = ?", (run_id,)).fetchone()
    blobs = sorted({(d, int(s)) for d, s in conn.execute(
        "SELECT payload_digest, payload_size FROM experiences WHERE run_id = ? AND"
        " payload_digest IS NOT NULL AND payload_size IS NOT NULL", (run_id,))})
    header = {
        "bundle": BUNDLE_FORMAT, "run": dict(zip(_RUN_FIELDS, row, strict=True)),
        "states": [list(r) for r in conn.execute(
            "SELECT state, at, reason FROM run_states WHERE run_id = ? ORDER BY rowid",
            (run_id,))],
        "outputs": _edges(conn, "run_outputs", "logged_at", run_id, uids),
        "inputs": _edges(conn, "run_inputs", "used_at", run_id, uids),
        "blobs": [list(b) for b in blobs],
    }
    # mtime=0: the same rows give the same bytes, so an unchanged run is not pushed again
    with open(target, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1,
                                                   mtime=0) as packed, \
            io.TextIOWrapper(packed, encoding="utf-8") as out:
        _line(out, header)
        for key, *chunk in conn.execute(
                "SELECT s.key, c.segment, c.count, c.first_step, c.last_step, c.steps, c.vals,"
                " c.times FROM metric_chunks c JOIN metric_series s ON s.id = c.series_id"
                " WHERE s.run_id = ? ORDER BY c.id", (run_id,)):
            _line(out, {"c": [key, *chunk[:4], *(_b64(b) for b in chunk[4:])]})
        for exp in conn.execute(f"SELECT {', '.join(_EXPERIENCE)} FROM experiences WHERE"
                                " run_id = ? ORDER BY id", (run_id,)):
            _line(out, {"e": list(exp)})
        for upd in conn.execute(
                "SELECT update_id, experience_id, reward, confidence, kl_divergence,"
                " model_version_id, metadata, time FROM online_updates WHERE run_id = ?"
                " ORDER BY id", (run_id,)):
            _line(out, {"u": [*upd[:5], models.get(upd[5]) if upd[5] is not None else None,
                              *upd[6:]]})
    return blobs


def _edges(conn: DBConnection, table: str, at: str, run_id: str,
           uids: dict[int, str]) -> list[list[str]]:
    return [[uids[vid], when] for vid, when in conn.execute(
        f"SELECT version_id, {at} FROM {table} WHERE run_id = ? ORDER BY {at}, version_id",
        (run_id,)) if vid in uids]


def _line(out: Any, value: Any) -> None:
    out.write(json.dumps(value, separators=(",", ":"), allow_nan=True) + "\n")


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


# -- reading (untrusted) --------------------------------------------------------------------

def read_bundle(path: Path, run_id: str, where: str) -> Bundle:
    """Read and check a bundle; anything malformed is an ``IntegrityError`` naming ``where``."""
    try:
        lines = _lines(path)
        bundle = _header(next(lines), run_id)
        for line in lines:
            if "c" in line:
                bundle.chunks.append(_chunk(line["c"]))
            elif "e" in line:
                bundle.experiences.append(_experience(line["e"]))
            elif "u" in line:
                bundle.updates.append(_update(line["u"]))
            else:
                raise ValueError("unknown line")
        payloads = {e[3] for e in bundle.experiences if e[3] is not None}
        if not payloads <= {d for d, _ in bundle.blobs}:
            raise ValueError("an experience names a payload blob the bundle does not list")
        return bundle
    except StopIteration:
        raise IntegrityError(f"run bundle {where} is empty", path=where) from None
    except (ValueError, TypeError, KeyError, OSError, EOFError, zlib.error, ReproError) as exc:
        # (zlib.error: a gzip header that parses over a deflate stream that does not)
        raise IntegrityError(f"run bundle {where} is damaged or forged: {exc}"[:500],
                             path=where) from None


def _lines(path: Path) -> Iterator[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as src:
        while True:
            text = src.readline(_MAX_LINE + 1)
            if not text:
                return
            if len(text) > _MAX_LINE:
                raise ValueError("a line is too long")
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError("a line is not an object")
            yield value


def _header(raw: dict[str, Any], run_id: str) -> Bundle:
    if raw.get("bundle") != BUNDLE_FORMAT:
        raise ValueError("not a repro run bundle (or one from a newer repro)")
    run = raw["run"]
    if not isinstance(run, dict) or run.get("id") != run_id:
        raise ValueError("its run is not the run it is filed under")
    _check_run(run)
    return Bundle(
        run=run,
        states=[(_state(s[0]), _text(s[1]), _opt_any_text(s[2]))
                for s in _rows(raw["states"], 3)],
        outputs=[(_uid(u), _text(at)) for u, at in _rows(raw["outputs"], 2)],
        inputs=[(_uid(u), _text(at)) for u, at in _rows(raw["inputs"], 2)],
        blobs=[_blob(b) for b in _rows(raw["blobs"], 2)])


def _check_run(run: dict[str, Any]) -> None:
    if set(run) != set(_RUN_FIELDS):
        raise ValueError("the run row has other columns")
    if not (isinstance(run["id"], str) and RUN_ID.fullmatch(run["id"])):
        raise ValueError("bad run id")
    for name in ("name", "project", "tags", "config", "created_at"):
        if not isinstance(run[name], str):
            raise ValueError(f"bad run {name}")
    _state(run["state"])
    validate_project(run["project"])
    json.loads(run["tags"]), json.loads(run["config"])
    for name in ("pid", "world_size", "segment"):
        if run[name] is not None and (isinstance(run[name], bool)
                                      or not isinstance(run[name], int)):
            raise ValueError(f"bad run {name}")
    for name in ("ended_at", "host", "process_ns"):
        _opt(run[name])
    if run["pid_started"] is not None and not isinstance(run["pid_started"], (int, float)):
        raise ValueError("bad run pid_started")


def _rows(value: object, width: int) -> list[list[Any]]:
    if not isinstance(value, list) or not all(isinstance(r, list) and len(r) == width
                                              for r in value):
        raise ValueError("bad row list")
    return value


def _chunk(raw: object) -> tuple[Any, ...]:
    row = _rows([raw], 8)[0]
    key = check_key(row[0])
    segment, count, first, last = (_int(v) for v in row[1:5])
    arrays = [base64.b64decode(v, validate=True) for v in row[5:]]
    if count <= 0 or any(len(a) != 8 * count for a in arrays) or first > last:
        raise ValueError(f"metric chunk of {key!r} does not add up")
    return (key, segment, count, first, last, *arrays)


def _experience(raw: object) -> tuple[Any, ...]:
    row = _rows([raw], len(_EXPERIENCE))[0]
    _text(row[0]), _opt_any_text(row[1]), _opt_any_text(row[2])
    if row[3] is not None:
        _digest(row[3])
    if row[4] is not None:
        _size(row[4])
    _any_text(row[5]), _real(row[6])
    return tuple(row)


def _update(raw: object) -> tuple[Any, ...]:
    row = _rows([raw], len(_UPDATE))[0]
    _text(row[0]), _text(row[1])
    for value in row[2:5]:
        if value is not None and not isinstance(value, (int, float, str)):
            raise ValueError("bad update value")
    if row[5] is not None:
        _uid(row[5])
    _any_text(row[6]), _real(row[7])
    return tuple(row)


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -2**63 <= value < 2**63:
        raise ValueError("bad integer")
    return value


def _real(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("bad number")
    return float(value)


def _state(value: object) -> str:
    return RunState.coerce(value).value  # type: ignore[arg-type]


def _opt(value: object) -> str | None:
    return None if value is None else _text(value)


def _any_text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("bad text")
    return value


def _opt_any_text(value: object) -> str | None:
    return None if value is None else _any_text(value)
