"""What ReproTracker costs an Accelerate training loop, beside plain Accelerate and W&B offline.

    python benchmarks/accelerate_overhead.py [--repeats 5] [--steps 500] [--save-every 50]
                                             [--threads 1] [--no-artifacts] [--quick] [--json]
    python benchmarks/accelerate_overhead.py --profile   # (b) once under cProfile

**Training** (same MLP of ~300 k parameters, synthetic data, seed and steps; one process on
CPU, ``Accelerator(cpu=True)``; ``accelerator.log({"train/loss": ..., "lr": ...}, step=step)``
every step and a state saved every ``--save-every`` steps, with ``automatic_checkpoint_naming``
and ``total_limit=3`` in every variant):

- (a) plain Accelerate: no tracker (``accelerator.log`` is a no-op), ``accelerator.save_state()``;
- (b) ``Accelerator(log_with=[ReproTracker(project=...)])`` with its defaults (STANDARD
  environment capture, hardware monitor on), ``init_trackers(config=...)``, and
  ``repro_lightning.save_state(accelerator, step=step)``: every state directory logged into a
  fresh store (``REPRO_HOME`` in a temp dir; hashed, fsynced: the default ``REPRO_FSYNC=full``)
  with lineage to the config and the previous state;
- (c) ``log_with="wandb"`` with ``WANDB_MODE=offline``, plain ``accelerator.save_state()``;
- (d) (c) + each saved state logged as a W&B artifact (``wandb.Artifact`` + ``add_dir`` +
  ``run.log_artifact``), the closest W&B equivalent of (b) (``--no-artifacts`` leaves it out).

The time of a variant is the wall time from building its ``Accelerator`` to the end of
``accelerator.end_training()`` (which finishes the repro run, or calls ``wandb.finish()``), so
each pays its one-time costs (a new store, the environment capture, the W&B service) as a real
job does; imports, the model and the data are not timed. Each round runs every variant once,
in an order rotated from round to round, each in a fresh interpreter (its own ``REPRO_HOME``
and ``WANDB_DIR``) that first runs a short untimed warm-up of plain Accelerate (a few steps and
two ``save_state`` calls, in a directory of its own). The table gives the median over rounds,
each round's ratio to (a) of the same round, and the CPU seconds used meanwhile (every thread
of the process, plus the W&B service process: they tell work from waiting, but on a shared
machine they grow with contention too), and where the time went (medians): the seconds from
the start to the end of ``init_trackers`` + ``prepare`` (W&B starts its run there), inside
``accelerator.log`` (in (b) the first call opens the run: store, config, environment capture),
inside the saves (``save_state`` + logging the state) and inside ``end_training``, each summed
over the run; the rest is the training itself. The final loss is the same in every variant
when the training itself is unchanged.
``--profile`` runs (b) once under cProfile instead and prints its top costs (cProfile inflates
Python-heavy calls such as ``log`` several times; the columns above are unprofiled).

Training uses one torch thread (``--threads``; see ``lightning_overhead.py``: with more, a
busy machine measures the scheduler, not the tracker). Target: (b)/(a) ≤ 1.03.

Prints a Markdown table (``--json``: one JSON document instead). ``--quick`` is a
seconds-long smoke run (one round, a tiny model, a few steps).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import accelerate
import psutil
import torch
import wandb
from _measure import cpu_seconds, run_worker
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch.utils.data import DataLoader, TensorDataset

import repro_lightning
from repro_core import ArtifactManager
from repro_lightning import ReproTracker

_MARK = "RESULT "
_TARGET = 1.03
_VARIANTS = {"a": "(a) Accelerate, `save_state`",
             "b": "(b) (a) + ReproTracker, `repro_lightning.save_state`",
             "c": "(c) (a) + wandb offline",
             "d": "(d) (c) + each state as a W&B artifact"}
_PROJECT = "bench"
_TOTAL_LIMIT = 3
# what --profile lists by cumulative time: repro, and the Accelerate calls that reach it
_TRACKER_CALLS = (r"repro_core|repro_lightning|sqlite|fsync|accelerator\.py:\d+\("
                  r"(save_state|end_training|init_trackers|log)\)")


# -- the worker: one variant in a fresh interpreter -----------------------------------------

def _make_accelerator(variant: str, project_dir: Path) -> Accelerator:
    log_with: Any = None
    if variant == "b":
        log_with = [ReproTracker(project=_PROJECT)]
    elif variant in ("c", "d"):
        log_with = "wandb"
    return Accelerator(cpu=True, log_with=log_with, project_config=ProjectConfiguration(
        project_dir=str(project_dir), automatic_checkpoint_naming=True,
        total_limit=_TOTAL_LIMIT))


def _save(variant: str, accelerator: Accelerator, step: int) -> None:
    if variant == "b":
        repro_lightning.save_state(accelerator, step=step)
        return
    location = accelerator.save_state()
    if variant == "d":
        run = accelerator.get_tracker("wandb", unwrap=True)
        artifact = wandb.Artifact("state", type="checkpoint", metadata={"step": step})
        artifact.add_dir(str(location))
        run.log_artifact(artifact)


def _train(variant: str, scratch: Path, args: argparse.Namespace, data: TensorDataset,
           steps: int, save_every: int) -> dict[str, Any]:
    set_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(data.tensors[0].shape[1], args.hidden), torch.nn.ReLU(),
        torch.nn.Linear(args.hidden, args.hidden), torch.nn.ReLU(),
        torch.nn.Linear(args.hidden, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=100, gamma=0.5)
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    config = {"variant": variant, "steps": steps, "save_every": save_every,
              "hidden": args.hidden, "batch_size": args.batch_size, "lr": 1e-3}
    cpu, start = cpu_seconds(), time.perf_counter()
    accelerator = _make_accelerator(variant, scratch / "out")
    accelerator.init_trackers(_PROJECT, config=config)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader,
                                                              scheduler)
    spent = {"init_s": time.perf_counter() - start, "log_s": 0.0, "save_s": 0.0}
    loss = torch.zeros(())
    batches = _forever(loader)
    for step in range(steps):
        x, y = next(batches)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        values = {"train/loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
        mark = time.perf_counter()
        accelerator.log(values, step=step)
        spent["log_s"] += time.perf_counter() - mark
        if (step + 1) % save_every == 0:
            mark = time.perf_counter()
            _save(variant, accelerator, step)
            spent["save_s"] += time.perf_counter() - mark
    mark = time.perf_counter()
    accelerator.end_training()
    end = time.perf_counter()
    return {"variant": variant, "seconds": end - start, "cpu": cpu_seconds() - cpu,
            **spent, "end_s": end - mark, "steps": steps, "saves": steps // save_every,
            "loss": float(loss), "state_mb": _dir_mb(scratch / "out" / "checkpoints")}


def _forever(loader: Any) -> Any:
    while True:
        yield from loader


def _check(variant: str, result: dict[str, Any]) -> None:
    """Untimed: (b) logged every state it saved."""
    if variant == "b":
        versions = ArtifactManager().list_artifacts(f"{_PROJECT}/state")
        assert len(versions) == result["saves"], (len(versions), result["saves"])


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.rows, 64, generator=gen)
    y = (x[:, :10] + 0.5 * torch.randn(args.rows, 10, generator=gen)).argmax(1)
    data = TensorDataset(x, y)
    with tempfile.TemporaryDirectory(prefix="repro-bench-accelerate-") as tmp:
        _train("a", Path(tmp) / "warmup", args, data, steps=6, save_every=3)
        variant = args.worker
        if args.profile:
            profiler = cProfile.Profile()
            result = profiler.runcall(_train, variant, Path(tmp) / variant, args, data,
                                      args.steps, args.save_every)
            _print_profile(profiler)
        else:
            result = _train(variant, Path(tmp) / variant, args, data, args.steps,
                            args.save_every)
        _check(variant, result)
        return result


def _print_profile(profiler: cProfile.Profile) -> None:
    """The top costs overall, then the calls that are the tracker's, by cumulative time."""
    sections = [("tottime", (25,), "everything"),
                ("cumulative", (_TRACKER_CALLS, 60), "the tracker's calls")]
    for order, restrictions, title in sections:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(*restrictions)
        print(f"\n-- {title}, by {order} --\n{out.getvalue()}", file=sys.stderr)


