"""repro_lightning's public surface, the one-line failure of the Lightning names without the
`lightning` package, and the Accelerate names working without it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import repro_lightning

EXPECTED = [
    "ReproCallback", "ReproLogger", "ReproTracker", "SafetensorsCheckpointIO", "TTRLLogger",
    "TorchLoggingCheckpointIO", "checkpoint_callback", "checkpoint_path",
    "load_from_checkpoint", "load_state", "save_model", "save_state", "state_path",
]


def test_all_is_the_documented_surface() -> None:
    assert repro_lightning.__all__ == sorted(repro_lightning.__all__) == EXPECTED
    for name in EXPECTED:
        assert getattr(repro_lightning, name) is not None


def _import_without_lightning(extra: str = "", use: str = "repro_lightning.ReproCallback"
                              ) -> subprocess.CompletedProcess[str]:
    """Import repro_lightning in a process where `lightning` cannot be found."""
    code = textwrap.dedent(f"""
        import importlib.util, sys
        real = importlib.util.find_spec
        def find_spec(name, *args, **kwargs):
            if name == "lightning" or name.startswith("lightning."):
                return None
            {extra}
            return real(name, *args, **kwargs)
        importlib.util.find_spec = find_spec
        for mod in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")]:
            del sys.modules[mod]
        import repro_lightning
        {use}
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_without_lightning_one_clear_line() -> None:
    result = _import_without_lightning()
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError:")
    assert "pip install 'repro-lightning[lightning]'" in last


def test_with_only_pytorch_lightning_says_which_to_use() -> None:
    fake = 'if name == "pytorch_lightning": return real("json")'
    result = _import_without_lightning(fake)
    last = result.stderr.strip().splitlines()[-1]
    assert "pytorch_lightning" in last and "import lightning.pytorch as pl" in last


def test_accelerate_names_work_without_lightning() -> None:
    use = ("from repro_lightning import ReproTracker, save_state; "
           "assert ReproTracker.name == 'repro'; "
           "assert not any(m.startswith('lightning') for m in sys.modules), "
           "[m for m in sys.modules if m.startswith('lightning')]")
    result = _import_without_lightning(use=use)
    assert result.returncode == 0, result.stderr


def test_unknown_name_is_an_attribute_error() -> None:
    try:
        repro_lightning.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("an unknown name must raise AttributeError")
