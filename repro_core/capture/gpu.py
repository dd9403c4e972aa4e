"""GPUs as NVML sees them: name, total memory, compute capability, driver version.

NVML (``nvidia-ml-py``, imported as ``pynvml``) is asked instead of torch because it needs no
CUDA context (no ~300 MB per process, safe before ``fork``) and answers even without torch.
Nothing here raises for a missing GPU: no ``pynvml``, no driver library, or a failing
``nvmlInit`` give ``devices == []`` and a ``nvml_error`` note; a call failing for one device
leaves that field None and is named in ``errors``.

NVML lists every physical GPU, ignoring ``CUDA_VISIBLE_DEVICES``; :func:`visible_indices` says
which of them a CUDA program would see when that variable holds plain indices.

``nvml_module`` lets a caller (tests, a monitor holding its own handle) pass any object with
``nvmlInit``, ``nvmlShutdown``, ``nvmlDeviceGetCount``, ``nvmlDeviceGetHandleByIndex``,
``nvmlDeviceGetName``, ``nvmlDeviceGetMemoryInfo``, ``nvmlDeviceGetCudaComputeCapability``,
``nvmlSystemGetDriverVersion`` and an ``NVMLError`` exception type.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

__all__ = ["gpu_info", "visible_indices"]

_INSTALL_HINT = "pynvml is not installed: pip install 'repro-lightning[nvml]'"


def gpu_info(nvml_module: Any | None = None) -> dict[str, Any]:
    """Describe the GPUs of this machine via NVML, never raising for a missing GPU or driver."""
    result: dict[str, Any] = {
        "devices": [], "driver_version": None, "cuda_driver_version": None,
        "nvml_error": None, "errors": [],
    }
    nvml = nvml_module if nvml_module is not None else _import_pynvml()
    if nvml is None:
        result["nvml_error"] = _INSTALL_HINT
        return result
    error_type: type[BaseException] = getattr(nvml, "NVMLError", OSError)
    try:
        nvml.nvmlInit()
        count = int(nvml.nvmlDeviceGetCount())
    except (error_type, OSError) as exc:
        result["nvml_error"] = f"NVML unavailable: {_message(exc)}"
        _shutdown(nvml, error_type)
        return result
    try:
        call = _caller(nvml, error_type, result["errors"])
        result["driver_version"] = _text(call("nvmlSystemGetDriverVersion", "system"))
        if hasattr(nvml, "nvmlSystemGetCudaDriverVersion"):
            result["cuda_driver_version"] = _cuda_version(
                call("nvmlSystemGetCudaDriverVersion", "system")
            )
        result["devices"] = [_device(call, index) for index in range(count)]
    finally:
        _shutdown(nvml, error_type)
    return result


def _import_pynvml() -> Any | None:
    try:
        import pynvml
    except ImportError:
        return None
    return pynvml


def _caller(
    nvml: Any, error_type: type[BaseException], errors: list[str]
) -> Callable[..., Any]:
    """A function calling ``nvml.<name>(*args)`` that turns an NVMLError into None + a note."""

    def call(name: str, where: str, *args: Any) -> Any:
        try:
            return getattr(nvml, name)(*args)
        except error_type as exc:
            errors.append(f"{name}({where}): {_message(exc)}")
            return None

    return call


def _device(call: Callable[..., Any], index: int) -> dict[str, Any]:
    where = f"gpu {index}"
    device: dict[str, Any] = {
        "index": index, "name": None, "memory_total_bytes": None, "compute_capability": None,
    }
    handle = call("nvmlDeviceGetHandleByIndex", where, index)
    if handle is None:
        return device
    device["name"] = _text(call("nvmlDeviceGetName", where, handle))
    memory = call("nvmlDeviceGetMemoryInfo", where, handle)
    if memory is not None:
        device["memory_total_bytes"] = int(memory.total)
    capability = call("nvmlDeviceGetCudaComputeCapability", where, handle)
    if capability is not None:
        major, minor = capability
        device["compute_capability"] = f"{major}.{minor}"
    return device


def _shutdown(nvml: Any, error_type: type[BaseException]) -> None:
    # Not initialised, or the library is gone: there is nothing to release.
    with contextlib.suppress(error_type, OSError):
        nvml.nvmlShutdown()


def _text(value: Any) -> str | None:
    """NVML returns bytes in old bindings and str in new ones."""
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _cuda_version(value: Any) -> str | None:
    """NVML encodes CUDA 12.4 as 12040."""
    if value is None:
        return None
    number = int(value)
    return f"{number // 1000}.{number % 1000 // 10}"


def _message(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def visible_indices(device_count: int) -> list[int] | None:
    """NVML indices a CUDA program sees under ``CUDA_VISIBLE_DEVICES``, or None if that cannot
    be told from the variable alone (UUIDs, MIG names): then callers must consider all GPUs."""
    raw = os.environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return list(range(device_count))
    indices: list[int] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        if not part.lstrip("-").isdigit():
            return None
        index = int(part)
        if index < 0 or index >= device_count:
            break  # CUDA stops at the first invalid ordinal
        indices.append(index)
    return indices
