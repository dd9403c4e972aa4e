"""Rank 0's ledger of published answers, and the check that no pairing was a guess.

Every answer rank 0 publishes gets a sequence number ``g`` (one counter per process, in the
order calls start) and a tag (a digest of the answer). Per fingerprint the ledger keeps
``[(g, tag), …]`` in order: about 60 bytes per call, for the life of the process.

Why a guess is possible at all: rank 1 takes, for each of its calls, the *earliest* answer
with its fingerprint that is newer than the answer to its previous call in the same thread
(rank 0 answers one thread's calls in program order). If rank 0 also made that exact call
alone (unmarked) at a point rank 1 cannot rule out, the real pair may be a *later* answer.
The latest answer that can still be the pair is bounded by the next call's latest possible
pair (walking the thread's calls backwards from the end). If every answer in between is
identical, the guess does not matter; if one differs, rank 1 may hold a wrong answer and
:meth:`Ledger.suspects` names the call.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Ledger"]


@dataclass
class _Answers:
    label: str
    gs: list[int] = field(default_factory=list)
    # None: reserved and not answered yet, or a call rank 0 never made (refused at finalize)
    tags: list[str | None] = field(default_factory=list)


class Ledger:
    """Per fingerprint, the sequence numbers and answer tags rank 0 published. Not locked:
    the owner (the exchange) serialises access."""

    def __init__(self) -> None:
        self._answers: dict[str, _Answers] = {}
        self._next_g = 0

    @property
    def next_g(self) -> int:
        return self._next_g

    def count(self, fp: str) -> int:
        """How many answers (reserved included) exist for ``fp``: the next call's index."""
        answers = self._answers.get(fp)
        return 0 if answers is None else len(answers.gs)

    def reserve(self, fp: str, label: str) -> tuple[int, int]:
        """Index ``n`` and sequence number ``g`` for a call that starts now."""
        answers = self._answers.setdefault(fp, _Answers(label))
        g, self._next_g = self._next_g, self._next_g + 1
        answers.gs.append(g)
        answers.tags.append(None)
        return len(answers.gs) - 1, g

    def answer(self, fp: str, n: int, tag: str) -> None:
        self._answers[fp].tags[n] = tag

    def suspects(self, flow: Sequence[tuple[str, int]]) -> list[str]:
        """Labels of the calls in ``flow`` (one thread of another rank: ``[(fp, g taken)…]``
        in call order) whose answer might belong to another identical call of rank 0."""
        found: list[str] = []
        bound = math.inf
        for fp, taken in reversed(flow):
            answers = self._answers.get(fp)
            if answers is None:  # not published by this process: nothing to compare with
                continue
            first = bisect.bisect_left(answers.gs, taken)
            last = max(first, bisect.bisect_left(answers.gs, bound) - 1)
            if first >= len(answers.gs):
                continue
            tag = answers.tags[first]
            window = answers.tags[first + 1:last + 1]
            if any(t is not None and t != tag for t in window):
                found.append(answers.label)
            bound = answers.gs[last]
        found.reverse()
        return found