def _dir_mb(path: Path) -> float:
    """Size of the newest checkpoint folder (one saved state)."""
    folders = sorted(path.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not folders:
        return float("nan")
    return sum(f.stat().st_size for f in folders[-1].rglob("*") if f.is_file()) / 1e6


# -- the driver -----------------------------------------------------------------------------

def _rotate(items: list[str], n: int) -> list[str]:
    k = n % len(items)
    return items[k:] + items[:k]


def _spawn(variant: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    scratch.mkdir(parents=True)
    wandb_dir = str(scratch / "wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_DIR": wandb_dir, "WANDB_CACHE_DIR": wandb_dir, "WANDB_CONFIG_DIR": wandb_dir,
           "WANDB_DATA_DIR": wandb_dir, "REPRO_HOME": str(scratch / "store"),
           "REPRO_PROGRESS": "0", "PYTHONWARNINGS": "ignore"}
    env.pop("REPRO_FSYNC", None)  # (b) runs with the default durability
    cmd = [sys.executable, __file__, "--worker", variant, "--steps", str(args.steps),
           "--save-every", str(args.save_every), "--threads", str(args.threads),
           "--rows", str(args.rows), "--hidden", str(args.hidden),
           "--batch-size", str(args.batch_size), *(["--profile"] if args.profile else [])]
    return run_worker(cmd, env, scratch, _MARK, f"worker {variant}",
                      echo_stderr=args.profile)


def _summary(rounds: list[list[dict[str, Any]]], variants: list[str]) -> dict[str, Any]:
    by = {v: [next(r for r in rnd if r["variant"] == v) for rnd in rounds] for v in variants}
    wall = {v: statistics.median(r["seconds"] for r in rows) for v, rows in by.items()}
    cpu = {v: statistics.median(r["cpu"] for r in rows) for v, rows in by.items()}
    paired = {v: [r["seconds"] / a["seconds"] for r, a in zip(by[v], by["a"], strict=True)]
              for v in variants}
    ratio = wall["b"] / wall["a"]
    return {"rounds": by, "wall": wall, "cpu": cpu, "paired": paired,
            "ratio_b": ratio, "paired_median_b": statistics.median(paired["b"]),
            "target": _TARGET, "target_met": ratio <= _TARGET}


def _print_table(summary: dict[str, Any], args: argparse.Namespace) -> None:
    by, wall, cpu = summary["rounds"], summary["wall"], summary["cpu"]
    first = by["a"][0]
    print(f"\nTraining: {first['steps']} steps of batch {args.batch_size}, a state of "
          f"{first['state_mb']:.1f} MB saved every {args.save_every} steps "
          f"({first['saves']} saves), median of {len(by['a'])} round(s)\n")
    print("| variant | wall s (median) | all rounds s | wall / (a) | (v)/(a) per round "
          "| CPU s (median) | CPU / (a) | s in init / log / saves / end | final loss |")
    print("|---|---:|---|---:|---|---:|---:|---|---:|")
    for v in by:
        runs = ", ".join(f"{r['seconds']:.2f}" for r in by[v])
        per_round = ", ".join(f"{x:.3f}" for x in summary["paired"][v])
        parts = " / ".join(f"{statistics.median(r[k] for r in by[v]):.2f}"
                           for k in ("init_s", "log_s", "save_s", "end_s"))
        print(f"| {_VARIANTS[v]} | {wall[v]:.2f} | {runs} | **{wall[v] / wall['a']:.3f}x** "
              f"| {per_round} | {cpu[v]:.2f} | {cpu[v] / cpu['a']:.3f}x | {parts} "
              f"| {statistics.median(r['loss'] for r in by[v]):.4f} |")
    ratio = summary["ratio_b"]
    others = "; ".join(f"({v})/(a) = {wall[v] / wall['a']:.3f}" for v in by if v in "cd")
    print(f"\n(b)/(a) = {ratio:.3f} (median of per-round ratios "
          f"{summary['paired_median_b']:.3f}; target ≤ {_TARGET}: "
          f"{'met' if summary['target_met'] else 'NOT met'}); {others}")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds (fresh interpreters)")
    parser.add_argument("--steps", type=int, default=500, help="optimizer steps")
    parser.add_argument("--save-every", type=int, default=50, help="save_state every N steps")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the training (see the docstring)")
    parser.add_argument("--rows", type=int, default=16384, help="training set rows")
    parser.add_argument("--hidden", type=int, default=512, help="MLP width (512: ~300 k "
                                                                "parameters)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-artifacts", action="store_true",
                        help="leave out (d), the W&B artifact variant")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 round, tiny model, a few steps")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document instead of the Markdown table")
    parser.add_argument("--profile", action="store_true",
                        help="run (b) once under cProfile and print its top costs")
    parser.add_argument("--worker", choices=list(_VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.save_every = 1, 20, 10
        args.rows, args.hidden, args.batch_size = 512, 32, 32
    if args.steps < 1 or args.save_every < 1 or args.repeats < 1:
        parser.error("--steps, --save-every and --repeats must be positive")
    return args


def _machine(args: argparse.Namespace) -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"accelerate {accelerate.__version__}, wandb {wandb.__version__}, "
            f"{args.threads} training thread(s), {time.strftime('%Y-%m-%d')}")


def main() -> None:
    args = _parse()
    if args.worker:
        print(_MARK + json.dumps(_worker(args)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="repro-bench-accelerate-") as tmp:
        if args.profile:
            _spawn("b", args, Path(tmp) / "profile")
            return
        variants = [v for v in _VARIANTS if not (args.no_artifacts and v == "d")]
        rounds = [[_spawn(v, args, Path(tmp) / f"round{i}-{v}") for v in _rotate(variants, i)]
                  for i in range(args.repeats)]
    summary = _summary(rounds, variants)
    if args.json:
        print(json.dumps({"machine": _machine(args), "args": vars(args), **summary}, indent=1))
        return
    print(_machine(args))
    _print_table(summary, args)


if __name__ == "__main__":
    main()
