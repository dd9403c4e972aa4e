"""repro_lightning: thin PyTorch Lightning (and Hugging Face Accelerate) adapters over
repro_core. No storage logic lives here: every write and read goes through ``repro_core``.

``Trainer(callbacks=[ReproCallback(project="mnist")])`` is all a Lightning user adds.
"""

from ._compat import require_lightning

require_lightning()

from .callback import ReproCallback  # noqa: E402
from .checkpoint import checkpoint_callback, checkpoint_path, load_from_checkpoint  # noqa: E402
from .checkpoint_io import SafetensorsCheckpointIO, TorchLoggingCheckpointIO  # noqa: E402
from .logger import ReproLogger  # noqa: E402
from .ttrl_logger import TTRLLogger  # noqa: E402

__all__ = [
    "ReproCallback",
    "ReproLogger",
    "SafetensorsCheckpointIO",
    "TTRLLogger",
    "TorchLoggingCheckpointIO",
    "checkpoint_callback",
    "checkpoint_path",
    "load_from_checkpoint",
]
