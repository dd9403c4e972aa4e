"""Exceptions raised by repro.

Every error has one root, :class:`ReproError`, and each leaf also subclasses the
built-in a caller would naturally catch, so ``except ValueError`` keeps working::

    ReproError
    ├── InvalidNameError(ValueError)          .name
    ├── InvalidArgumentError(ValueError)      .argument
    ├── SerializationError(TypeError)         .path
    ├── ArtifactNotFoundError(LookupError)    .key
    ├── MissingFileError(FileNotFoundError)   .path
    ├── StoreNotFoundError(FileNotFoundError) .path   no store where one was expected
    ├── IntegrityError                        .digest .path .expected .actual
    ├── RunStateError(RuntimeError)           no active run, run already active, …
    ├── AmbiguousRankError(RuntimeError)      rank cannot be determined safely
    ├── RankMismatchError(RuntimeError)       .calls .rank   ranks' calls cannot be paired
    ├── StorageError(OSError)                 disk full, permission, backend failure
    │   └── RegistryDamagedError              registry missing/empty/unreadable: `repro recover`
    └── DistributedTimeoutError(TimeoutError) a rank did not answer in time

Low-level errors are translated at the boundary with ``raise … from exc`` so the
original cause stays in the traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "AmbiguousRankError",
    "ArtifactNotFoundError",
    "DistributedTimeoutError",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidNameError",
    "MissingFileError",
    "RankMismatchError",
    "RegistryDamagedError",
    "ReproError",
    "RunStateError",
    "SerializationError",
    "StorageError",
    "StoreNotFoundError",
]


class ReproError(Exception):
    """Root of every error repro raises on purpose."""


class InvalidNameError(ReproError, ValueError):
    """An artifact name, alias or key is not acceptable (raised before any I/O)."""

    def __init__(self, message: str, *, name: object = None) -> None:
        super().__init__(message)
        self.name = name


class InvalidArgumentError(ReproError, ValueError):
    """An argument has the wrong value or combination (raised before any I/O)."""

    def __init__(self, message: str, *, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument


class SerializationError(ReproError, TypeError):
    """Data cannot be stored faithfully; ``path`` names the offending key, e.g. ``data['a'][3]``."""

    def __init__(self, message: str, *, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


class ArtifactNotFoundError(ReproError, LookupError):
    """No artifact, version, alias or digest matches ``key``."""

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class MissingFileError(ReproError, FileNotFoundError):
    """A ``file_path`` given to repro does not exist (raised before any write)."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class StoreNotFoundError(ReproError, FileNotFoundError):
    """No repro store where one was expected; read-only calls never create one."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class IntegrityError(ReproError):
    """Stored content does not match its recorded size or digest."""

    def __init__(
        self,
        message: str,
        *,
        digest: str | None = None,
        path: str | Path | None = None,
        expected: Any = None,
        actual: Any = None,
    ) -> None:
        super().__init__(message)
        self.digest = digest
        self.path = path
        self.expected = expected
        self.actual = actual


class RunStateError(ReproError, RuntimeError):
    """The operation does not fit the run's state (no active run, run already active, …)."""


class AmbiguousRankError(ReproError, RuntimeError):
    """The global rank cannot be determined safely, so repro refuses to write."""


class RankMismatchError(ReproError, RuntimeError):
    """Ranks made repro calls that cannot be paired with certainty.

    Raised where a rank would otherwise receive the answer to a call it did not make: a call
    rank 0 never made (a rank-1-only call, arguments that differ between ranks), or, at
    ``finalize_run``, a call whose answer depends on which of several identical rank-0 calls
    it was paired with. The fix: put rank-0-only code inside
    ``with repro_core.rank_zero_only():`` and pass the same arguments on every rank.
    ``calls`` names the calls concerned (``use_artifact('data')``), ``rank`` the rank that
    made them (None when unknown, e.g. when rebuilt on another rank from a message).
    """

    def __init__(self, message: str, *, calls: Sequence[str] = (),
                 rank: int | None = None) -> None:
        super().__init__(message)
        self.calls = tuple(calls)
        self.rank = rank


class StorageError(ReproError, OSError):
    """Writing or reading the store failed (disk full, permission, backend failure)."""

    def __init__(
        self, message: str, *, path: str | Path | None = None, errno: int | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class RegistryDamagedError(StorageError):
    """The registry is missing, empty or unreadable while the store holds data: it was lost,
    and inventing an empty one would hide every run (and let gc delete every blob)."""


class DistributedTimeoutError(ReproError, TimeoutError):
    """Another rank did not reach a synchronisation point within the timeout."""
