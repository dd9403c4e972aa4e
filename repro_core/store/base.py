"""The storage backend contract: a handful of primitives over immutable, digest-named blobs.

A backend implements ``upload``, ``download``, ``exists``, ``delete`` and ``iter_digests``;
verification is derived here once so every backend (local, fsspec/S3, wandb) behaves the same.
"""

from __future__ import annotations

import abc
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import IntegrityError
from ..hashing import hash_file, parse_digest

__all__ = ["StorageBackend"]


class StorageBackend(abc.ABC):
    """Abstract base class for artifact storage backends (content-addressed blobs)."""

    @abc.abstractmethod
    def upload(self, file_path: Path, content_hash: str) -> str:
        """Store ``file_path`` under ``content_hash``; return where it lives.

        Implementations must refuse content whose digest is not ``content_hash``
        (``IntegrityError``) and must never expose a partially written blob.
        """

    @abc.abstractmethod
    def download(self, content_hash: str, target_path: Path) -> Path:
        """Write the blob to ``target_path`` (atomically) and return that path."""

    @abc.abstractmethod
    def exists(self, content_hash: str) -> bool:
        """Whether a complete blob with this digest is stored."""

    @abc.abstractmethod
    def delete(self, content_hash: str) -> bool:
        """Remove the blob; return False when it was not there."""

    @abc.abstractmethod
    def iter_digests(self) -> Iterator[str]:
        """Every stored digest (for gc and verify)."""

    def verify(self, content_hash: str) -> None:
        """Re-hash the stored blob; raise ``IntegrityError`` if it is missing or differs."""
        algorithm, _ = parse_digest(content_hash)
        with tempfile.TemporaryDirectory(prefix="repro-verify-") as tmp:
            target = Path(tmp) / "blob"
            self.download(content_hash, target)
            actual = hash_file(target, algorithm)
        if actual != content_hash:
            raise IntegrityError(
                f"blob {content_hash} is corrupt: its content hashes to {actual}",
                digest=content_hash,
                expected=content_hash,
                actual=actual,
            )
