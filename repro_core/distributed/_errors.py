"""``RankMismatchError`` lives in ``repro_core.errors`` with every other error; re-exported
here for the modules of this package."""

from __future__ import annotations

from ..errors import RankMismatchError

__all__ = ["RankMismatchError"]
