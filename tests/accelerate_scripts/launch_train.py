"""A small Accelerate training loop with ``ReproTracker``: the worker side of
``tests/test_accelerate_launch.py``, started on every process by ``torchrun``.

Run as a script (``torchrun --nproc_per_node 2 launch_train.py --out DIR ...``), never
imported by the tests. The store is ``$REPRO_HOME``. Like ``examples/accelerate_train.py``
(Adam instead of SGD, so the optimizer has per-parameter tensors to compare), it logs
``train/loss`` and ``lr`` at every step and calls ``repro_lightning.save_state`` every
``--save-every`` steps on every process.

Each process writes, under ``--out``:

- ``rank<r>.pid``: its process id, written first;
- ``rank<r>.json`` (when it gets to the end): ``run_id`` (main process), its
  ``accelerator.device``, ``start`` (first step run), ``loaded`` (what was loaded), and every
  ``sqlite3.connect`` it made with whether it could write (``registry_connections``);
- ``<name>.rank<r>.pt``: model, optimizer and scheduler state dicts right after a load
  (``resumed``: ``--resume``; ``loaded<i>``: the i-th ``--load``).

The main process also writes ``ref<step>.pt`` (the same state dicts) right after each
``save_state`` returns (the state is logged in the background: the tests read the store to
know it is there), then the marker ``saved<step>``, and ``progress`` (the last step done)
after every step.

Faults: ``--fail-at-step N --fail-rank R`` raises on process R at the start of step N
(``--fail-where step``) or right before its ``save_state`` call of step N (``save``);
``--skip-save-rank R`` makes process R skip its ``save_state`` calls (as code calling it
under a rank condition does), so the other one waits in the barrier until it times out.
The process at fault writes the time it failed (``failed_at``) or first skipped
(``skipped_at``) just before.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import repro_lightning
from repro_lightning import ReproTracker

CONNECTIONS: list[dict[str, Any]] = []


def _audit_sqlite() -> None:
    """Record every registry connection: only the main process may open one to write."""
    real = sqlite3.connect

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        text = str(database)
        readonly = bool(kwargs.get("uri")) and ("mode=ro" in text or "immutable=1" in text)
        CONNECTIONS.append({"database": text, "readonly": readonly})
        return real(database, *args, **kwargs)

    sqlite3.connect = connect  # type: ignore[assignment]


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--project", default="acc")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--output-dir", default="ckpt")
    parser.add_argument("--explicit-dirs", action="store_true",
                        help="save_state(accelerator, <output-dir>/step_<n>): no automatic "
                             "naming, so Accelerate's save_state has no collective of its own")
    parser.add_argument("--sleep", type=float, default=0.0, help="seconds per step")
    parser.add_argument("--resume", action="store_true",
                        help="repro_lightning.load_state(accelerator, 'state:latest') first")
    parser.add_argument("--load", action="append", default=[], metavar="KEY=API",
                        help="load KEY with API 'path' (accelerator.load_state(state_path(KEY)))"
                             " or 'repro' (repro_lightning.load_state) and dump what was loaded")
    parser.add_argument("--no-tracker", action="store_true")
    parser.add_argument("--fail-at-step", type=int, default=None)
    parser.add_argument("--fail-rank", type=int, default=0)
    parser.add_argument("--fail-where", choices=["step", "save"], default="step")
    parser.add_argument("--skip-save-rank", type=int, default=None)
    return parser.parse_args()


def make_data(n: int = 256, dim: int = 8) -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, dim, generator=generator)
    y = x @ torch.randn(dim, 1, generator=generator)
    return TensorDataset(x, y)


def batches(accelerator: Accelerator, loader: Any, start: int) -> Iterator[Any]:
    skip = start % len(loader)
    while True:
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        yield from epoch_loader


def snapshot(accelerator: Accelerator, model: Any, optimizer: Any, scheduler: Any
             ) -> dict[str, Any]:
    return {"model": {k: v.detach().clone()
                      for k, v in accelerator.unwrap_model(model).state_dict().items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def write_atomic(path: Path, write: Any) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    write(temp)
    os.replace(temp, path)


class Worker:
    """One process's part of the launch: the prepared objects and what it reports."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        set_seed(0)
        self.trackers = None if args.no_tracker else [ReproTracker(project=args.project)]
        accelerator = Accelerator(
            cpu=not torch.cuda.is_available(), log_with=self.trackers,
            project_config=ProjectConfiguration(
                project_dir=args.output_dir, automatic_checkpoint_naming=not args.explicit_dirs))
        if self.trackers:
            accelerator.init_trackers(args.project, config={"steps": args.steps, "lr": 0.01})
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
        loader = DataLoader(make_data(), batch_size=8, shuffle=True)
        self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler)
        self.accelerator = accelerator
        self.rank = accelerator.process_index
        self.loaded: list[dict[str, Any]] = []

    def snapshot(self) -> dict[str, Any]:
        return snapshot(self.accelerator, self.model, self.optimizer, self.scheduler)

    def dump(self, name: str) -> None:
        torch.save(self.snapshot(), self.out / f"{name}.rank{self.rank}.pt")

    def load(self) -> int:
        """``--load`` each key, then ``--resume``; returns the step to start at."""
        for i, spec in enumerate(self.args.load):
            key, api = spec.rsplit("=", 1)
            if api == "path":
                self.accelerator.load_state(repro_lightning.state_path(key))
                self.loaded.append({"key": key, "api": api})
            else:
                self.load_logged(key)
            self.dump(f"loaded{i}")
        if not self.args.resume:
            return 0
        step = self.load_logged("state:latest")
        self.dump("resumed")
        return step + 1

    def load_logged(self, key: str) -> int:
        meta = repro_lightning.load_state(self.accelerator, key)
        assert meta is not None
        step = int(meta.metadata["step"])
        self.loaded.append({"key": key, "api": "repro", "loaded": meta.key, "step": step})
        return step

    def fail(self, step: int, where: str) -> None:
        args = self.args
        if (step, self.rank, where) == (args.fail_at_step, args.fail_rank, args.fail_where):
            (self.out / "failed_at").write_text(repr(time.time()))
            before = " before save_state" if where == "save" else ""
            raise RuntimeError(f"boom{before} at step {step} on rank {self.rank}")

    def train(self, start: int) -> None:
        args, accelerator = self.args, self.accelerator
        data = batches(accelerator, self.loader, start)
        for step in range(start, args.steps):
            self.fail(step, "step")
            x, y = next(data)
            loss = nn.functional.mse_loss(self.model(x), y)
            accelerator.backward(loss)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
            accelerator.log({"train/loss": loss.item(),
                             "lr": self.scheduler.get_last_lr()[0]}, step=step)
            if (step + 1) % args.save_every == 0:
                self.save(step)
            if accelerator.is_main_process:
                (self.out / "progress").write_text(str(step))
            if args.sleep:
                time.sleep(args.sleep)

    def save(self, step: int) -> None:
        self.fail(step, "save")
        out = self.out
        if self.rank == self.args.skip_save_rank:
            if not (out / "skipped_at").exists():
                (out / "skipped_at").write_text(repr(time.time()))
        else:
            where = os.path.join(self.args.output_dir, f"step_{step}") \
                if self.args.explicit_dirs else None
            repro_lightning.save_state(self.accelerator, where, step=step)
        if self.accelerator.is_main_process:
            write_atomic(out / f"ref{step}.pt", lambda p: torch.save(self.snapshot(), p))
            (out / f"saved{step}").write_text(str(step))

    def finish(self, start: int) -> None:
        accelerator = self.accelerator
        tracker = accelerator.get_tracker("repro") if self.trackers else None
        run_id = getattr(tracker, "run_id", None) if accelerator.is_main_process else None
        accelerator.end_training()
        write_atomic(self.out / f"rank{self.rank}.json", lambda p: p.write_text(json.dumps({
            "run_id": run_id, "device": str(accelerator.device), "start": start,
            "loaded": self.loaded, "registry_connections": CONNECTIONS,
            "num_processes": accelerator.num_processes})))


def main() -> None:
    args = parse()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))
    _audit_sqlite()
    worker = Worker(args)
    start = worker.load()
    worker.train(start)
    worker.finish(start)


if __name__ == "__main__":
    main()
