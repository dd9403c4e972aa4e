"""Arguments of the Accelerate wrappers, checked before anything is written."""

from __future__ import annotations

import operator
from typing import Any

from repro_core.errors import InvalidArgumentError
from repro_core.serialize import canonical_json
from repro_core.types import validate_alias

__all__ = ["check_aliases", "check_metadata", "check_step"]

STATE_KEYS = frozenset({"run_id", "project", "step", "next_log_step", "iteration",
                       "num_processes", "distributed_type", "path", "filename", "global_step",
                       "epoch", "monitor", "score"})


def check_step(step: object) -> int | None:
    """None, or a non-negative integer (numpy integers too)."""
    if step is None:
        return None
    try:
        value = operator.index(step)  # type: ignore[arg-type]
    except TypeError:
        value = -1
    if isinstance(step, bool) or value < 0:
        raise InvalidArgumentError(f"step must be a non-negative int or None, got {step!r}",
                                   argument="step")
    return int(value)


def check_aliases(aliases: object) -> list[str]:
    if aliases is None:
        return []
    if isinstance(aliases, str) or not isinstance(aliases, (list, tuple)):
        raise TypeError(f"aliases must be a list of str, got {aliases!r}")
    checked = [validate_alias(a) for a in aliases]
    if "latest" in checked:
        raise InvalidArgumentError("'latest' is moved by repro itself to the newest version; "
                                   "pass other aliases", argument="aliases")
    return checked


def check_metadata(metadata: object, reserved: frozenset[str] = frozenset({"run_id", "project"})
                   ) -> dict[str, Any]:
    """JSON values (checked now, not in the logging thread), none under a name repro sets."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
        raise TypeError(f"metadata must be a dict with str keys, got {metadata!r}")
    taken = sorted(set(metadata) & reserved)
    if taken:
        raise InvalidArgumentError(f"metadata keys {taken} are set by repro; use other names",
                                   argument="metadata")
    canonical_json(metadata, root="metadata")  # SerializationError naming the bad entry
    return dict(metadata)
