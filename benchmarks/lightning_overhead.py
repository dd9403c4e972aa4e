"""What ReproCallback costs a Lightning run, beside plain Lightning and W&B offline artifacts.

    python benchmarks/lightning_overhead.py [--repeats 3] [--epochs 6] [--size-gb 2]
                                            [--part all|train|save] [--quick]

**Training** (same model, data, seed and steps; one ``ModelCheckpoint(monitor="val_loss",
save_top_k=1, save_last=True)``, so two checkpoint files per epoch):

- (a) a plain ``Trainer`` (``logger=False``): Lightning writes its checkpoints with ``torch.save``;
- (b) (a) + ``ReproCallback(project=...)`` with its defaults: run, config, environment
  (STANDARD), hardware monitor, every ``self.log`` value, and every checkpoint logged into a
  fresh store (safetensors, hashed, fsynced: ``REPRO_FSYNC=full``) and linked at its path;
- (c) (a) + a ``WandbLogger`` with ``WANDB_MODE=offline`` that logs every checkpoint as a W&B
  artifact (``wandb.Artifact`` + ``add_file`` + ``log_artifact``, Lightning's own
  ``log_model="all"`` code path: ``log_model`` itself refuses ``offline=True``), timed up to
  the end of ``wandb.finish()``, which waits for the artifacts.

Each round runs (a), (b) and (c) once each, in an order rotated from round to round, each in a
fresh interpreter that first runs a short untimed warm-up fit (nothing one variant leaves
behind, such as the W&B service process, can slow another); the time of a variant is the
wall time from building its ``Trainer`` to the end of ``fit`` (+ ``wandb.finish()``), so each
pays its one-time costs (a new store, the W&B service) as a real job does; imports are not
timed. The table gives the median over rounds, then each round's ratio to (a), and the CPU
seconds used meanwhile (every thread of the process, plus the W&B service process; they tell
work from waiting, but on a shared machine they grow with contention too).

Training uses one torch thread (``--threads``): with two OpenMP threads on a busy 2-core
machine every other runnable thread (another job's, or a background writer's) makes each
kernel wait for a straggler, and a 224-step epoch took 10-24 s instead of 1.3 s here, which
measures the scheduler, not the callback. (On a GPU the training loop is one CPU thread too.)

**A big checkpoint**: a state dict of ``--size-gb`` of float32 tensors (default 2 GB, less if
the machine's available memory cannot hold it three times) saved by ``trainer.save_checkpoint``
through ``SafetensorsCheckpointIO`` with an active ``ReproCallback`` run (streamed into the
store, hashed, linked at the path), against a bare ``safetensors.torch.save_file`` of the same
tensors to the same disk, without and with ``fsync`` (``REPRO_FSYNC=none`` / ``full``), plus
Lightning's default ``TorchCheckpointIO`` for reference. Dirty pages are flushed (``sync``,
untimed) before every measurement, and each interpreter first writes the whole state dict once,
untimed. Median over ``--repeats`` fresh interpreters, in an order rotated from round to round.

Prints Markdown tables. ``--quick`` is a seconds-long smoke run (tiny model, 20 MB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import torch
import wandb
from _measure import cpu_seconds, run_worker
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset

from repro_core import ArtifactManager, constants
from repro_lightning import ReproCallback

_MARK = "RESULT "
_TRAIN = {"a": "(a) Trainer + ModelCheckpoint",
          "b": "(b) (a) + ReproCallback",
          "c": "(c) (a) + WandbLogger offline, checkpoints as W&B artifacts"}
_SAVE = {"st": "`safetensors.torch.save_file`",
         "st_fsync": "`safetensors.torch.save_file` + fsync",
         "torch": "Lightning default (`TorchCheckpointIO`, torch.save)",
         "repro_none": "**SafetensorsCheckpointIO + ReproCallback**, REPRO_FSYNC=none",
         "repro_full": "**SafetensorsCheckpointIO + ReproCallback**, REPRO_FSYNC=full"}
# The ratio each save row is compared with: the bare write of the same durability.
_TWIN = {"st": "st", "st_fsync": "st_fsync", "torch": "st", "repro_none": "st",
         "repro_full": "st_fsync"}


# -- training: (a), (b), (c) ----------------------------------------------------------------

class Classifier(L.LightningModule):
    def __init__(self, features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, classes))

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, _: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class ArtifactWandbLogger(WandbLogger):
    """``WandbLogger(log_model="all")``, offline: each checkpoint ``ModelCheckpoint`` writes
    becomes a W&B artifact in ``after_save_checkpoint`` (Lightning's own code for it:
    ``wandb.Artifact(...)``, ``add_file``, ``run.log_artifact``). ``log_model`` refuses
    ``offline=True`` in the constructor, so it is switched on after it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(offline=True, log_model=False, **kwargs)
        self._log_model = "all"


