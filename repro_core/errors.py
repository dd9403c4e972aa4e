"""Exceptions raised by repro.

Every error has one root, :class:`ReproError`, and each leaf also subclasses the
built-in a caller would naturally catch, so ``except ValueError`` keeps working::

    ReproError
    ├── InvalidNameError(ValueError)          .name
    ├── InvalidArgumentError(ValueError)      .argument
    ├── SerializationError(TypeError)         .path
    ├── ArtifactNotFoundError(LookupError)    .key
    ├── MissingFileError(FileNotFoundError)   .path
    ├── IntegrityError                        .digest .path .expected .actual
    ├── RunStateError(RuntimeError)           no active run, run already active, …
    ├── AmbiguousRankError(RuntimeError)      rank cannot be determined safely
    ├── StorageError(OSError)                 disk full, permission, backend failure
    └── DistributedTimeoutError(TimeoutError) a rank did not answer in time

Low-level errors are translated at the boundary with ``raise … from exc`` so the
original cause stays in the traceback.
"""

from __future__ import annotations

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
    "ReproError",
    "RunStateError",
    "SerializationError",
    "StorageError",
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


class DistributedTimeoutError(ReproError, TimeoutError):
    """Another rank did not reach a synchronisation point within the timeout."""
