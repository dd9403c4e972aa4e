"""Min/max downsampling: a million points drawn as a few thousand that look the same.

A plot is about 1,000 pixels wide, so a 1 M-point series spends ~1,000 points on every pixel
column. Keeping every *n*-th point would be smaller but lies: a loss spike or a single
diverged step falls between the kept points and disappears. Keeping, per bucket of
consecutive points, the point with the smallest and the one with the largest value keeps the
envelope the eye sees (the approach of TensorBoard's and Bokeh's datashading, and of the
"min/max" variant of LTTB) — every spike survives.

Non-finite values are data, not noise: a NaN loss is usually *the* thing to look for. A bucket
holding a NaN or ±inf keeps one NaN point at the first such position, so the line has a
visible gap there however far it is zoomed out (Plotly breaks a line at NaN), and
:func:`gap_markers` gives the positions for explicit markers.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["MAX_POINTS", "gap_markers", "minmax_downsample"]

# Points per trace in the report: three per bucket (min, max, a gap) x ~1,000 buckets, about
# one bucket per pixel column of a full-width plot.
MAX_POINTS = 3000


def minmax_downsample(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS
                      ) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` of the points ``(x, y)`` (``x`` ascending) that draw like all
    of them: per bucket of consecutive points, the minimum and the maximum of its finite
    values (in ``x`` order) and, when it holds a non-finite value, one NaN at the first one.

    A series of at most ``max_points`` points is returned whole (as float copies, ±inf as
    NaN: a plot cannot draw infinity, and NaN makes the same gap). ``max_points`` must be
    at least 3 (one bucket's worth).
    """
    if max_points < 3:
        raise ValueError(f"max_points must be at least 3, got {max_points}")
    xs = np.asarray(x)
    ys = np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise ValueError(f"x and y must be 1-D and of one length, got {xs.shape} and "
                         f"{ys.shape}")
    n = len(ys)
    if n <= max_points:
        return xs.copy(), np.where(np.isfinite(ys), ys, np.nan)
    width = math.ceil(n / (max_points // 3))  # points per bucket
    buckets = math.ceil(n / width)
    finite = np.isfinite(ys)
    pad = buckets * width - n
    low = np.pad(np.where(finite, ys, np.inf), (0, pad), constant_values=np.inf)
    high = np.pad(np.where(finite, ys, -np.inf), (0, pad), constant_values=-np.inf)
    gaps = np.pad(~finite, (0, pad), constant_values=False).reshape(buckets, width)
    offsets = np.arange(buckets) * width
    lowest = offsets + low.reshape(buckets, width).argmin(axis=1)
    highest = offsets + high.reshape(buckets, width).argmax(axis=1)
    first_gap = offsets + gaps.argmax(axis=1)
    keep = np.concatenate([lowest[lowest < n], highest[highest < n],
                           first_gap[gaps.any(axis=1)]])
    # an all-gap bucket's argmin/argmax name a gap point: it is kept, as a gap, once
    keep = np.unique(keep)
    kept = ys[keep]
    return xs[keep], np.where(np.isfinite(kept), kept, np.nan)


def gap_markers(x: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS // 3
                ) -> tuple[np.ndarray, np.ndarray]:
    """Where a series has non-finite values, for markers: ``x`` of (at most ``max_points``
    of) them, and ``y`` the last finite value before each (the first finite one for a
    leading gap; 0 when nothing is finite), so a marker sits where the line breaks.

    Consecutive gaps are thinned evenly when there are more than ``max_points``.
    """
    xs = np.asarray(x)
    ys = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(ys)
    where = np.flatnonzero(~finite)
    if len(where) == 0:
        return xs[:0], ys[:0]
    if len(where) > max_points:
        where = where[np.linspace(0, len(where) - 1, max_points).astype(np.int64)]
    if not finite.any():
        return xs[where], np.zeros(len(where))
    index = np.arange(len(ys))
    last = np.maximum.accumulate(np.where(finite, index, -1))[where]
    first = int(np.argmax(finite))
    return xs[where], ys[np.where(last >= 0, last, first)]