def _fit(variant: str, scratch: Path, args: argparse.Namespace, data: tuple[torch.Tensor, ...],
         warmup: bool = False) -> dict[str, Any]:
    x, y = data
    split = len(x) * 7 // 8
    L.seed_everything(0, verbose=False)
    train = DataLoader(TensorDataset(x[:split], y[:split]), batch_size=64, shuffle=True,
                       generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(x[split:], y[split:]), batch_size=256)
    callbacks: list[Any] = [ModelCheckpoint(dirpath=scratch / "ckpt", monitor="val_loss",
                                            save_top_k=1, save_last=True)]
    if variant == "b":
        ArtifactManager.reset_instance().set_root(scratch / "store")
    cpu, start = cpu_seconds(), time.perf_counter()
    logger: Any = False
    if variant == "b":
        callbacks.append(ReproCallback(project="bench"))
    elif variant == "c":
        logger = ArtifactWandbLogger(project="bench", save_dir=str(scratch))
    trainer = L.Trainer(max_epochs=1 if warmup else args.epochs, accelerator="cpu", devices=1,
                        logger=logger, callbacks=callbacks, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_train_batches=3 if warmup else None)
    trainer.fit(Classifier(x.shape[1], args.hidden, 10), train, val)
    if variant == "c":
        wandb.finish()  # waits for the artifacts
    return {"variant": variant, "seconds": time.perf_counter() - start,
            "cpu": cpu_seconds() - cpu, "steps": trainer.global_step,
            "val_loss": float(trainer.callback_metrics["val_loss"]),
            "checkpoint_mb": _size_mb(scratch / "ckpt" / "last.ckpt")}


def _train_worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 64, generator=gen)
    y = (x[:, :10] + 0.5 * torch.randn(args.rows, 10, generator=gen)).argmax(1)
    with tempfile.TemporaryDirectory(prefix="repro-bench-train-") as tmp:
        _fit("a", Path(tmp) / "warmup", args, (x, y), warmup=True)
        return {"train": [_fit(v, Path(tmp) / v, args, (x, y)) for v in args.order]}


# -- a big checkpoint -----------------------------------------------------------------------

