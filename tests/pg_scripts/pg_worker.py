"""Subprocess roles for tests/test_registry_postgres.py (each a process of its own, as the
hosts of a team sharing one PostgreSQL registry would be).

    log ROOT TAG N          one run logging N distinct versions of the artifact ``shared``
    open URL ROOT           open a registry for writing (creates / upgrades its schema)
    hold URL ROOT READY GO  hold the registry's shared publish guard: touch READY, wait for GO
    capture ROOT            a run with a COMPLETE environment capture, metrics and artifacts

``REPRO_REGISTRY`` (set by the test) names the registry for ``log`` and ``capture``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path


def log(root: str, tag: str, count: str) -> None:
    from repro_core import ArtifactManager

    mgr = ArtifactManager.reset_instance()
    mgr.set_root(root)
    mgr.init_run(f"writer-{tag}", config={"tag": tag})
    for i in range(int(count)):
        mgr.log_artifact("shared", "dataset", data=f"{tag}:{i}".encode())
    mgr.finalize_run()


def open_registry(url: str, root: str) -> None:
    from repro_core.registry import Registry

    registry = Registry(url, root=root)
    registry.open()
    print(registry.store_id())


def hold(url: str, root: str, ready: str, go: str) -> None:
    from repro_core.registry import Registry

    registry = Registry(url, root=root)
    with registry.publish_guard():
        Path(ready).touch()
        deadline = time.monotonic() + 120  # never outlive a failed test by long
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def capture(root: str) -> None:
    from repro_core import ArtifactManager
    from repro_core.context import ExperimentContext

    ArtifactManager.reset_instance()
    with ExperimentContext(root=root, name="secretive", config={"lr": 0.1}, capture_level=3,
                           monitor_hardware=False) as ctx:
        ctx.log_metrics({"loss": 0.5}, step=1)
        ctx.log_artifact("weights", "model", data=b"w" * 64)


if __name__ == "__main__":
    roles: dict[str, Callable[..., None]] = {
        "log": log, "open": open_registry, "hold": hold, "capture": capture}
    roles[sys.argv[1]](*sys.argv[2:])
