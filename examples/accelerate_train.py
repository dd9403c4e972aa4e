"""Hugging Face Accelerate + repro: one run per launch, ``save_state`` as lineage-linked
artifacts, and a relaunch that continues the run after a preemption.

    python examples/accelerate_train.py                                # one process
    torchrun --nproc_per_node 2 examples/accelerate_train.py          # 2 processes (gloo)
    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_train.py  # CPU: 2 too
    python examples/accelerate_train.py --resume    # continue the run that saved state:latest
    python examples/accelerate_train.py --ttrl      # an online (test-time RL) loop

Everything is synthetic (a small regression model on random data) and runs on CPU in seconds.
The store is ``REPRO_HOME`` (default ``./repro_store``); look at the result with
``repro runs --project accelerate-demo``, ``repro artifacts`` and ``repro lineage state:latest``.
"""

from __future__ import annotations

import argparse
import copy
import os
from collections.abc import Iterator
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import repro_lightning
from repro_core.errors import ArtifactNotFoundError, StoreNotFoundError
from repro_lightning import ReproTracker


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--project", default="accelerate-demo")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps in all")
    parser.add_argument("--save-every", type=int, default=20, help="save_state every N steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="accelerate_demo",
                        help="Accelerate's project_dir (checkpoints/checkpoint_<n>)")
    parser.add_argument("--resume", action="store_true",
                        help="load state:latest (if any) and continue its run")
    parser.add_argument("--ttrl", action="store_true",
                        help="online updates: log reward / confidence / KL per update")
    parser.add_argument("--cpu", action="store_true", help="force CPU even with a GPU")
    return parser.parse_args(argv)


def make_data(n: int = 512, dim: int = 16, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator)
    w = torch.randn(dim, 1, generator=generator)
    y = x @ w + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y)


def batches(accelerator: Accelerator, loader: Any, start: int) -> Iterator[Any]:
    """Batches forever; a resumed run skips what the first ``start`` steps consumed."""
    skip = start % len(loader)
    while True:
        epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        yield from epoch_loader


def resume_step(accelerator: Accelerator, wanted: bool) -> int:
    """Load the newest logged state (on every process) and return the step to continue at."""
    if not wanted:
        return 0
    try:
        meta = repro_lightning.load_state(accelerator, "state:latest")
    except (ArtifactNotFoundError, StoreNotFoundError):
        accelerator.print("no state:latest in the store yet: starting from step 0")
        return 0
    assert meta is not None
    accelerator.print(f"resumed from {meta.key} (step {meta.metadata['step']})")
    return int(meta.metadata["step"]) + 1


def main(argv: list[str] | None = None) -> str | None:
    args = parse_args(argv)
    set_seed(args.seed)
    # Without a GPU, Accelerate runs a multi-process launch on CPU (gloo) only when told so.
    accelerator = Accelerator(
        cpu=args.cpu or not torch.cuda.is_available(),
        log_with=[ReproTracker(project=args.project)],
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            automatic_checkpoint_naming=True, total_limit=3))
    accelerator.init_trackers(args.project, config=vars(args))

    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
    reference = copy.deepcopy(model).requires_grad_(False)  # TTRL: KL/drift anchor
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=25, gamma=0.5)
    loader = DataLoader(make_data(seed=args.seed), batch_size=args.batch_size, shuffle=True)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader,
                                                              scheduler)
    reference = reference.to(accelerator.device)

    start = resume_step(accelerator, args.resume)
    data = batches(accelerator, loader, start)
    for step in range(start, args.steps):
        x, y = next(data)
        with accelerator.accumulate(model):
            out = model(x)
            loss = nn.functional.mse_loss(out, y)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        if args.ttrl:
            log_update(accelerator, step, out.detach(), reference(x), loss.item())
        else:
            accelerator.log({"train/loss": loss.item(), "lr": scheduler.get_last_lr()[0]},
                            step=step)
        if (step + 1) % args.save_every == 0:
            repro_lightning.save_state(accelerator, step=step)
    repro_lightning.save_model(accelerator, model, os.path.join(args.output_dir, "model"))

    tracker = accelerator.get_tracker("repro")
    run_id = getattr(tracker, "run_id", None)
    accelerator.end_training()
    if accelerator.is_main_process:
        print(f"repro run {run_id} of project {args.project!r}: COMPLETED "
              f"(repro runs --project {args.project}; repro lineage {args.project}/state:latest)")
    return run_id


def log_update(accelerator: Accelerator, step: int, out: torch.Tensor,
               reference_out: torch.Tensor, loss: float) -> None:
    """One online update: reward (negative loss), confidence and drift from the reference
    policy (a KL proxy) are logged through the tracker as an online-update row."""
    drift = float((out - reference_out).pow(2).mean())
    accelerator.log({"reward": -loss, "confidence": float(torch.exp(torch.tensor(-loss))),
                     "kl_divergence": drift}, step=step)
    if accelerator.is_main_process:  # the tracker exists on the main process only
        accelerator.get_tracker("repro").log_experience(
            f"step-{step}", {"batch_mean": float(out.mean())}, {"reward": -loss},
            {"step": step})


if __name__ == "__main__":
    main()
