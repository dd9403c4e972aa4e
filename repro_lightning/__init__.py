"""repro_lightning: thin PyTorch Lightning and Hugging Face Accelerate adapters over repro_core.

The adapters (``ReproCallback``, loggers, ``SafetensorsCheckpointIO``, the Accelerate tracker)
arrive with their own issues; this package holds no storage logic of its own.
"""

__all__: list[str] = []
