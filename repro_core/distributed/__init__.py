"""Ranks, and how rank 0 shares its answers without hidden collectives.

Rules (DESIGN.md "Ranks"):

* Only global rank 0 writes (``global_rank``: ``torch.distributed``, else ``RANK``,
  ``SLURM_PROCID``, ``LOCAL_RANK`` on one node; never a guess).
* Rank 0 *publishes* the answer to every repro call (run id, artifact metadata, or the
  error it hit) in the process group's key-value store; other ranks *fetch* the answer to
  the call they made themselves. Calls pair by what they are — kind, subject and a
  fingerprint of the arguments (:class:`Call`) — never by order alone, and never with an
  answer older than the one to the previous call in the same thread. A call rank 0 makes
  alone with other arguments therefore cannot shift the pairing of the calls every rank
  makes.
* Code that runs on rank 0 alone is marked with :func:`rank_zero_only`: it publishes
  nothing, and the same calls return ``None`` on other ranks.
* What cannot be told apart is detected: a call rank 0 never answers fails with
  :class:`RankMismatchError` as soon as rank 0 reaches ``finalize_run`` (else
  ``DistributedTimeoutError`` after ``REPRO_BARRIER_TIMEOUT``); an unmarked rank-0-only call
  identical to a later shared one, with a different answer, makes ``finalize_run`` raise
  ``RankMismatchError`` on every rank.
* No torch collective is ever issued from library code (publishing never blocks), so a call
  inside ``if rank == 0:`` cannot deadlock the job; ``barrier`` is built on the store with a
  timeout and works the same on gloo and NCCL.
"""

from ._errors import RankMismatchError
from ._exchange import EXCHANGE, Exchange
from ._fingerprint import Call
from ._ranks import barrier, global_rank, is_rank_zero, process_group_active, world_size
from ._scope import RankZeroOnly, in_rank_zero_only, rank_zero_only

__all__ = [
    "EXCHANGE",
    "Call",
    "Exchange",
    "RankMismatchError",
    "RankZeroOnly",
    "barrier",
    "global_rank",
    "in_rank_zero_only",
    "is_rank_zero",
    "process_group_active",
    "rank_zero_only",
    "world_size",
]
