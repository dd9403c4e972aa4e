"""Numbers as people read them: sizes, durations, metric values. (The CLI has its own in
``cli/_common``; the report must not import the CLI, which brings click and rich.)"""

from __future__ import annotations

import math
from datetime import datetime

__all__ = ["fmt_duration", "fmt_number", "fmt_size", "seconds_between"]


def fmt_size(n: int | None) -> str:
    """``1.5 KiB``; bytes below 1 KiB exactly; None as a dash."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def fmt_duration(seconds: float | None) -> str:
    """``42.0 s``, ``3 min 5 s``, ``2 h 04 min``; None (unknown) as a dash."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 0:
        return "?"  # a clock moved backwards, or a forged end time
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def fmt_number(value: object) -> str:
    """A metric value: 4 significant digits, NaN and ±inf spelled out, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if math.isfinite(value) else str(value)


def seconds_between(start: str | None, end: str | None) -> float | None:
    """Seconds from one ISO time to another; None when either is missing or unreadable."""
    if not start or not end:
        return None
    try:
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    except (TypeError, ValueError):
        return None
