"""repro_core: reproducible runs, content-addressed artifacts and lineage, framework-free.

Importing this package never imports torch, lightning or wandb; they are loaded lazily when a
tensor, a GPU or a backend is actually used.
"""

from .errors import (
    AmbiguousRankError,
    ArtifactNotFoundError,
    DistributedTimeoutError,
    IntegrityError,
    InvalidArgumentError,
    InvalidNameError,
    MissingFileError,
    ReproError,
    RunStateError,
    SerializationError,
    StorageError,
)
from .hashing import hash_bytes, hash_file
from .maintenance import VerifyReport, verify_store
from .manager import ArtifactManager
from .store import LocalStorageBackend, StorageBackend
from .types import ArtifactMetadata, ArtifactType, Run, RunState

__version__ = "0.1.0"

__all__ = [
    "AmbiguousRankError",
    "ArtifactManager",
    "ArtifactMetadata",
    "ArtifactNotFoundError",
    "ArtifactType",
    "DistributedTimeoutError",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidNameError",
    "LocalStorageBackend",
    "MissingFileError",
    "ReproError",
    "Run",
    "RunState",
    "RunStateError",
    "SerializationError",
    "StorageBackend",
    "StorageError",
    "VerifyReport",
    "hash_bytes",
    "hash_file",
    "verify_store",
]
