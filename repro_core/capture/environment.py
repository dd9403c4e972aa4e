"""What a run ran on, as a JSON-safe dict, at three levels; each level adds keys to the last.

=========  =====================================================================================
BASIC      capture_level, python, platform, hostname, command (``sys.argv``), cwd,
           repro_version, frameworks (torch/lightning/accelerate versions), git
STANDARD   + packages (every installed distribution), cpu, memory, cuda, gpu (NVML),
           determinism, seeds
COMPLETE   + git.patch / git.untracked, conda, container, env_vars (redacted)
=========  =====================================================================================

Cheap by construction (STANDARD well under a second): package versions come from
``importlib.metadata`` of the running interpreter — never a ``pip`` subprocess, which may belong
to another interpreter and was cut to 50 lines in the original; git runs with a timeout.

**torch is never imported just to be described** at BASIC/STANDARD: importing it costs ~1 s.
``cuda`` and ``determinism.torch`` are filled when torch is already in ``sys.modules`` (any
training script has imported it by the time it captures), or when ``import_torch=True``;
COMPLETE imports it by default (``import_torch=None``) since it is the exhaustive level.
Otherwise the sections say ``torch_imported: False``. GPU facts come from NVML, not torch.

No timestamp is stored: the run has its own, and identical environments then deduplicate to
one artifact version. Every string of the result is scrubbed by :mod:`.redact` at the end, so a
credential in a URL is removed wherever it appears (argv, git remote, patch, env values); the
``git`` section is scrubbed by :func:`~.git.git_info` (the patch as a diff: code files by their
string literals only, so bare code is never mangled).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import sys
from enum import IntEnum
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name

from ..errors import InvalidArgumentError
from .git import git_info
from .gpu import gpu_info
from .redact import Redactor
from .seed import recorded_seed

__all__ = ["EnvironmentCaptureLevel", "capture_environment", "installed_packages"]

_FRAMEWORKS = ("torch", "lightning", "pytorch-lightning", "accelerate")
_CPU_MODEL_KEYS = ("model name", "hardware", "cpu model", "processor")
_CONTAINER_WORDS = ("docker", "kubepods", "containerd", "libpod", "lxc")


class EnvironmentCaptureLevel(IntEnum):
    """Levels of environment capture detail; each level includes the one before."""

    BASIC = 1
    STANDARD = 2
    COMPLETE = 3


def capture_environment(
    level: EnvironmentCaptureLevel | int | str = EnvironmentCaptureLevel.STANDARD,
    *,
    path: str | Path | None = None,
    import_torch: bool | None = None,
    nvml_module: Any | None = None,
    redact_allow: list[str] | None = None,
    redact_deny: list[str] | None = None,
    max_patch_bytes: int | None = None,
) -> dict[str, Any]:
    """Capture the environment at ``level``; ``path`` is where git looks (default: cwd).

    ``redact_allow`` / ``redact_deny`` add name patterns to ``REPRO_REDACT_ALLOW`` /
    ``REPRO_REDACT_DENY``; ``max_patch_bytes`` caps ``git.patch`` (``REPRO_MAX_PATCH_BYTES``,
    default 1 MiB). ``nvml_module`` replaces ``pynvml`` (tests, callers holding a handle).
    """
    lvl = coerce_level(level)
    redactor = Redactor.from_settings(redact_allow, redact_deny)
    complete = lvl >= EnvironmentCaptureLevel.COMPLETE
    env = _basic(lvl, redactor)
    git = git_info(path, patch=complete, max_patch_bytes=max_patch_bytes, redactor=redactor)
    env["git"] = None  # keeps the key order; filled after the tree scrub below
    if lvl >= EnvironmentCaptureLevel.STANDARD:
        torch = _torch(complete if import_torch is None else import_torch)
        env.update(
            packages=installed_packages(), cpu=_cpu(), memory=_memory(), cuda=_cuda(torch),
            gpu=gpu_info(nvml_module), determinism=_determinism(torch), seeds=_seeds(),
        )
    if complete:
        env.update(conda=_conda(), container=_container(), env_vars=redactor.env(os.environ))
    scrubbed: dict[str, Any] = redactor.tree(env)
    scrubbed["git"] = git  # scrubbed by git_info: its patch as a diff, not as free text
    return scrubbed


def coerce_level(level: EnvironmentCaptureLevel | int | str) -> EnvironmentCaptureLevel:
    """Accept the enum, its int value, or its name in any case; reject anything else."""
    try:
        if isinstance(level, str):
            return EnvironmentCaptureLevel[level.strip().upper()]
        if not isinstance(level, bool):
            return EnvironmentCaptureLevel(level)
    except (KeyError, ValueError):
        pass
    raise InvalidArgumentError(
        f"level must be one of {[m.name for m in EnvironmentCaptureLevel]} (or 1-3), "
        f"got {level!r}",
        argument="level",
    )


def _basic(level: EnvironmentCaptureLevel, redactor: Redactor) -> dict[str, Any]:
    from .. import __version__

    return {
        "capture_level": level.name,
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "platform": {
            "system": platform.system(), "release": platform.release(),
            "machine": platform.machine(), "platform": platform.platform(),
        },
        "hostname": socket.gethostname(),
        "command": redactor.argv(sys.argv),
        "cwd": os.getcwd(),
        "repro_version": __version__,
        "frameworks": {name: _version(name) for name in _FRAMEWORKS},
    }


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def installed_packages() -> dict[str, str]:
    """Every distribution the running interpreter can import, by canonical (PEP 503) name.

    When one name is installed twice on ``sys.path``, the first wins, as it does for ``import``.
    """
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.name  # None for a broken install without METADATA
        if name:
            found.setdefault(canonicalize_name(name), dist.version)
    return dict(sorted(found.items()))


def _cpu() -> dict[str, Any]:
    import psutil

    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "model": _cpu_model(),
        "architecture": platform.machine(),
        "physical_cores": psutil.cpu_count(logical=False),
        "logical_cores": psutil.cpu_count(logical=True),
        # What this process may use (taskset, cgroups, SLURM), often fewer than the machine has.
        "usable_cores": len(affinity(0)) if affinity is not None else None,
    }


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip().lower(), value.strip()
                # x86 "processor" is the core index (a digit); ARM's is the model name.
                if key in _CPU_MODEL_KEYS and value and not value.isdigit():
                    return value
    except OSError:
        pass
    return platform.processor() or None


def _memory() -> dict[str, int]:
    import psutil

    return {
        "total_bytes": int(psutil.virtual_memory().total),
        "swap_total_bytes": int(psutil.swap_memory().total),
    }


def _torch(allow_import: bool) -> Any | None:
    torch = sys.modules.get("torch")
    if torch is not None or not allow_import:
        return torch
    try:
        import torch
    except ImportError:
        return None
    return torch


_NO_TORCH = "torch not imported; pass import_torch=True (costs ~1 s) or capture after importing it"


def _cuda(torch: Any | None) -> dict[str, Any]:
    """CUDA/cuDNN/NCCL as torch was built with. ``device_count`` asks NVML first in torch, so
    this does not initialise CUDA (which would break ``fork`` later)."""
    section: dict[str, Any] = {
        "torch_imported": torch is not None,
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if torch is None:
        return {**section, "note": _NO_TORCH}
    count = int(torch.cuda.device_count())
    return {
        **section,
        "torch_version": str(torch.__version__),
        "cuda_version": torch.version.cuda,
        "cudnn_version": torch.backends.cudnn.version(),
        "nccl_version": _nccl_version(torch),
        "cuda_available": count > 0,
        "device_count": count,
    }


def _nccl_version(torch: Any) -> str | None:
    try:
        version = torch.cuda.nccl.version()
    except (AttributeError, RuntimeError):  # CPU builds have no NCCL
        return None
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def _determinism(torch: Any | None) -> dict[str, Any]:
    section: dict[str, Any] = {
        "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED"),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "torch": None,
    }
    if torch is None:
        return {**section, "note": _NO_TORCH}
    section["torch"] = {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        # TF32 changes float32 results on Ampere+; it belongs with the determinism switches.
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "cuda_matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "num_threads": torch.get_num_threads(),
    }
    return section


def _seeds() -> dict[str, Any]:
    return {
        "repro": recorded_seed(),
        "PL_GLOBAL_SEED": os.environ.get("PL_GLOBAL_SEED"),
        "PL_SEED_WORKERS": os.environ.get("PL_SEED_WORKERS"),
    }


def _conda() -> dict[str, str | None] | None:
    name, prefix = os.environ.get("CONDA_DEFAULT_ENV"), os.environ.get("CONDA_PREFIX")
    return None if name is None and prefix is None else {"env": name, "prefix": prefix}


def _container() -> dict[str, Any]:
    try:
        cgroup = Path("/proc/1/cgroup").read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux, or hidden by the sandbox
        cgroup = ""
    hints = [line for line in cgroup.splitlines() if any(w in line for w in _CONTAINER_WORDS)]
    info: dict[str, Any] = {
        "dockerenv": os.path.exists("/.dockerenv"),
        "containerenv": os.path.exists("/run/.containerenv"),  # podman
        "kubernetes": "KUBERNETES_SERVICE_HOST" in os.environ,
        "cgroup_hints": hints[:20],
    }
    info["in_container"] = bool(
        info["dockerenv"] or info["containerenv"] or info["kubernetes"] or hints
    )
    return info
