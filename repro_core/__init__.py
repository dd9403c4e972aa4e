"""repro_core: reproducible runs, content-addressed artifacts and lineage, framework-free.

Importing this package never imports torch, lightning or wandb; they are loaded lazily when a
tensor, a GPU or a backend is actually used.
"""

from .capture import (
    ConfigCapture,
    EnvironmentCaptureLevel,
    capture_config,
    capture_environment,
    seed_everything,
    validate_environment,
)
from .context import ExperimentContext
from .decorators import checkpoint, reproducible, track_artifacts
from .diff import diff_runs
from .distributed import rank_zero_only
from .errors import (
    AmbiguousRankError,
    ArtifactNotFoundError,
    DistributedTimeoutError,
    IntegrityError,
    InvalidArgumentError,
    InvalidNameError,
    MissingFileError,
    RankMismatchError,
    RegistryDamagedError,
    ReproError,
    RunStateError,
    SerializationError,
    StorageError,
    StoreNotFoundError,
)
from .hashing import hash_bytes, hash_file
from .lineage import LineageNode, LineageTracker, render_svg
from .maintenance import GcReport, VerifyReport, collect_garbage, verify_store
from .manager import ArtifactManager
from .monitor import HardwareMonitor
from .recover import RecoverReport, recover_store
from .reporting import report
from .store import LocalStorageBackend, StorageBackend
from .store.wandb_backend import WandBStorageBackend
from .ttrl import TTRLContext
from .types import ArtifactMetadata, ArtifactType, Run, RunState

__version__ = "0.1.0"

__all__ = [
    "AmbiguousRankError",
    "ArtifactManager",
    "ArtifactMetadata",
    "ArtifactNotFoundError",
    "ArtifactType",
    "ConfigCapture",
    "DistributedTimeoutError",
    "EnvironmentCaptureLevel",
    "ExperimentContext",
    "GcReport",
    "HardwareMonitor",
    "IntegrityError",
    "InvalidArgumentError",
    "InvalidNameError",
    "LineageNode",
    "LineageTracker",
    "LocalStorageBackend",
    "MissingFileError",
    "RankMismatchError",
    "RecoverReport",
    "RegistryDamagedError",
    "ReproError",
    "Run",
    "RunState",
    "RunStateError",
    "SerializationError",
    "StorageBackend",
    "StorageError",
    "StoreNotFoundError",
    "TTRLContext",
    "VerifyReport",
    "WandBStorageBackend",
    "capture_config",
    "capture_environment",
    "checkpoint",
    "collect_garbage",
    "diff_runs",
    "hash_bytes",
    "hash_file",
    "rank_zero_only",
    "recover_store",
    "render_svg",
    "report",
    "reproducible",
    "seed_everything",
    "track_artifacts",
    "validate_environment",
    "verify_store",
]
