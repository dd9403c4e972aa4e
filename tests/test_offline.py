"""Offline detection (``repro_core._offline``) with the real ``wandb`` package installed.

Offline unless wandb is installed, enabled and has credentials: ``WANDB_API_KEY``, or a netrc
entry for the W&B host (``$NETRC`` points at a temporary netrc here, so the user's own
``~/.netrc`` never decides a test). ``REPRO_OFFLINE`` and ``WANDB_MODE`` force offline.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from repro_core import ArtifactManager, ExperimentContext, constants
from repro_core._offline import detect_offline

pytestmark = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                reason="needs the real wandb package (the [wandb] extra)")

_VARIABLES = ("REPRO_OFFLINE", "WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL", "NETRC")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """No W&B variables set, ``$NETRC`` an empty file; settings re-parsed before and after."""
    with pytest.MonkeyPatch.context() as mp:
        for name in _VARIABLES:
            mp.delenv(name, raising=False)
        netrc = tmp_path / "netrc"
        netrc.write_text("")
        netrc.chmod(0o600)
        mp.setenv("NETRC", str(netrc))
        constants.reload()
        yield mp
    constants.reload()


def _netrc(mp: pytest.MonkeyPatch, tmp_path: Path, text: str) -> None:
    path = tmp_path / "netrc"
    path.write_text(text)
    mp.setenv("NETRC", str(path))


def test_no_credentials_is_offline(env: pytest.MonkeyPatch) -> None:
    assert detect_offline() is True


def test_api_key_is_online(env: pytest.MonkeyPatch) -> None:
    env.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    assert detect_offline() is False
    env.setenv("WANDB_API_KEY", "   ")  # blank is no key
    assert detect_offline() is True


@pytest.mark.parametrize(("text", "base_url", "offline"), [
    ("machine api.wandb.ai\n  login user\n  password abc123\n", None, False),
    ("machine example.com login user password abc123\n", None, True),
    ("machine wandb.corp.example login user password abc123\n",
     "https://wandb.corp.example:8080", False),
    ("machine api.wandb.ai login user password abc123\n", "https://wandb.corp.example", True),
    ("machine api.wandb.ai login user password\n", None, True),  # unparseable: no key
])
def test_netrc_entry_for_the_wandb_host(env: pytest.MonkeyPatch, tmp_path: Path, text: str,
                                        base_url: str | None, offline: bool) -> None:
    """``wandb login`` stores the key in netrc under the W&B host (``WANDB_BASE_URL``'s)."""
    _netrc(env, tmp_path, text)
    if base_url is not None:
        env.setenv("WANDB_BASE_URL", base_url)
    assert detect_offline() is offline


def test_missing_netrc_is_offline(env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env.setenv("NETRC", str(tmp_path / "no-such-netrc"))
    assert detect_offline() is True


@pytest.mark.parametrize(("name", "value"), [
    ("WANDB_MODE", "offline"), ("WANDB_MODE", " Disabled "), ("WANDB_MODE", "dryrun"),
    ("REPRO_OFFLINE", "1"), ("REPRO_OFFLINE", "true"),
])
def test_forced_offline_beats_credentials(env: pytest.MonkeyPatch, name: str,
                                          value: str) -> None:
    env.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    assert detect_offline() is False
    env.setenv(name, value)
    constants.reload()
    assert detect_offline() is True


@pytest.mark.parametrize(("name", "value"), [("WANDB_MODE", "online"), ("REPRO_OFFLINE", "0")])
def test_explicitly_online_settings_keep_credentials_deciding(env: pytest.MonkeyPatch,
                                                              name: str, value: str) -> None:
    env.setenv(name, value)
    constants.reload()
    assert detect_offline() is True  # no credentials
    env.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    assert detect_offline() is False


@pytest.mark.parametrize("logged_in", [False, True])
def test_context_records_the_detected_mode(env: pytest.MonkeyPatch, manager: ArtifactManager,
                                           store_root: Path, logged_in: bool) -> None:
    """``offline_mode=None`` asks :func:`detect_offline` and keeps the answer in the run's
    config (``_repro.offline``); an explicit value wins over detection."""
    if logged_in:
        env.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    with ExperimentContext(name="auto", root=store_root, monitor_hardware=False,
                           capture_level=1) as auto:
        assert manager.offline_mode is (not logged_in)
    with ExperimentContext(name="forced", root=store_root, monitor_hardware=False,
                           capture_level=1, offline_mode=logged_in) as forced:
        pass
    assert auto.run is not None and forced.run is not None
    assert manager.get_run(auto.run.id or "")["config"]["_repro"] == {"offline": not logged_in}
    assert manager.get_run(forced.run.id or "")["config"]["_repro"] == {"offline": logged_in}
