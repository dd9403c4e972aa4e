"""Is this process offline, as far as remote trackers go? (``offline_mode=None`` means: ask.)

Offline when ``REPRO_OFFLINE`` is set, when ``WANDB_MODE`` is ``offline``/``disabled``/
``dryrun``, when wandb is not installed, or when wandb has no credentials: neither
``WANDB_API_KEY`` nor a ``~/.netrc`` (or ``$NETRC``) entry for the W&B host (``api.wandb.ai``,
or the host of ``WANDB_BASE_URL``) — that entry is where ``wandb login`` stores the key.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
from pathlib import Path
from urllib.parse import urlparse

from . import constants

__all__ = ["detect_offline"]

_OFFLINE_MODES = ("offline", "disabled", "dryrun")


def detect_offline() -> bool:
    """True unless wandb is installed, enabled and logged in."""
    if constants.REPRO_OFFLINE or os.environ.get("WANDB_MODE", "").strip().lower() in (
            _OFFLINE_MODES):
        return True
    if importlib.util.find_spec("wandb") is None:
        return True
    return not (os.environ.get("WANDB_API_KEY", "").strip() or _netrc_has_wandb())


def _netrc_has_wandb() -> bool:
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(base).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        auth = netrc.netrc(str(path)).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return auth is not None and bool(auth[2])
