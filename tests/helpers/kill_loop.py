"""Run a logging loop in a child, SIGKILL it mid-flight, and say what it had logged when."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

SEED_VARIABLE = "REPRO_TEST_SEED"


def seeded_rng(label: str) -> random.Random:
    """A ``Random`` for kill timings, seeded from ``$REPRO_TEST_SEED`` or at random; the seed
    is printed (pytest shows it with a failure) so a failing schedule can be replayed."""
    raw = os.environ.get(SEED_VARIABLE, "").strip()
    seed = int(raw) if raw else int.from_bytes(os.urandom(4), "little")
    print(f"{label}: random seed {seed} (replay: {SEED_VARIABLE}={seed})", flush=True)
    return random.Random(seed)


def kill_after(code: str, args: list[str], seconds: float, slack: float
               ) -> tuple[str, int, int]:
    """Run ``python -c code *args``; its first stdout line is an id, then progress counts.

    After ``seconds`` the child is SIGKILLed. Returns ``(first_line, must_have, logged)``:
    ``must_have`` is the count it had reported ``slack`` seconds before the kill (what must be
    durable by then), ``logged`` the last count it reported.
    """
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline().strip()
    seen: list[tuple[float, int]] = []
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        seen.append((time.monotonic(), int(proc.stdout.readline())))
    proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    proc.wait()
    must_have = max((i for t, i in seen if t <= killed_at - slack), default=0)
    return first, must_have, seen[-1][1]
