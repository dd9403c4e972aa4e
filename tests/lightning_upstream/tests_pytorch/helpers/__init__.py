# Vendored from https://github.com/Lightning-AI/pytorch-lightning (Apache-2.0; upstream file has no header)
#   path:   tests/tests_pytorch/helpers/__init__.py
#   commit: 5b90dd4bfbedd43581ec708ff08edb1c47948cad
#   Unmodified. See tests/lightning_upstream/README.md.
from lightning.pytorch.demos.boring_classes import (  # noqa: F401
    BoringDataModule,
    BoringModel,
    ManualOptimBoringModel,
    RandomDataset,
)

from tests_pytorch.helpers.datasets import TrialMNIST  # noqa: F401
