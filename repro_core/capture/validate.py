"""Check that this machine can run an experiment before it starts, with reasons.

Requirements are PEP 508 strings (``"torch>=2.3"``; a bare name means "installed"), compared as
PEP 440 versions — the original compared CUDA versions as text ("12.1" < "9.0"). Every unmet
requirement is an *error* (``is_valid`` False); warnings are things that could not be checked.
GPU memory is counted in GiB (2**30 bytes, nvidia-smi's MiB / 1024).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import sys
from collections.abc import Iterable
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from ..errors import InvalidArgumentError
from .gpu import gpu_info, visible_indices

__all__ = ["detect_cuda_version", "validate_environment"]

_GIB = 1 << 30


def validate_environment(
    required_packages: Iterable[str] | None = None,
    min_gpu_memory_gb: float = 0,
    min_cuda_version: str | None = None,
    *,
    cuda_version: str | None = None,
    nvml_module: Any | None = None,
) -> dict[str, Any]:
    """Return ``{"is_valid", "errors", "warnings", "packages", "gpus", "cuda_version"}``.

    ``cuda_version`` overrides detection (:func:`detect_cuda_version`); ``nvml_module`` replaces
    ``pynvml``. Malformed arguments raise ``InvalidArgumentError`` before anything is checked.
    """
    requirements = _parse_requirements(required_packages)
    minimum_cuda = _parse_version(min_cuda_version, "min_cuda_version")
    _check_memory_argument(min_gpu_memory_gb)
    result: dict[str, Any] = {
        "is_valid": True, "errors": [], "warnings": [], "packages": {}, "gpus": [],
        "cuda_version": None, "cuda_version_source": None,
    }
    for requirement in requirements:
        _check_package(requirement, result)
    gpus = gpu_info(nvml_module)
    result["gpus"] = gpus["devices"]
    result["warnings"].extend(f"NVML: {e}" for e in gpus["errors"])
    if min_gpu_memory_gb > 0:
        _check_gpu_memory(gpus, float(min_gpu_memory_gb), result)
    if minimum_cuda is not None:
        _check_cuda(minimum_cuda, cuda_version, gpus, result)
    result["is_valid"] = not result["errors"]
    return result


def _parse_requirements(required: Iterable[str] | None) -> list[Requirement]:
    if required is None:
        return []
    if isinstance(required, str):
        raise InvalidArgumentError(
            f"required_packages must be a list of requirement strings, got the string "
            f"{required!r}; write [{required!r}]",
            argument="required_packages",
        )
    parsed = []
    for text in required:
        try:
            parsed.append(Requirement(text))
        except (InvalidRequirement, TypeError) as exc:
            raise InvalidArgumentError(
                f"required_packages entry {text!r} is not a valid requirement ({exc}); expected "
                "e.g. 'torch', 'torch>=2.3' or 'numpy>=1.24,<3'",
                argument="required_packages",
            ) from exc
    return parsed


def _parse_version(text: str | None, argument: str) -> Version | None:
    if text is None:
        return None
    try:
        return Version(str(text))
    except InvalidVersion as exc:
        raise InvalidArgumentError(
            f"{argument}={text!r} is not a version; expected e.g. '12.1'", argument=argument
        ) from exc


def _check_memory_argument(value: float) -> None:
    if (
        isinstance(value, bool) or not isinstance(value, (int, float))
        or not math.isfinite(value) or value < 0
    ):
        raise InvalidArgumentError(
            f"min_gpu_memory_gb must be a finite number >= 0, got {value!r}",
            argument="min_gpu_memory_gb",
        )


def _check_package(requirement: Requirement, result: dict[str, Any]) -> None:
    name = requirement.name
    if requirement.marker is not None and not requirement.marker.evaluate():
        result["warnings"].append(f"{requirement}: marker does not apply here, not checked")
        return
    try:
        installed: str | None = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    result["packages"][name] = installed
    if installed is None:
        result["errors"].append(f"{name} is not installed (required: {requirement})")
        return
    if requirement.extras:
        result["warnings"].append(f"{name}: extras {sorted(requirement.extras)} not checked")
    if not requirement.specifier:
        return
    try:
        version = Version(installed)
    except InvalidVersion:
        result["errors"].append(
            f"{name} {installed} is not a PEP 440 version; cannot check {requirement.specifier}"
        )
        return
    # prereleases=True: an installed nightly (2.5.0.dev…) satisfies ">=2.3" — it is what runs.
    if not requirement.specifier.contains(version, prereleases=True):
        result["errors"].append(
            f"{name} {installed} is installed but {requirement} is required"
        )


def _check_gpu_memory(gpus: dict[str, Any], minimum_gib: float, result: dict[str, Any]) -> None:
    devices = gpus["devices"]
    visible = visible_indices(len(devices))
    if visible is None:
        result["warnings"].append(
            "CUDA_VISIBLE_DEVICES names GPUs by UUID/MIG id; every GPU was checked"
        )
    else:
        devices = [d for d in devices if d["index"] in visible]
    if not devices:
        reason = gpus["nvml_error"] or "NVML reports no visible GPU"
        result["errors"].append(f"{minimum_gib:g} GiB of GPU memory required but no GPU found "
                                f"({reason})")
        return
    for device in devices:
        total = device["memory_total_bytes"]
        label = f"GPU {device['index']} ({device['name']})"
        if total is None:
            result["errors"].append(f"{label}: memory size unknown, {minimum_gib:g} GiB required")
        elif total < minimum_gib * _GIB:
            result["errors"].append(
                f"{label} has {total / _GIB:.2f} GiB, below the required {minimum_gib:g} GiB"
            )


def _check_cuda(
    minimum: Version, override: str | None, gpus: dict[str, Any], result: dict[str, Any]
) -> None:
    found: str | None
    if override is not None:
        found, source = override, "argument"
    else:
        found, source = detect_cuda_version(gpus)
    result["cuda_version"], result["cuda_version_source"] = found, source
    if found is None:
        result["errors"].append(f"CUDA >= {minimum} required but no CUDA found ({source})")
        return
    try:
        version = Version(found)
    except InvalidVersion:
        result["errors"].append(f"CUDA version {found!r} ({source}) cannot be compared")
        return
    if version < minimum:
        result["errors"].append(f"CUDA {found} ({source}) is older than the required {minimum}")


def detect_cuda_version(gpus: dict[str, Any] | None = None) -> tuple[str | None, str]:
    """The CUDA version a run would use and where it came from.

    With torch installed it is ``torch.version.cuda`` (None for a CPU build: torch cannot use
    the GPU whatever the driver supports); without torch, the newest CUDA the NVML driver
    supports. Imports torch only when installed — called only if a minimum was asked for.
    """
    if "torch" in sys.modules or importlib.util.find_spec("torch") is not None:
        import torch

        cuda = torch.version.cuda
        return cuda, "torch.version.cuda" if cuda else "torch is a CPU-only build"
    info = gpus if gpus is not None else gpu_info()
    driver = info.get("cuda_driver_version")
    return driver, "NVML driver" if driver else (info.get("nvml_error") or "no NVML driver")
