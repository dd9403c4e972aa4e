"""What the metrics writer stores, checked and encoded before it is buffered.

Everything the writer buffers passes through here first, so a flush can fail only for reasons
outside the data (disk full, a locked database), never for a value SQLite cannot store. Two
failures this prevents: a metric name holding a lone surrogate (``"loss\\udc80"``) was
accepted, then failed every later flush, so a run lost 2,000 of 4,000 valid points and ended
FAILED; ``step=2**63`` overflowed the int64 column and made every later call fail.

Non-finite floats in REAL columns (``online_updates.reward`` …) are stored as the text
``'nan'``, ``'inf'``, ``'-inf'``: SQLite turns a NaN REAL into NULL (indistinguishable from a
missing KL), and a column with REAL affinity keeps text that does not look like a number as
TEXT. :func:`decode_real` turns them back. (``-0.0`` still reads back as ``0.0``: SQLite keeps
no sign on a zero REAL. Metric values live in float64 arrays and are bit-exact.)
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
from array import array
from typing import Any

from .errors import IntegrityError, InvalidArgumentError, SerializationError
from .registry.dialect import DBConnection

__all__ = ["MAX_KEY_CHARS", "MAX_STEP", "ROW_TABLES", "check_key", "check_row", "check_step",
           "decode_real", "insert_rows", "is_utf8", "pack", "real", "to_number", "unpack"]

MAX_STEP = 2**63 - 1  # SQLite integers (and our int64 step arrays) stop here
MAX_KEY_CHARS = 256
# The append-only tables the writer may fill, with their columns. A closed set: table and
# column names are put into SQL text, so they must never come from data (e.g. a spill file).
ROW_TABLES: dict[str, tuple[str, ...]] = {
    "online_updates": ("run_id", "update_id", "experience_id", "reward", "confidence",
                       "kl_divergence", "model_version_id", "metadata", "time"),
    "experiences": ("run_id", "experience_id", "input", "output", "payload_digest",
                    "payload_size", "metadata", "time"),
}
# Their PostgreSQL types, for COPY's binary format (half the bytes of text, no parsing).
ROW_TYPES: dict[str, tuple[str, ...]] = {
    "online_updates": ("text", "text", "text", "float8", "float8", "float8", "int8", "text",
                       "float8"),
    "experiences": ("text", "text", "text", "text", "text", "int8", "text", "float8"),
}
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_MIN_INT = -(2**63)


def check_key(key: object) -> str:
    """A metric name SQLite can store as TEXT and a terminal can show: non-empty str, ≤ 256
    characters, valid UTF-8 (no lone surrogates), printable (no NUL — SQLite's C strings end
    there — no newline or escape sequence)."""
    if isinstance(key, str) and key and len(key) <= MAX_KEY_CHARS and key.isprintable() \
            and is_utf8(key):
        return key
    raise SerializationError(
        f"metric name must be a non-empty str of at most {MAX_KEY_CHARS} characters, valid "
        f"UTF-8 and printable; got {key!r}. Nothing from this call was logged; decode names "
        "properly (e.g. errors='replace') before logging", path=repr(key))


def check_step(step: object) -> int:
    """A step as stored: an int with 0 <= step < 2**63 (bool is refused: True is not a step)."""
    if isinstance(step, int) and not isinstance(step, bool) and 0 <= step <= MAX_STEP:
        return step
    raise InvalidArgumentError(
        f"step must be an int with 0 <= step < 2**63, got {step!r}; nothing from this call "
        "was logged", argument="step")


def to_number(key: str, value: Any) -> float:
    """A metric value as float; a clear ``SerializationError`` (a TypeError) naming ``key``."""
    kind = type(value)
    if kind is float:
        return value  # type: ignore[no-any-return]
    if kind is int or kind is bool:
        return _int_to_float(key, value)
    module = kind.__module__.split(".", 1)[0]
    scalar_array = module == "numpy" and getattr(value, "ndim", 1) == 0
    if scalar_array or (module == "torch" and _numel(value) == 1):
        return to_number(key, value.item())
    if isinstance(value, (int, float)):  # int/float subclasses (IntEnum, numpy float64)
        return _int_to_float(key, value) if isinstance(value, int) else float(value)
    raise SerializationError(
        f"metric {key!r} is a {kind.__module__}.{kind.__qualname__}, not a number; log "
        "scalars only (use log_artifact for tensors, text or tables)",
        path=key,
    )


def _int_to_float(key: str, value: int) -> float:
    try:
        return float(value)
    except OverflowError as exc:  # an int beyond float's range
        raise SerializationError(f"metric {key!r} = {value} does not fit a float64",
                                 path=key) from exc


def real(value: float) -> float | str:
    """A float for a REAL column: finite as is, NaN/±inf as ``'nan'``/``'inf'``/``'-inf'``."""
    if value - value == 0.0:  # finite (inf - inf and nan - nan are NaN); the hot-path check
        return value
    if value != value:
        return "nan"
    return "inf" if value > 0 else "-inf"


def decode_real(value: Any) -> float | None:
    """The inverse of :func:`real` for a value read back from a REAL column."""
    if not isinstance(value, str):
        return value  # type: ignore[no-any-return]
    try:
        return _NONFINITE[value]
    except KeyError:
        raise IntegrityError(f"a REAL column holds the text {value!r}, which repro never "
                             "writes (the registry was edited or damaged)",
                             expected="a number, 'nan', 'inf' or '-inf'", actual=value
                             ) from None


def check_row(table: object, row: object) -> tuple[str, tuple[Any, ...]]:
    """Check a row for one of :data:`ROW_TABLES` (rows read from a spill file are untrusted):
    the right number of SQL scalars, every int in int64, every str valid UTF-8."""
    columns = ROW_TABLES.get(table) if isinstance(table, str) else None
    if columns is None:
        raise SerializationError(f"no such row table {table!r}; expected one of "
                                 f"{sorted(ROW_TABLES)}", path=repr(table))
    assert isinstance(table, str)
    if not isinstance(row, (list, tuple)) or len(row) != len(columns):
        raise SerializationError(f"a {table} row must have {len(columns)} values "
                                 f"({', '.join(columns)}), got {row!r:.200}", path=table)
    for column, value in zip(columns, row, strict=True):
        _check_scalar(f"{table}.{column}", value)
    return table, tuple(row)


def _check_scalar(path: str, value: object) -> None:
    if value is None or isinstance(value, float):
        return
    if isinstance(value, int) and not isinstance(value, bool):
        if _MIN_INT <= value <= MAX_STEP:
            return
    elif isinstance(value, str) and is_utf8(value):
        return
    raise SerializationError(f"{path} cannot hold {value!r:.200} (SQL scalars only: None, "
                             "float, int64, valid UTF-8 str)", path=path)


def insert_rows(conn: DBConnection, table: str, rows: list[tuple[Any, ...]]) -> None:
    """Insert many rows in ONE statement (``json_each`` over a JSON array of the rows).

    ``executemany`` re-acquires the GIL after every row, and while the training loop keeps
    the GIL busy each re-acquisition waits a switch interval: 200,000 rows took over two
    minutes next to a busy thread, versus 0.45 s here, where the whole insert runs inside
    SQLite with the GIL released. ``executemany`` remains the fallback for rows JSON cannot
    carry faithfully (a NaN or ±inf float, NUL characters) and for SQLite builds without JSON1.
    On PostgreSQL the rows go through ``COPY`` instead.
    """
    global _json1
    columns = ROW_TABLES[table]  # KeyError for anything else: never SQL from data
    if getattr(conn, "dialect", "sqlite") == "postgresql":
        conn.copy_rows(table, columns, _floats(table, rows), ROW_TYPES[table])  # binary COPY
        return
    names, marks = ", ".join(columns), ", ".join("?" * len(columns))
    try:
        text: str | None = json.dumps(rows, allow_nan=False)  # one C call
    except ValueError:  # a NaN or ±inf float: JSON cannot carry it
        text = None
    if _json1 and text is not None and "\\u0000" not in text:  # NUL would cut a string
        extract = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(len(columns)))
        try:
            conn.execute(f"INSERT INTO {table} ({names}) SELECT {extract} FROM json_each(?)",
                         (text,))
            return
        except sqlite3.OperationalError as exc:
            if "no such function" not in str(exc):
                raise
            _json1 = False  # this SQLite has no JSON1: remember, and fall back
    conn.executemany(f"INSERT INTO {table} ({names}) VALUES ({marks})", rows)


_json1 = True


def _floats(table: str, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Rows with :func:`real`'s ``'nan'``/``'inf'`` text back as floats (a binary float8
    column takes floats only; rows without any are passed through untouched)."""
    where = [i for i, t in enumerate(ROW_TYPES[table]) if t == "float8"]
    if not any(type(row[i]) is str for row in rows for i in where):
        return rows
    return [tuple(_NONFINITE[v] if i in where and type(v) is str else v
                  for i, v in enumerate(row)) for row in rows]


def pack(values: array[Any]) -> bytes:
    """Little-endian bytes whatever the machine (the store may move between machines)."""
    if sys.byteorder == "little":
        return values.tobytes()
    swapped = array(values.typecode, values)
    swapped.byteswap()
    return swapped.tobytes()


def unpack(typecode: str, data: bytes) -> array[Any]:
    values = array(typecode)
    values.frombytes(data)
    if sys.byteorder != "little":
        values.byteswap()
    return values


def _numel(value: Any) -> int:
    try:
        return int(value.numel())
    except (AttributeError, TypeError):
        return -1


def is_utf8(text: str) -> bool:
    """True unless ``text`` holds a lone surrogate (which no UTF-8 encoder accepts)."""
    if text.isascii():  # the common case, and much cheaper than encoding
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True

