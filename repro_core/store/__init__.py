"""Blob storage backends (content-addressed, immutable)."""

from .base import StorageBackend
from .local import BlobWriter, LocalStorageBackend

__all__ = ["BlobWriter", "LocalStorageBackend", "StorageBackend"]
