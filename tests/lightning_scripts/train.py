"""Fit ``TinyModel`` in a fresh interpreter: the subprocess side of the Lightning adapter tests.

Run as a script (``python train.py --out DIR ...``), never imported by the tests. It must be a
file: with ``--devices 2`` Lightning's subprocess launcher starts rank 1 by running this same
file with the same arguments. The store is ``$REPRO_HOME``.

Each rank writes, under ``--out``:

- ``<tag>.rank<r>.pid``: its process id, written first;
- ``<tag>.rank<r>.json``: ``run_id``, ``global_step``, ``pickle_calls`` (unpickling attempted
  during ``trainer.fit``, see ``--pickle``) and ``registry_connections`` (every
  ``sqlite3.connect`` this process made, with whether it could write);
- ``<tag>.rank<r>.weights.pt``: the model's state dict after ``fit``;
- ``<tag>.rank<r>.optimizer.pt``: the optimizer's state dict when training starts (after a
  checkpoint was restored).

Rank 0 also touches ``--marker`` when training starts (for tests that signal it mid-fit).

``--format``: ``safetensors`` / ``torch`` (``ReproCallback(checkpoint_format=...)``) or
``none`` (no repro at all: Lightning's own pickle checkpoints, ``repro_lightning`` not even
imported). ``--resume PATH`` or ``--resume-key KEY`` (``repro_lightning.checkpoint_path``)
is passed to ``trainer.fit(ckpt_path=...)``. ``--pickle forbid`` makes ``pickle.Unpickler`` and
``torch.load`` raise during that ``fit``; ``count`` only counts their uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning.pytorch as pl
import torch
from common import TinyModel, trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

CONNECTIONS: list[dict[str, Any]] = []


def _audit_sqlite() -> None:
    """Record every registry connection: a rank other than 0 must never open one to write."""
    real = sqlite3.connect

    def connect(database: Any, *args: Any, **kwargs: Any) -> sqlite3.Connection:
        text = str(database)
        readonly = bool(kwargs.get("uri")) and ("mode=ro" in text or "immutable=1" in text)
        CONNECTIONS.append({"database": text, "readonly": readonly})
        return real(database, *args, **kwargs)

    sqlite3.connect = connect  # type: ignore[assignment]


@contextlib.contextmanager
def pickle_guard(mode: str) -> Iterator[list[str]]:
    calls: list[str] = []
    if mode == "allow":
        yield calls
        return
    real_unpickler, real_load = pickle.Unpickler, torch.load

    class GuardedUnpickler(real_unpickler):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            calls.append("pickle.Unpickler")
            if mode == "forbid":
                raise RuntimeError("pickle.Unpickler used during trainer.fit")
            super().__init__(*args, **kwargs)

    def guarded_load(*args: Any, **kwargs: Any) -> Any:
        calls.append("torch.load")
        if mode == "forbid":
            raise RuntimeError("torch.load used during trainer.fit")
        return real_load(*args, **kwargs)

    pickle.Unpickler = GuardedUnpickler  # type: ignore[misc]
    torch.load = guarded_load
    try:
        yield calls
    finally:
        pickle.Unpickler = real_unpickler  # type: ignore[misc]
        torch.load = real_load


class Probe(pl.Callback):
    """Marker file and optimizer dump at train start; an optional pause after each step."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = Path(self.args.out)
        torch.save(trainer.optimizers[0].state_dict(),
                   out / f"{self.args.tag}.rank{trainer.global_rank}.optimizer.pt")
        if self.args.marker and trainer.global_rank == 0:
            Path(self.args.marker).write_text(str(trainer.global_step))

    def on_train_batch_end(self, *args: Any) -> None:
        if self.args.step_sleep:
            time.sleep(self.args.step_sleep)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", default="fit")
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--project", default="lit")
    parser.add_argument("--format", choices=["safetensors", "torch", "none"],
                        default="safetensors")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--every", type=int, default=2, help="checkpoint every N steps")
    parser.add_argument("--batches", type=int, default=3, help="training batches per epoch")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--resume")
    parser.add_argument("--resume-key")
    parser.add_argument("--pickle", choices=["allow", "forbid", "count"], default="allow")
    parser.add_argument("--marker")
    parser.add_argument("--step-sleep", type=float, default=0.0)
    parser.add_argument("--fail-at-step", type=int)
    parser.add_argument("--fail-rank", type=int)
    return parser.parse_args()


def main() -> None:
    args = parse()
    rank = int(os.environ.get("LOCAL_RANK", "0"))  # (set by Lightning's launcher for rank 1)
    Path(args.out, f"{args.tag}.rank{rank}.pid").write_text(str(os.getpid()))
    _audit_sqlite()
    pl.seed_everything(args.seed)
    callbacks: list[Any] = [
        ModelCheckpoint(dirpath=args.ckpt_dir, filename="{step}", every_n_train_steps=args.every,
                        save_top_k=-1, save_last=True),
        Probe(args),
    ]
    repro = None
    if args.format != "none":
        import repro_lightning

        repro = repro_lightning.ReproCallback(project=args.project,
                                              checkpoint_format=args.format,
                                              monitor_hardware=False)
        callbacks.insert(0, repro)
    extra: dict[str, Any] = {"devices": args.devices}
    if args.devices > 1:
        extra["strategy"] = "ddp"
    trainer = pl.Trainer(callbacks=callbacks, **trainer_kwargs(
        max_steps=args.max_steps, max_epochs=-1, limit_train_batches=args.batches,
        limit_val_batches=0, deterministic=True, **extra))
    model = TinyModel(fail_at_step=args.fail_at_step, fail_rank=args.fail_rank)
    ckpt_path = args.resume
    if args.resume_key:
        import repro_lightning

        ckpt_path = repro_lightning.checkpoint_path(args.resume_key)
    with pickle_guard(args.pickle) as calls:
        trainer.fit(model, ckpt_path=ckpt_path)
    out = Path(args.out)
    torch.save(model.state_dict(), out / f"{args.tag}.rank{rank}.weights.pt")
    result = {"run_id": repro.run_id if repro is not None else None,
              "global_step": trainer.global_step, "pickle_calls": calls,
              "ckpt_path": ckpt_path, "registry_connections": CONNECTIONS}
    (out / f"{args.tag}.rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
