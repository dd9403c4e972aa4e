"""Whether a store directory already holds data (then a registry must never be invented)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["store_has_data"]


def store_has_data(root: Path) -> bool:
    """Whether ``root`` holds any blob or run export (then a registry must not be invented)."""
    blobs = root / "blobs"
    if blobs.is_dir():
        for algo in blobs.iterdir():
            if not algo.is_dir():
                continue
            for shard in algo.iterdir():
                if shard.is_dir() and any(True for _ in shard.iterdir()):
                    return True
    runs = root / "runs"
    return runs.is_dir() and any(True for _ in runs.glob("*/run.json"))
