"""Lightning quickstart: one callback records the run, its checkpoints and their lineage.

    python examples/lightning_quickstart.py [--root DIR] [--max-epochs 3]

1. logs a small synthetic dataset (a dict of tensors) as ``quickstart/dataset`` in a short
   run of its own (the same content again is the same version, so a second run reuses v1);
2. trains a tiny regression ``LightningModule`` on it for 3 epochs on the CPU with
   ``ReproCallback(project="quickstart", datasets={"train": "quickstart/dataset:latest"})``
   and ``repro_lightning.checkpoint_callback(metric="val_loss")``: every checkpoint the
   Trainer saves becomes a ``quickstart/checkpoint`` version (``best`` follows the best
   ``val_loss``, ``latest`` the newest), descending from the config and the dataset;
3. prints the run id, the checkpoint versions, the lineage of ``checkpoint:best`` (what
   ``repro lineage quickstart/checkpoint:best`` prints) and loads the best model back.

The store is ``./repro_store`` (or ``$REPRO_HOME``, or ``--root``); Lightning's own files
(the ``ModelCheckpoint`` directory) go under ``./lightning_quickstart_logs``. Everything is
synthetic and local; nothing is downloaded. Run it again: a new run, and the checkpoint
versions continue (v4, v5, ...).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

import repro_lightning
from repro_core import ArtifactManager, ExperimentContext
from repro_lightning import ReproCallback

PROJECT = "quickstart"
LOG_DIR = Path("lightning_quickstart_logs")  # Lightning's default_root_dir (checkpoints)


class Regressor(L.LightningModule):
    """y = x @ w + noise, learnt by a two-layer MLP."""

    def __init__(self, features: int = 8, hidden: int = 32, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def make_dataset(rows: int = 512, features: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, features, generator=generator)
    w = torch.linspace(-2.0, 2.0, features).unsqueeze(1)
    y = x @ w + 0.1 * torch.randn(rows, 1, generator=generator)
    return {"x": x, "y": y}


def log_dataset() -> str:
    """Step 1: the dataset, logged in a short run of its own (logging needs an active run)."""
    with ExperimentContext(name="make-dataset", project=PROJECT, monitor_hardware=False) as ctx:
        meta = ctx.log_artifact("dataset", "dataset", data=make_dataset(),
                                metadata={"rows": 512, "features": 8})
    print(f"dataset: {meta.key} ({meta.size_bytes} bytes)")
    return meta.key


def loaders() -> tuple[DataLoader, DataLoader]:
    """The training data, read back from the store (verified) rather than from memory."""
    data = ArtifactManager().load_artifact(f"{PROJECT}/dataset:latest")
    full = TensorDataset(data["x"], data["y"])
    train, val = torch.utils.data.random_split(full, [448, 64],
                                               generator=torch.Generator().manual_seed(0))
    return (DataLoader(train, batch_size=32, shuffle=True,
                       generator=torch.Generator().manual_seed(0)),
            DataLoader(val, batch_size=64))


def train(max_epochs: int) -> str:
    """Step 2: a Trainer with ReproCallback; returns the run id."""
    L.seed_everything(0, workers=True)
    train_loader, val_loader = loaders()
    # Every file Lightning leaves there is a link to a stored version: removing the folder
    # loses nothing, and each run starts with Lightning's plain file names again.
    shutil.rmtree(LOG_DIR / "checkpoints", ignore_errors=True)
    repro = ReproCallback(project=PROJECT, datasets={"train": f"{PROJECT}/dataset:latest"})
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, deterministic=True,
        default_root_dir=LOG_DIR, logger=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=5,
        callbacks=[repro, repro_lightning.checkpoint_callback(metric="val_loss")],
    )
    trainer.fit(Regressor(), train_loader, val_loader)
    assert repro.run_id is not None
    manager = ArtifactManager()
    best_file = trainer.checkpoint_callback.best_model_path
    same = os.path.samefile(best_file, manager.artifact_path(f"{PROJECT}/checkpoint:best"))
    print(f"run {repro.run_id}: {manager.get_run(repro.run_id)['state']}")
    print(f"best checkpoint file {best_file}: "
          f"{'the stored blob itself (a read-only link, no second copy)' if same else 'a copy'}")
    return repro.run_id


def show(root: Path, run_id: str) -> None:
    """Step 3: what the store now holds, the lineage of the best checkpoint, and a load."""
    manager = ArtifactManager()
    versions = manager.list_artifacts(f"{PROJECT}/checkpoint")
    mine = [meta for meta in versions if meta.metadata.get("run_id") == run_id]
    print(f"checkpoint versions of run {run_id} (key, aliases, global_step, file); "
          f"{len(versions) - len(mine)} more from earlier runs:")
    for meta in mine:
        aliases = ",".join(meta.aliases) or "-"
        print(f"  {meta.key:28} {aliases:12} step {meta.metadata.get('global_step'):<4} "
              f"{meta.metadata.get('filename')}")
    command = [sys.executable, "-m", "repro_core.cli", "lineage", f"{PROJECT}/checkpoint:best",
               "--up", "--depth", "1", "--root", str(root)]
    print(f"$ repro lineage {PROJECT}/checkpoint:best --up --depth 1")
    sys.stdout.flush()
    subprocess.run(command, check=True)

    # One line to get the best model back, by artifact key (a path works too):
    model = repro_lightning.load_from_checkpoint(Regressor, f"{PROJECT}/checkpoint:best")
    x = make_dataset()["x"][:4]
    print(f"loaded {type(model).__name__}(hidden={model.hparams.hidden}) from "
          f"{PROJECT}/checkpoint:best; predictions {model(x).squeeze(1).tolist()}")
    print(f"resume: trainer.fit(model, ckpt_path=repro_lightning.checkpoint_path("
          f"'{PROJECT}/checkpoint:latest'))")
    print(f"look at it: repro runs --root {root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--root", type=Path, default=None,
                        help="store root (default: $REPRO_HOME or ./repro_store)")
    parser.add_argument("--max-epochs", type=int, default=3)
    args = parser.parse_args()
    manager = ArtifactManager()
    if args.root is not None:
        manager.set_root(args.root.absolute())
    root = manager.root.absolute()

    log_dataset()
    run_id = train(args.max_epochs)
    show(root, run_id)


if __name__ == "__main__":
    main()
