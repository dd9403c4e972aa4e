"""What the Lightning adapter tests share: a tiny seeded model and Trainer settings.

Imported by the tests (``tests/`` is on ``sys.path`` under pytest) and by the subprocess
scripts beside it (which put this folder on ``sys.path`` themselves).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

__all__ = ["FAST", "TinyModel", "trainer_kwargs"]

# Trainer settings every test shares: CPU, quiet, no default logger.
FAST: dict[str, Any] = {
    "accelerator": "cpu", "devices": 1, "enable_progress_bar": False,
    "enable_model_summary": False, "logger": False,
}


def trainer_kwargs(**overrides: Any) -> dict[str, Any]:
    return {**FAST, **overrides}


class TinyModel(BoringModel):
    """``BoringModel`` (a 32→2 linear layer on random data) with hparams, logged losses,
    Adam + StepLR; ``val_epoch`` (the epoch) is a score that rises every epoch."""

    def __init__(self, lr: float = 0.01, hidden: int = 32, fail_at_step: int | None = None,
                 fail_rank: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        hp = self.hparams
        if hp.fail_at_step is not None and self.global_step >= hp.fail_at_step and (
                hp.fail_rank is None or self.global_rank == hp.fail_rank):
            raise RuntimeError(f"boom at step {self.global_step} on rank {self.global_rank}")
        loss = self.step(batch)
        self.log("train_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.step(batch)
        self.log("val_loss", loss)
        self.log("val_acc", -loss)
        self.log("val_epoch", float(self.current_epoch))
        return {"x": loss}

    def test_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.step(batch)
        self.log("test_loss", loss)
        return {"y": loss}

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32, 64), batch_size=2)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32, 64), batch_size=2)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32, 64), batch_size=2)
