"""A run that mirrors to a remote it cannot write, killed with SIGKILL once every queued push
has failed at least once: what it queued must survive in the registry.

    python crash_with_queue.py STORE

STORE must already name the remote ``origin``. Prints one JSON line (``{"run": id, "keys":
[...]}``) and kills itself; exits 3 when the pushes have not all failed within ``DEADLINE``
(the parent then sees exit 3, not SIGKILL, and the output says why).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

from repro_core import ArtifactManager, ArtifactType

DEADLINE = 60.0  # seconds for every queued push to fail once (it takes well under one)


def main() -> None:
    manager = ArtifactManager()
    manager.set_root(sys.argv[1])
    run = manager.init_run("crashing", config={"lr": 0.1}, remote="origin")
    data = manager.log_artifact("data", ArtifactType.DATASET, data={"rows": [1, 2, 3]})
    first = manager.log_artifact("model", ArtifactType.MODEL, data={"w": [0.0]},
                                 parent_artifacts=[data.key])
    second = manager.log_artifact("model", ArtifactType.MODEL, data={"w": [1.0]},
                                  parent_artifacts=[first.key])
    deadline = time.monotonic() + DEADLINE
    while True:
        items = manager.pending_pushes()
        if len(items) == 3 and items[0].last_error:  # (a round stops at its first failure)
            break
        if time.monotonic() > deadline:
            print(f"the first push did not fail within {DEADLINE:g} s: {items}", flush=True)
            sys.exit(3)
        time.sleep(0.05)
    print(json.dumps({"run": run.id, "keys": [data.key, first.key, second.key]}), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no finalize, no atexit: a crash


if __name__ == "__main__":
    main()
