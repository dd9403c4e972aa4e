"""``TTRLLogger``: Test-Time RL trained with Lightning, recorded as online updates.

Values logged under the reward / confidence / KL keys (``self.log("reward", r)``) become
``log_online_update`` rows — linked to the checkpoint in force, with the ``online/*`` metric
names ``TTRLContext`` uses — so the update history behind every checkpoint can be queried
(``repro updates``) and a checkpoint chosen on reward *and* confidence and KL (picking by
reward alone can pick the worst: TRL #3384). A module logs experiences through
``self.logger.log_experience(...)``. With ``ReproCallback`` present the rows come from its
per-step tap (every step, not only every ``log_every_n_steps``).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_only

from repro_core.ttrl import TTRLContext

from ._session import RunSession
from .logger import ReproLogger

__all__ = ["TTRLLogger"]


class TTRLLogger(ReproLogger):
    """A ``ReproLogger`` whose run is a ``TTRLContext``.

    Args:
        reward_key, confidence_key, kl_key: the ``self.log`` names read as one online update
            (an update is recorded when the reward key is logged; a missing confidence is
            NaN, a missing KL is None).
        Other arguments as ``ReproLogger``.
    """

    def __init__(self, project: str = "default", *, reward_key: str = "reward",
                 confidence_key: str = "confidence", kl_key: str = "kl_divergence",
                 **kwargs: Any) -> None:
        keys = (reward_key, confidence_key, kl_key)
        if not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != 3:
            raise ValueError(f"reward_key, confidence_key and kl_key must be three distinct "
                             f"metric names, got {keys!r}")
        self._keys = keys
        super().__init__(project, **kwargs)

    def _configure(self, session: RunSession) -> None:
        session.ttrl_keys = self._keys

    @rank_zero_only
    def log_experience(self, experience_id: str, input_data: Any, output_data: Any,
                       metadata: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """Store one experience (input, output, metadata) in the run."""
        context = self._session.context
        if not isinstance(context, TTRLContext):
            raise RuntimeError("log_experience() needs the run to have started (inside "
                               "fit) with a TTRLLogger configured")
        return context.log_experience(experience_id, input_data, output_data, metadata)
