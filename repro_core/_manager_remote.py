"""The manager's background mirroring: a run given a remote pushes what it logs as it lands.

``init_run(..., remote="origin")`` (or ``REPRO_REMOTE``) resolves the remote before the run is
created (an unknown name is an error then, not a surprise at the first checkpoint) and starts
a :class:`~repro_core.remote._queue.Mirror` on rank 0. Each logged version is queued (a registry
row) and pushed by the worker; finishing the run queues the run itself (its final metrics and
state) and waits ``REPRO_REMOTE_TIMEOUT`` seconds at most for the queue. What is left stays
queued for the next run with that remote, or ``repro push``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

from . import constants
from .errors import InvalidArgumentError, ReproError

__all__ = ["RemoteMirroring"]


class RemoteMirroring:
    """Mixin of ``ArtifactManager``: the run's mirror, if it has a remote."""

    _mirror: Any = None

    def _resolve_remote(self, registry: Any, remote: str | None) -> tuple[str, str] | None:
        """``(name, url)`` of the run's remote (``remote=`` or ``REPRO_REMOTE``), or None."""
        chosen = remote if remote is not None else constants.REPRO_REMOTE
        if chosen is None:
            return None
        if not isinstance(chosen, str) or not chosen.strip():
            raise InvalidArgumentError(f"remote must be a remote name or URL, got {remote!r}",
                                       argument="remote")
        from .remote._config import default_remote

        return default_remote(registry, chosen)

    def _start_mirror(self, root: Any, target: tuple[str, str] | None) -> None:
        self._stop_mirror(0.0)
        if target is None:
            return
        from .remote._queue import Mirror

        self._mirror = Mirror(root, *target)

    def _mirror_submit(self, kind: str, ref: str) -> None:
        mirror = self._mirror
        if mirror is not None:
            mirror.submit(kind, ref)

    def _stop_mirror(self, timeout: float | None = None) -> None:
        mirror, self._mirror = self._mirror, None
        if mirror is None:
            return
        try:
            mirror.close(constants.REPRO_REMOTE_TIMEOUT if timeout is None else timeout)
        except ReproError as exc:  # finishing a run never fails for its remote
            with contextlib.suppress(Warning):
                warnings.warn(f"repro: stopping the mirror failed: {exc}", RuntimeWarning,
                              stacklevel=2)
        except Warning:
            pass  # its "N pushes left" made an error (-W error): the queue still says so

    def pending_pushes(self) -> list[Any]:
        """The background pushes of the current run's remote still queued (with the last
        error of each): what ``repro status`` shows. Empty without a remote."""
        mirror = self._mirror
        return [] if mirror is None else mirror.pending()
