"""``rank_zero_only``: mark code that runs on rank 0 alone, so it publishes nothing.

Rank 0 publishes the answer to every repro call for the other ranks, which pair it with the
call they make themselves. Code that runs on rank 0 alone (a user's ``if rank == 0:`` block,
a Lightning ``CheckpointIO``, an Accelerate ``is_main_process`` branch) makes calls no other
rank makes; inside this scope they are not published at all, so they cannot be mistaken for
a later call every rank makes. On the other ranks, repro calls inside the scope return
``None`` at once (as Lightning's ``rank_zero_only`` does).

The scope lives in a ``ContextVar``: a thread (or asyncio task) of rank 0 that is not inside
the scope keeps publishing normally while another thread is inside it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextvars import ContextVar
from types import TracebackType
from typing import ParamSpec, TypeVar, overload

from ._ranks import global_rank

__all__ = ["in_rank_zero_only", "rank_zero_only"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

# A depth, not a flag, so nested scopes (a decorated function called inside a ``with``)
# leave the outer scope in force when the inner one ends.
_DEPTH: ContextVar[int] = ContextVar("repro_rank_zero_only_depth", default=0)


def in_rank_zero_only() -> bool:
    """True inside ``rank_zero_only()`` in this thread / task."""
    return _DEPTH.get() > 0


class RankZeroOnly:
    """The object ``rank_zero_only()`` returns: a context manager and a decorator.

    As a context manager the body runs on every rank (Python cannot skip it); repro calls
    in it run unpublished on rank 0 and return ``None`` elsewhere. As a decorator the function
    runs on rank 0 only (inside the scope) and returns ``None`` on the other ranks. One object
    may be shared by threads: its state is per context, not on the object.
    """

    def __enter__(self) -> None:
        _DEPTH.set(_DEPTH.get() + 1)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _DEPTH.set(max(0, _DEPTH.get() - 1))

    def __call__(self, fn: Callable[_P, _R]) -> Callable[_P, _R | None]:
        @functools.wraps(fn)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R | None:
            if global_rank() != 0:
                return None
            with self:
                return fn(*args, **kwargs)

        return wrapper


@overload
def rank_zero_only(fn: Callable[_P, _R], /) -> Callable[_P, _R | None]: ...


@overload
def rank_zero_only(fn: None = None, /) -> RankZeroOnly: ...


def rank_zero_only(
    fn: Callable[_P, _R] | None = None, /
) -> Callable[_P, _R | None] | RankZeroOnly:
    """Mark rank-0-only code: ``with rank_zero_only(): ...``, ``@rank_zero_only`` or
    ``@rank_zero_only()``.

    Inside, repro calls on rank 0 write as usual but publish nothing for the other ranks;
    on the other ranks they return ``None`` without waiting. ``init_run`` and
    ``finalize_run`` synchronise every rank and raise ``RankMismatchError`` inside it.
    """
    scope = RankZeroOnly()
    return scope if fn is None else scope(fn)
