"""Blob storage backends (content-addressed, immutable)."""

from .base import StorageBackend
from .fsspec_backend import FsspecStorageBackend
from .local import BlobWriter, LocalStorageBackend

__all__ = ["BlobWriter", "FsspecStorageBackend", "LocalStorageBackend", "StorageBackend"]
