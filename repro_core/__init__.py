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
from .lineage import LineageNode, LineageTracker
from .lineage_render import render_svg
from .maintenance import GcReport, VerifyReport, collect_garbage, verify_store
from .manager import ArtifactManager
from .monitor import HardwareMonitor
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
    "GcReport",
    "HardwareMonitor",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidNameError",
    "LineageNode",
    "LineageTracker",
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
    "collect_garbage",
    "hash_bytes",
    "hash_file",
    "render_svg",
    "verify_store",
]