class Big(L.LightningModule):
    """The tensors as buffers (no copy; in the checkpoint's state_dict) + one tiny weight."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, tensor in state.items():
            self.register_buffer(name.replace(".", "_"), tensor)
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        return (self.w - batch[0].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SaveTimer(L.Callback):
    """Times one ``trainer.save_checkpoint`` at the end of training, while the run is open."""

    def __init__(self, path: Path) -> None:
        self.path, self.seconds = path, float("nan")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        os.sync()
        start = time.perf_counter()
        trainer.save_checkpoint(self.path, weights_only=False)
        self.seconds = time.perf_counter() - start


def _fsync(path: Path) -> None:
    for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY)):
        fd = os.open(target, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_repro(scratch: Path, fsync: str, state: dict[str, torch.Tensor]) -> float:
    os.environ["REPRO_FSYNC"] = fsync
    constants.reload()
    manager = ArtifactManager.reset_instance()
    manager.set_root(scratch / "store")
    timer = SaveTimer(scratch / "ckpt" / "big.ckpt")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        callbacks=[ReproCallback(project="bench", monitor_hardware=False), timer])
    trainer.fit(Big(state), DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=4))
    versions = manager.list_artifacts("bench/checkpoint")
    stored = manager.artifact_path(versions[0].key, verify=False)
    assert len(versions) == 1 and os.path.samefile(timer.path, stored), versions
    return timer.seconds


def _save(kind: str, scratch: Path, state: dict[str, torch.Tensor]) -> float:
    scratch.mkdir(parents=True)
    if kind.startswith("repro_"):
        return _save_repro(scratch, kind.removeprefix("repro_"), state)
    path = scratch / "big.safetensors"
    os.sync()
    start = time.perf_counter()
    if kind == "torch":
        TorchCheckpointIO().save_checkpoint({"state_dict": state, "epoch": 0}, path)
    else:
        save_file(state, str(path))
        if kind == "st_fsync":
            _fsync(path)
    return time.perf_counter() - start


def _save_worker(args: argparse.Namespace) -> dict[str, Any]:
    pieces = 4
    numel = int(args.size_gb * 1e9 / 4 / pieces)
    gen = torch.Generator().manual_seed(1)
    state = {f"layer{i}.weight": torch.empty(numel).uniform_(generator=gen)
             for i in range(pieces)}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    small = {name: torch.ones(1 << 18) for name in state}
    results = []
    with tempfile.TemporaryDirectory(prefix="repro-bench-save-", dir=args.save_dir) as tmp:
        for kind in args.order:  # warm-up: each path once with 4 MB, untimed
            _save(kind, Path(tmp) / f"warmup-{kind}", small)
        # ... and one full-size write: the first big write of a process was several times
        # slower than the next ones here (the kernel finding free pages for the page cache)
        _save("st", Path(tmp) / "warmup-full", state)
        shutil.rmtree(Path(tmp) / "warmup-full")
        for kind in args.order:
            scratch = Path(tmp) / kind
            results.append({"kind": kind, "seconds": _save(kind, scratch, state),
                            "bytes": nbytes})
            shutil.rmtree(scratch)
    return {"save": results}


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 1e6 if path.exists() else float("nan")


# -- the driver -----------------------------------------------------------------------------

def _rotate(items: list[str], n: int) -> list[str]:
    k = n % len(items)
    return items[k:] + items[:k]


def _spawn(worker: str, order: list[str], args: argparse.Namespace, scratch: str
           ) -> dict[str, Any]:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": scratch, "WANDB_CACHE_DIR": scratch, "WANDB_CONFIG_DIR": scratch,
           "WANDB_DATA_DIR": scratch, "REPRO_PROGRESS": "0", "PYTHONWARNINGS": "ignore"}
    env.pop("REPRO_FSYNC", None)  # (b) runs with the default durability
    cmd = [sys.executable, __file__, "--worker", worker, "--order", ",".join(order),
           "--epochs", str(args.epochs), "--threads", str(args.threads),
           "--rows", str(args.rows), "--hidden", str(args.hidden),
           "--size-gb", str(args.size_gb), "--save-dir", args.save_dir or ""]
    return run_worker(cmd, env, scratch, _MARK, f"{worker} worker")


def _fit_size(size_gb: float) -> tuple[float, str]:
    """Three copies must fit in available memory (the tensors, a serializer's buffers, the
    page cache of what was written): else measure with what fits, and say so."""
    available = psutil.virtual_memory().available / 1e9
    fits = max(0.01, round(available / 3, 2))
    if size_gb <= fits:
        return size_gb, f"{available:.0f} GB available"
    return fits, (f"asked for {size_gb:g} GB but only {available:.1f} GB is available: "
                  f"measured with {fits:g} GB")


def _print_train(rounds: list[dict[str, Any]]) -> None:
    by: dict[str, list[dict[str, Any]]] = {}
    for result in rounds:
        for row in result["train"]:
            by.setdefault(row["variant"], []).append(row)
    wall = {v: statistics.median(r["seconds"] for r in rows) for v, rows in by.items()}
    cpu = {v: statistics.median(r["cpu"] for r in rows) for v, rows in by.items()}
    first = by["a"][0]
    print(f"\nTraining: {first['steps']} steps, 2 checkpoint files per epoch of "
          f"{first['checkpoint_mb']:.1f} MB, median of {len(rounds)} round(s)\n")
    print("| variant | wall s (median) | all rounds s | wall / (a) | CPU s (median) "
          "| CPU / (a) | final val_loss |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for v, label in _TRAIN.items():
        runs = ", ".join(f"{r['seconds']:.2f}" for r in by[v])
        print(f"| {label} | {wall[v]:.2f} | {runs} | **{wall[v] / wall['a']:.3f}x** "
              f"| {cpu[v]:.2f} | {cpu[v] / cpu['a']:.3f}x "
              f"| {statistics.median(r['val_loss'] for r in by[v]):.4f} |")
    paired = {v: [r["seconds"] / a["seconds"] for r, a in zip(by[v], by["a"], strict=True)]
              for v in ("b", "c")}
    for v in ("b", "c"):
        print(f"\n({v})/(a) round by round: "
              f"{', '.join(f'{x:.3f}' for x in paired[v])} "
              f"(median {statistics.median(paired[v]):.3f})", end="")
    print()
    ratio = wall["b"] / wall["a"]
    print(f"\n(b)/(a) = {ratio:.3f} (target ≤ 1.03: {'met' if ratio <= 1.03 else 'NOT met'}); "
          f"(c)/(a) = {wall['c'] / wall['a']:.3f}; (b) faster than (c): "
          f"{'yes' if wall['b'] < wall['c'] else 'NO'}")


def _print_save(rounds: list[dict[str, Any]], note: str) -> None:
    by: dict[str, list[float]] = {}
    nbytes = 0
    for result in rounds:
        for row in result["save"]:
            by.setdefault(row["kind"], []).append(row["seconds"])
            nbytes = row["bytes"]
    med = {k: statistics.median(v) for k, v in by.items()}
    print(f"\nBig checkpoint: {nbytes / 1e9:.2f} GB of float32 ({note}), median of "
          f"{len(rounds)} round(s)\n")
    print("| save | seconds (median) | all rounds s | GB/s "
          "| / bare safetensors (same durability) |")
    print("|---|---:|---|---:|---:|")
    for kind, label in _SAVE.items():
        runs = ", ".join(f"{v:.2f}" for v in by[kind])
        print(f"| {label} | {med[kind]:.2f} | {runs} | {nbytes / 1e9 / med[kind]:.2f} "
              f"| {med[kind] / med[_TWIN[kind]]:.2f}x |")
    print()
    for kind in ("repro_none", "repro_full"):
        ratio = med[kind] / med[_TWIN[kind]]
        print(f"{_SAVE[kind].replace('**', '')} / {_SAVE[_TWIN[kind]]}: {ratio:.2f}x "
              f"(target ≤ 1.15: {'met' if ratio <= 1.15 else 'NOT met'})")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds (fresh interpreters)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the training runs (see the docstring)")
    parser.add_argument("--rows", type=int, default=32768, help="training set rows")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--size-gb", type=float, default=2.0,
                        help="big-checkpoint size (0 skips that part)")
    parser.add_argument("--save-dir", default=None,
                        help="where the big checkpoints are written (default: the temp dir)")
    parser.add_argument("--part", choices=["all", "train", "save"], default="all")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round, tiny model, 20 MB checkpoint")
    parser.add_argument("--worker", choices=["train", "save"], help=argparse.SUPPRESS)
    parser.add_argument("--order", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.save_dir = args.save_dir or None
    args.order = args.order.split(",") if args.order else []
    if args.quick:
        args.repeats, args.epochs, args.rows, args.hidden = 1, 2, 1024, 32
        args.size_gb = min(args.size_gb, 0.02)
    return args


def main() -> None:
    args = _parse()
    if args.worker:
        result = (_train_worker if args.worker == "train" else _save_worker)(args)
        print(_MARK + json.dumps(result), flush=True)
        return
    size_gb, note = _fit_size(args.size_gb) if args.size_gb > 0 else (0.0, "")
    args.size_gb = size_gb
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
          f"torch {torch.__version__}, lightning {L.__version__}, wandb {wandb.__version__}, "
          f"{args.threads} training thread(s), {time.strftime('%Y-%m-%d')}")
    with tempfile.TemporaryDirectory(prefix="repro-bench-lightning-") as scratch:
        if args.part in ("all", "train"):
            _print_train([{"train": [_spawn("train", [v], args, scratch)["train"][0]
                                     for v in _rotate(list(_TRAIN), i)]}
                          for i in range(args.repeats)])
        if size_gb > 0 and args.part in ("all", "save"):
            _print_save([_spawn("save", _rotate(list(_SAVE), i), args, scratch)
                         for i in range(args.repeats)], note)


if __name__ == "__main__":
    main()
