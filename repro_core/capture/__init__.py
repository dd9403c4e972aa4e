"""Capture what a run needs to be reproduced: its configuration, its environment (Python,
packages, hardware, CUDA, git state, seeds) and the uncommitted code, with secrets redacted
before anything reaches the store.

Nothing here imports torch, lightning or pynvml at import time.
"""

from .config import ConfigCapture, capture_config
from .environment import EnvironmentCaptureLevel, capture_environment, installed_packages
from .git import GitCommandError, git_info, git_patch
from .gpu import gpu_info
from .redact import (
    REDACTED,
    SECRET_PATTERNS,
    Redactor,
    is_secret_name,
    redact_argv,
    redact_env,
    redact_text,
)
from .scrub import scrub, scrub_patch, scrub_text
from .seed import recorded_seed, seed_everything
from .validate import validate_environment

__all__ = [
    "REDACTED",
    "SECRET_PATTERNS",
    "ConfigCapture",
    "EnvironmentCaptureLevel",
    "GitCommandError",
    "Redactor",
    "capture_config",
    "capture_environment",
    "git_info",
    "git_patch",
    "gpu_info",
    "installed_packages",
    "is_secret_name",
    "recorded_seed",
    "redact_argv",
    "redact_env",
    "redact_text",
    "scrub",
    "scrub_patch",
    "scrub_text",
    "seed_everything",
    "validate_environment",
]
