"""A single-process Accelerate program that never calls ``end_training``: how it ends decides
how its repro run ends (``test_accelerate_tracker``).

    python single_exit.py raise|exit0|loop|crash MARKER

``raise``: an uncaught exception after three logs; ``exit0``: ``sys.exit(0)`` after three
logs; ``loop``: trains and logs forever, saving a state every 5 steps (MARKER is written after
the first save), until SIGTERM; ``crash``: trains and logs steps 3..5, saves a state at
step 5, waits until it is logged, logs step 6 and dies at once (``os._exit``: no atexit, as
``kill -9``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator

import repro_lightning
from repro_lightning import ReproTracker


def main(mode: str, marker: Path) -> None:
    accelerator = Accelerator(cpu=True, log_with=[ReproTracker(project="exits",
                                                               monitor_hardware=False)])
    accelerator.init_trackers("exits", config={"mode": mode})
    for step in range(3):
        accelerator.log({"loss": float(step + 1)}, step=step)
    if mode == "raise":
        raise ZeroDivisionError("the loss went to pieces")
    if mode == "exit0":
        sys.exit(0)
    if mode == "interrupt":
        raise KeyboardInterrupt  # what Ctrl-C raises
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
    for step in range(3, 100_000):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.log({"loss": loss.item()}, step=step)
        if step % 5 == 0 and mode == "loop":
            repro_lightning.save_state(accelerator, marker.parent / f"state_{step}", step=step)
            if not marker.exists():
                marker.write_text("training")
        if mode == "crash" and step == 5:
            repro_lightning.save_state(accelerator, marker.parent / "state_crash", step=step)
            assert accelerator.get_tracker("repro").last_state is not None  # (logged)
            accelerator.log({"loss": 0.0}, step=6)
            os._exit(9)
        time.sleep(0.02)
    print("loop finished")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
