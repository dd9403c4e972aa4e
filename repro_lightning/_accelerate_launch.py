"""What an Accelerate launch looks like, for the run's ``environment`` artifact.

The generic capture sees one process; a launch is many. This reads Accelerate's own state
singletons (never creating them: reading must not initialise a process group) and the
launcher's environment variables, so a run records world size, machines, distributed type,
mixed precision, gradient accumulation and where each process runs. Per-process devices are
derived from Accelerate's placement rule (process ``i`` on machine ``i // n_local`` uses local
device ``i % n_local``), since asking the other processes would take a collective on a
main-process-only path. ``ACCELERATE_*`` and the launcher's variables are kept with secret
names redacted as in the ``env_vars`` of a COMPLETE capture.
"""

from __future__ import annotations

import os
from typing import Any

from repro_core.capture.redact import Redactor

__all__ = ["launch_info"]

_LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                  "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                  "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS")


def launch_info() -> dict[str, Any]:
    """``{"accelerate": {...}}``: the launch as this (main) process sees it. A failure to
    read Accelerate's state is recorded in the section, never loses the environment."""
    info: dict[str, Any] = {"version": _accelerate_version()}
    try:
        info.update(_partial_state())
        info.update(_accelerator_state())
    except Exception as exc:  # (an Accelerate whose state classes changed)
        info["error"] = repr(exc)
    info["env"] = Redactor.from_settings().env(
        {k: v for k, v in os.environ.items() if k.startswith("ACCELERATE_") or k in _LAUNCHER_VARS})
    return {"accelerate": info}


def _accelerate_version() -> str | None:
    try:
        import accelerate
    except ImportError:
        return None
    return str(getattr(accelerate, "__version__", None))


def _partial_state() -> dict[str, Any]:
    from accelerate.state import PartialState

    if not PartialState._shared_state:  # not initialised: say so rather than initialise it
        return {"initialized": False}
    state = PartialState()
    world = int(state.num_processes)
    local = _local_world_size(world)
    device = getattr(state, "device", None)
    return {
        "initialized": True,
        "distributed_type": _name(state.distributed_type),
        "world_size": world,
        "num_machines": max(1, world // local) if local else 1,
        "processes_per_machine": local,
        "process_index": int(state.process_index),
        "device": str(device) if device is not None else None,  # this (main) process's
        "devices": _devices(device, world, local),
        "backend": getattr(state, "backend", None),
    }


def _accelerator_state() -> dict[str, Any]:
    from accelerate.state import AcceleratorState, GradientState

    out: dict[str, Any] = {}
    if AcceleratorState._shared_state:
        state = AcceleratorState()
        out["mixed_precision"] = str(getattr(state, "mixed_precision", None))
        out["dynamo_backend"] = _name(getattr(state, "dynamo_plugin", None) and
                                      getattr(state.dynamo_plugin, "backend", None))
    if GradientState._shared_state:
        gradient = GradientState()
        out["gradient_accumulation_steps"] = int(getattr(gradient, "num_steps", 1) or 1)
    return out


def _local_world_size(world: int) -> int:
    """Processes per machine: the launcher's LOCAL_WORLD_SIZE (torchrun, accelerate launch),
    else all processes on this machine."""
    raw = os.environ.get("LOCAL_WORLD_SIZE")
    try:
        local = int(raw) if raw is not None else world
    except ValueError:
        local = world
    return local if 0 < local <= world else world


def _devices(device: Any, world: int, local: int) -> list[dict[str, Any]]:
    """Accelerators are indexed by local process (``cuda:<local rank>``); every CPU process
    uses "the" CPU (Accelerate may name it ``cpu:0`` on each, which says nothing)."""
    kind = getattr(device, "type", None) or "cpu"
    indexed = kind != "cpu" and getattr(device, "index", None) is not None
    return [{"process_index": i, "machine": i // local,
             "device": f"{kind}:{i % local}" if indexed else kind} for i in range(world)]


def _name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "value", value))
