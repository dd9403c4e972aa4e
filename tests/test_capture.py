"""Environment, git, GPU (NVML), seed, validation and config capture — on real things: a real
git repository, the real interpreter's packages, a real store. Only NVML is faked (no GPU)."""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib.metadata
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from collections import namedtuple
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from packaging.utils import canonicalize_name

import repro_core
from repro_core import ArtifactManager
from repro_core.capture import (
    REDACTED,
    ConfigCapture,
    EnvironmentCaptureLevel,
    capture_config,
    capture_environment,
    gpu_info,
    recorded_seed,
    seed_everything,
    validate_environment,
)
from repro_core.capture.gpu import visible_indices
from repro_core.errors import InvalidArgumentError, SerializationError
from repro_core.serialize import canonical_json

MARK = "SUPERSECRET-MARKER-123"
GIB = 1 << 30
BASIC, STANDARD, COMPLETE = (
    EnvironmentCaptureLevel.BASIC, EnvironmentCaptureLevel.STANDARD,
    EnvironmentCaptureLevel.COMPLETE,
)
PATCH_MARKER = re.compile(r"# \[repro: patch truncated at (\d+) bytes of (\d+)\]\n\Z")


# -- helpers ------------------------------------------------------------------------------------


def git(repo: Path, *args: str) -> bytes:
    """Run git in ``repo`` isolated from the user's config (no signing, no hooks)."""
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(
        ["git", "-c", "user.name=Repro Test", "-c", "user.email=test@example.com",
         "-c", "commit.gpgsign=false", *args],
        cwd=repo, env=env, check=True, capture_output=True,
    ).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    (root / "train.py").write_text("lr = 0.1\n")
    git(root, "add", "train.py")
    git(root, "commit", "-q", "-m", "init")
    return root


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


class FakeNVML:
    """The pynvml calls gpu.py makes; ``fail`` = {(function, gpu index)} raising NVMLError."""

    NVMLError = FakeNVMLError

    def __init__(self, gpus: list[tuple[str, int, tuple[int, int]]], *,
                 fail: set[tuple[str, int]] | None = None, init_error: bool = False) -> None:
        self.gpus, self.fail, self.init_error = gpus, fail or set(), init_error
        self.inits = self.shutdowns = 0

    def _check(self, function: str, index: int) -> int:
        if (function, index) in self.fail:
            raise FakeNVMLError(f"{function} failed on {index}")
        return index

    def nvmlInit(self) -> None:
        if self.init_error:
            raise FakeNVMLError("Driver Not Loaded")
        self.inits += 1

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return self._check("nvmlDeviceGetHandleByIndex", index)

    def nvmlDeviceGetName(self, handle: int) -> bytes | str:
        name = self.gpus[self._check("nvmlDeviceGetName", handle)][0]
        return name.encode() if handle == 0 else name  # old pynvml returns bytes

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        total = self.gpus[self._check("nvmlDeviceGetMemoryInfo", handle)][1]
        return SimpleNamespace(total=total, free=total // 2, used=total - total // 2)

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return self.gpus[self._check("nvmlDeviceGetCudaComputeCapability", handle)][2]

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12040


TWO_GPUS = [("NVIDIA A100-SXM4-40GB", 40 * GIB, (8, 0)), ("NVIDIA H100 80GB HBM3", 80 * GIB,
                                                             (9, 0))]


# -- environment levels -------------------------------------------------------------------------


def test_levels_are_supersets_with_expected_keys(repo: Path) -> None:
    basic = capture_environment(BASIC, path=repo)
    standard = capture_environment(STANDARD, path=repo)
    complete = capture_environment(COMPLETE, path=repo)
    basic_keys = {"capture_level", "python", "platform", "hostname", "command", "cwd",
                  "repro_version", "frameworks", "git"}
    standard_keys = basic_keys | {"packages", "cpu", "memory", "cuda", "gpu", "determinism",
                                  "seeds"}
    assert set(basic) == basic_keys
    assert set(standard) == standard_keys
    assert set(complete) == standard_keys | {"conda", "container", "env_vars"}
    assert set(basic["git"]) < set(complete["git"])
    assert [e["capture_level"] for e in (basic, standard, complete)] == [
        "BASIC", "STANDARD", "COMPLETE"]
    for env in (basic, standard, complete):
        json.loads(canonical_json(env))  # strict JSON: no NaN, no odd types


def test_basic_fields_describe_this_process(repo: Path) -> None:
    env = ConfigCapture.capture_environment(BASIC, path=repo)
    assert env["python"]["version"] == platform.python_version()
    assert env["python"]["executable"] == sys.executable
    assert env["repro_version"] == repro_core.__version__
    assert env["cwd"] == os.getcwd()
    assert env["command"][0] == sys.argv[0]
    assert env["frameworks"]["torch"] == _installed("torch")
    assert env["frameworks"]["accelerate"] == _installed("accelerate")


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def test_level_accepts_names_and_ints_and_rejects_others(repo: Path) -> None:
    assert capture_environment("basic", path=repo)["capture_level"] == "BASIC"
    assert capture_environment(1, path=repo)["capture_level"] == "BASIC"
    for bad in (0, 4, "everything", True, None):
        with pytest.raises(InvalidArgumentError):
            capture_environment(bad, path=repo)  # type: ignore[arg-type]


def test_packages_match_importlib_metadata(repo: Path) -> None:
    packages = capture_environment(STANDARD, path=repo)["packages"]
    expected = {canonicalize_name(d.name) for d in importlib.metadata.distributions() if d.name}
    assert set(packages) == expected
    assert len(packages) == len(expected) > 10
    for name in ("numpy", "packaging", "psutil", "pytest"):
        assert packages[name] == importlib.metadata.version(name)


def test_cpu_and_memory_are_real(repo: Path) -> None:
    env = capture_environment(STANDARD, path=repo)
    assert env["cpu"]["logical_cores"] == os.cpu_count()
    assert env["memory"]["total_bytes"] > 100 << 20


def test_capture_never_imports_torch_and_survives_without_it(tmp_path: Path) -> None:
    """STANDARD leaves torch unimported; COMPLETE works when torch cannot be imported."""
    code = (
        "import sys, json\n"
        "from repro_core.capture import capture_environment\n"
        "heavy = [m for m in ('torch', 'lightning', 'pynvml', 'wandb') if m in sys.modules]\n"
        "env = capture_environment(2)\n"
        "std = ('torch' in sys.modules, env['cuda']['torch_imported'], env['determinism'])\n"
        "sys.modules['torch'] = None  # import torch now raises ImportError\n"
        "env = capture_environment(3)\n"
        "print(json.dumps([heavy, std, env['cuda']['torch_imported']]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, check=True).stdout
    heavy, (torch_loaded, torch_reported, determinism), complete_torch = json.loads(out)
    assert heavy == []
    assert torch_loaded is False and torch_reported is False
    assert determinism["torch"] is None and "import_torch=True" in determinism["note"]
    assert complete_torch is False


def test_torch_sections_when_torch_is_imported(repo: Path) -> None:
    torch = pytest.importorskip("torch")
    env = capture_environment(STANDARD, path=repo)
    assert env["cuda"]["torch_imported"] is True
    assert env["cuda"]["torch_version"] == str(torch.__version__)
    assert env["cuda"]["cuda_version"] == torch.version.cuda
    assert env["cuda"]["device_count"] == torch.cuda.device_count()
    det = env["determinism"]["torch"]
    assert det["deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert det["cudnn_benchmark"] == torch.backends.cudnn.benchmark


def test_complete_has_conda_container_and_redacted_env(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONDA_DEFAULT_ENV", "research")
    monkeypatch.setenv("CONDA_PREFIX", "/opt/conda/envs/research")
    monkeypatch.setenv("REPRO_TEST_PLAIN", "visible")
    monkeypatch.setenv("REPRO_TEST_TOKEN", MARK)
    env = capture_environment(COMPLETE, path=repo)
    assert env["conda"] == {"env": "research", "prefix": "/opt/conda/envs/research"}
    assert env["container"]["dockerenv"] == os.path.exists("/.dockerenv")
    assert env["env_vars"]["REPRO_TEST_PLAIN"] == "visible"
    assert env["env_vars"]["REPRO_TEST_TOKEN"] == REDACTED
    monkeypatch.delenv("CONDA_DEFAULT_ENV")
    monkeypatch.delenv("CONDA_PREFIX")
    assert capture_environment(COMPLETE, path=repo)["conda"] is None


# -- git ----------------------------------------------------------------------------------------


def test_git_clean_then_dirty_with_patch(repo: Path) -> None:
    head = git(repo, "rev-parse", "HEAD").decode().strip()
    clean = capture_environment(BASIC, path=repo)["git"]
    assert clean["commit"] == head
    assert clean["branch"] == "main"
    assert clean["dirty"] is False
    assert clean["remote"] is None

    (repo / "notes.txt").write_text("untracked only\n")
    assert capture_environment(BASIC, path=repo)["git"]["dirty"] is False  # untracked ≠ dirty

    (repo / "train.py").write_text("lr = 0.1\nwarmup = 500  # changed line\n")
    dirty = capture_environment(COMPLETE, path=repo)["git"]
    assert dirty["dirty"] is True
    assert "+warmup = 500  # changed line" in dirty["patch"]
    assert dirty["patch_truncated"] is False
    assert dirty["patch_bytes"] == len(dirty["patch"].encode())
    assert dirty["untracked"] == ["notes.txt"]
    assert "patch" not in capture_environment(STANDARD, path=repo)["git"]


def test_staged_change_is_dirty(repo: Path) -> None:
    (repo / "model.py").write_text("layers = 4\n")
    git(repo, "add", "model.py")
    info = capture_environment(COMPLETE, path=repo)["git"]
    assert info["dirty"] is True
    assert "+layers = 4" in info["patch"]


def test_huge_patch_is_truncated_with_marker(repo: Path) -> None:
    (repo / "train.py").write_text("".join(f"value_{i} = {i} * 12345\n" for i in range(20_000)))
    full = git(repo, "-c", "core.quotepath=off", "diff", "--no-ext-diff", "--no-color",
               "--binary", "HEAD")
    info = capture_environment(COMPLETE, path=repo, max_patch_bytes=10_000)["git"]
    match = PATCH_MARKER.search(info["patch"])
    assert match is not None, info["patch"][-200:]
    kept, total = int(match.group(1)), int(match.group(2))
    assert total == len(full) == info["patch_bytes"] > 10_000
    assert 0 < kept <= 10_000
    body = info["patch"][: match.start()].encode()
    assert body == full[:kept] and body.endswith(b"\n")  # whole lines, exact prefix
    assert info["patch_truncated"] is True


def test_remote_credentials_are_redacted(repo: Path) -> None:
    git(repo, "remote", "add", "origin", f"https://user:{MARK}@example.com/org/repo.git")
    git(repo, "remote", "add", "mirror", "git@example.com:org/repo.git")
    info = capture_environment(BASIC, path=repo)["git"]
    assert info["remote"] == f"https://{REDACTED}@example.com/org/repo.git"
    assert info["remotes"]["mirror"] == "git@example.com:org/repo.git"


def test_not_a_repo_and_git_missing(tmp_path: Path, repo: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert capture_environment(BASIC, path=plain)["git"] is None
    with pytest.raises(InvalidArgumentError):
        capture_environment(BASIC, path=tmp_path / "missing")
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no git on PATH
    assert capture_environment(BASIC, path=repo)["git"] is None


def test_repo_without_commit(tmp_path: Path) -> None:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    git(fresh, "init", "-q")
    info = capture_environment(COMPLETE, path=fresh)["git"]
    assert info["commit"] is None and info["patch"] is None


# -- git settings from the environment (REPRO_GIT_TIMEOUT, REPRO_MAX_PATCH_BYTES) ----------------


@pytest.fixture
def settings() -> Iterator[pytest.MonkeyPatch]:
    """A MonkeyPatch whose environment changes ``constants`` re-reads (before and after)."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp
    repro_core.constants.reload()


def _hanging_git(bin_dir: Path, hang_on: str, *, exec_sleep: bool = True) -> Path:
    """A ``git`` that behaves like the real one except that the ``hang_on`` subcommand never
    answers (as git does on a stalled network filesystem). ``exec_sleep=False``: the script
    sleeps in a child, as a wrapper or shim around git would, and keeps the pipes open."""
    real = shutil.which("git")
    assert real is not None
    sleep = "exec sleep 60" if exec_sleep else "sleep 30; exit 0"
    bin_dir.mkdir()
    script = bin_dir / "git"
    script.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "{hang_on}" ] && {{ {sleep}; }}\n'
                      f'done\nexec "{real}" "$@"\n')
    script.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("hang_on", ["rev-parse", "status", "diff"])
def test_git_timeout_from_the_environment(repo: Path, tmp_path: Path, hang_on: str,
                                          settings: pytest.MonkeyPatch) -> None:
    """Each git call of a capture gives up after ``REPRO_GIT_TIMEOUT`` seconds: a hanging git
    costs the capture about that (the default, 10 s, would fail the bound), the call that
    hung is named in ``errors`` and the rest of the capture is kept."""
    (repo / "train.py").write_text("lr = 0.2\n")
    settings.setenv("PATH", f"{_hanging_git(tmp_path / 'bin', hang_on)}{os.pathsep}"
                            f"{os.environ['PATH']}")
    settings.setenv("REPRO_GIT_TIMEOUT", "0.5")
    repro_core.constants.reload()
    began = time.monotonic()
    info = capture_environment(COMPLETE, path=repo)["git"]
    elapsed = time.monotonic() - began
    assert elapsed < 6.0, f"capture took {elapsed:.1f} s with REPRO_GIT_TIMEOUT=0.5"
    if hang_on == "rev-parse":  # the first call: no usable git here, as without git at all
        assert info is None
        return
    assert info["commit"] == git(repo, "rev-parse", "HEAD").decode().strip()
    if hang_on == "status":
        assert info["errors"] == ["git status timed out after 0.5 s"] and info["dirty"] is None
        assert "+lr = 0.2" in info["patch"]
    else:
        assert info["errors"] == ["git diff failed: timed out"] and info["dirty"] is True
        assert info["patch"] is None and info["patch_truncated"] is None


@pytest.mark.slow
def test_git_timeout_holds_when_git_is_a_wrapper(repo: Path, tmp_path: Path,
                                                 settings: pytest.MonkeyPatch) -> None:
    """A ``git`` that is a wrapper script (a shim, a module-system wrapper) whose real git
    hangs: killing the wrapper alone would leave its child holding stdout, so the capture
    would wait for the child (here 30 s) instead of ``REPRO_GIT_TIMEOUT``; git runs in its own
    process group, and the whole group is killed."""
    (repo / "train.py").write_text("lr = 0.2\n")
    bin_dir = _hanging_git(tmp_path / "bin", "diff", exec_sleep=False)
    settings.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    settings.setenv("REPRO_GIT_TIMEOUT", "0.5")
    repro_core.constants.reload()
    began = time.monotonic()
    info = capture_environment(COMPLETE, path=repo)["git"]
    assert info["errors"] == ["git diff failed: timed out"]
    assert time.monotonic() - began < 15.0  # 0.5 s when the group is killed, 30 s if not


def test_max_patch_bytes_from_the_environment(repo: Path,
                                              settings: pytest.MonkeyPatch) -> None:
    """``REPRO_MAX_PATCH_BYTES`` caps the captured patch (whole lines + the marker) when the
    caller passes no cap; an explicit ``max_patch_bytes`` still wins."""
    (repo / "train.py").write_text("".join(f"value_{i} = {i}\n" for i in range(500)))
    full = git(repo, "-c", "core.quotepath=off", "diff", "--no-ext-diff", "--no-color",
               "--binary", "HEAD")
    settings.setenv("REPRO_MAX_PATCH_BYTES", "300")
    repro_core.constants.reload()
    info = capture_environment(COMPLETE, path=repo)["git"]
    match = PATCH_MARKER.search(info["patch"])
    assert match is not None and int(match.group(2)) == len(full) == info["patch_bytes"]
    assert 0 < int(match.group(1)) <= 300 and info["patch_truncated"] is True
    assert info["patch"][: match.start()].encode() == full[: int(match.group(1))]
    uncapped = capture_environment(COMPLETE, path=repo, max_patch_bytes=len(full))["git"]
    assert uncapped["patch"].encode() == full and uncapped["patch_truncated"] is False


# -- secrets end to end -------------------------------------------------------------------------


SECRET_ENV = [
    "MY_API_KEY", "GITHUB_TOKEN", "DB_PASSWORD", "SMTP_PASS", "MYSQL_PWD", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY", "HF_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
    "client_secret", "Stripe_Key", "db_passwd",
]


@dataclasses.dataclass
class Credentials:
    user: str
    password: str


def test_secrets_never_reach_the_store(
    repo: Path, manager: ArtifactManager, store_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in SECRET_ENV:
        monkeypatch.setenv(name, MARK)
    monkeypatch.setenv("DATABASE_URL", f"https://user:{MARK}@host/repo")
    monkeypatch.setenv("NOTES", f"see https://{MARK}@host/x?page=1&access_token={MARK}")
    monkeypatch.setattr(sys, "argv", ["train.py", "--api-key", MARK, f"--token={MARK}",
                                      f"https://u:{MARK}@h/r", "--lr", "0.1"])
    git(repo, "remote", "add", "origin", f"https://user:{MARK}@host/repo")
    (repo / "train.py").write_text(f"lr = 0.1\nURL = 'https://bot:{MARK}@host/data'\n")

    env = capture_environment(COMPLETE, path=repo)
    cfg = capture_config({
        "lr": 0.1, "api_key": MARK, "Secret": MARK, "aws_secret_access_key": MARK,
        "nested": {"password": MARK, "db": {"url": f"postgres://u:{MARK}@db/x"},
                   "list": [{"token": MARK}, {"ok": 1}]},
        "ns": argparse.Namespace(hf_token=MARK, epochs=3),
        "creds": Credentials(user="bob", password=MARK),
        "credentials": {"anything": "goes"},
    })
    assert all(env["env_vars"][name] == REDACTED for name in SECRET_ENV)
    assert "+URL = 'https://<redacted>@host/data'" in env["git"]["patch"]
    assert env["command"][:3] == ["train.py", "--api-key", REDACTED]
    assert cfg["lr"] == 0.1 and cfg["ns"]["epochs"] == 3 and cfg["creds"]["user"] == "bob"
    assert cfg["credentials"] == REDACTED

    manager.init_run("t", root=store_root, config=cfg)
    logged = [manager.log_artifact("environment", "environment", data=env),
              manager.log_artifact("config", "config", data=cfg)]
    manager.finalize_run()
    ArtifactManager.reset_instance()  # close SQLite so every byte is on disk

    files = [p for p in store_root.rglob("*") if p.is_file()]
    store = repro_core.LocalStorageBackend(store_root)
    for meta in logged:  # both artifacts' blobs are among the files searched
        assert store.blob_path(meta.hash or "") in files
    assert any(b"<redacted>" in p.read_bytes() for p in files)  # the artifacts are there
    leaks = [str(p) for p in files if MARK.encode() in p.read_bytes()]
    assert leaks == []


def test_capture_allow_and_deny(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_API_KEY", MARK)
    monkeypatch.setenv("LR_SCHEDULE", "cosine")
    env = capture_environment(COMPLETE, path=repo, redact_allow=["MY_API_KEY"],
                              redact_deny=["LR_*"])
    assert env["env_vars"]["MY_API_KEY"] == MARK
    assert env["env_vars"]["LR_SCHEDULE"] == REDACTED


# -- secrets inside the git patch (issue 8 item 9) -----------------------------------------------

KEY_MATERIAL = "SuperSecretKeyMaterial0123"
PEM_KEY = (f"-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n{KEY_MATERIAL}\n"
           "-----END RSA PRIVATE KEY-----\n")
GIT_DIFF = ("-c", "core.quotepath=off", "diff", "--no-ext-diff", "--no-color", "--binary", "HEAD")


def test_patch_assignments_are_scrubbed(repo: Path) -> None:
    (repo / "train.py").write_text(
        f'lr = 0.1\nDB_PASSWORD = "{MARK}"\nSECRET_TOKEN = \'{MARK}\'\n'
        f'headers = {{"Authorization": "Bearer {MARK}"}}\npassword_length = 12\n'
        'api_key = os.environ["API_KEY"]\ntoken = get_token()\nclient = Client(key=token)\n'
    )
    (repo / ".env").write_text(f"export AWS_SECRET_ACCESS_KEY={MARK}\nLR=0.1\nPASSWORD= \n")
    (repo / "config.yaml").write_text(
        f"db:\n  password: {MARK}  # rotate monthly\n  host: db.internal\n"
        "num_key_value_heads: 8\n"
    )
    (repo / "id_rsa").write_text(PEM_KEY)
    git(repo, "add", "-N", ".")  # intent to add: new files show in ``git diff HEAD``
    patch = capture_environment(COMPLETE, path=repo)["git"]["patch"]
    raw = git(repo, *GIT_DIFF).decode()
    assert MARK not in patch and MARK in raw
    assert KEY_MATERIAL not in patch and KEY_MATERIAL in raw
    for line in [
        f'+DB_PASSWORD = "{REDACTED}"', f"+SECRET_TOKEN = '{REDACTED}'",
        f'+headers = {{"Authorization": "Bearer {REDACTED}"}}', "+password_length = 12",
        '+api_key = os.environ["API_KEY"]', "+token = get_token()", "+client = Client(key=token)",
        f"+export AWS_SECRET_ACCESS_KEY={REDACTED}", "+LR=0.1",
        f"+  password: {REDACTED}  # rotate monthly", "+  host: db.internal",
        "+num_key_value_heads: 8", "+-----BEGIN RSA PRIVATE KEY-----", f"+{REDACTED}",
        "+-----END RSA PRIVATE KEY-----",
    ]:
        assert line in patch.splitlines(), line
    assert patch.count("\n") == raw.count("\n")  # hunks keep their sizes


def test_removed_secret_lines_are_scrubbed_too(repo: Path) -> None:
    (repo / "settings.py").write_text(f'DB_PASSWORD = "{MARK}"\n')
    git(repo, "add", "settings.py")
    git(repo, "commit", "-q", "-m", "oops")
    (repo / "settings.py").write_text('DB_PASSWORD = os.environ["DB_PASSWORD"]\n')
    patch = capture_environment(COMPLETE, path=repo)["git"]["patch"]
    assert MARK not in patch
    assert f'-DB_PASSWORD = "{REDACTED}"' in patch
    assert '+DB_PASSWORD = os.environ["DB_PASSWORD"]' in patch


def test_truncated_patch_keeps_marker_and_is_scrubbed(repo: Path) -> None:
    (repo / "train.py").write_text("".join(f'api_key_{i} = "{MARK}"\n' for i in range(2_000)))
    info = capture_environment(COMPLETE, path=repo, max_patch_bytes=10_000)["git"]
    assert MARK not in info["patch"]
    match = PATCH_MARKER.search(info["patch"])
    assert match is not None and info["patch_truncated"] is True
    assert int(match.group(2)) == info["patch_bytes"] > 10_000


REALISTIC_TRAIN = """\
import argparse
import os

import torch
from transformers import AutoTokenizer


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--api-key", default=None, help="W&B key; defaults to $WANDB_API_KEY")
    parser.add_argument("--tokenizer-name", default="meta-llama/Llama-2-7b-hf")
    return parser.parse_args(argv)


def main(api_key: str | None = None, token: str | None = None) -> None:
    args = parse()
    api_key = api_key or os.environ.get("WANDB_API_KEY")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name, token=token)
    tokenizer.pad_token = tokenizer.eos_token
    key = torch.Generator().manual_seed(0)
    attn = dict(num_key_value_heads=8, key_dim=64, max_tokens=4096)
    if key is None or api_key == "":
        raise KeyError(f"missing key: {key!r}")
    print(f"lr={args.lr} tokens/s={attn['max_tokens']}")
"""
REALISTIC_YAML = """\
model:
  name: llama-2-7b
  num_key_value_heads: 8
  max_position_embeddings: 4096
  pad_token: "<pad>"
  eos_token_id: 2
tokenizer: meta-llama/Llama-2-7b-hf
optimizer: {name: adamw, lr: 3.0e-4, betas: [0.9, 0.95]}
session_length: 128
data_url: https://huggingface.co/datasets/org/data
"""


def test_realistic_patch_without_secrets_is_byte_identical(repo: Path) -> None:
    (repo / "train.py").write_text(REALISTIC_TRAIN)
    (repo / "config.yaml").write_text(REALISTIC_YAML)
    (repo / "README.md").write_text("Run `python train.py --lr 0.1` (see `--api-key`).\n")
    git(repo, "add", "-N", ".")
    patch = capture_environment(COMPLETE, path=repo)["git"]["patch"]
    assert patch == git(repo, *GIT_DIFF).decode()


def test_git_info_scrubs_by_itself(repo: Path) -> None:
    from repro_core.capture import git_info

    git(repo, "remote", "add", "origin", f"https://user:{MARK}@example.com/org/repo.git")
    (repo / "train.py").write_text(f'TOKEN = "{MARK}"\n')
    info = git_info(repo, patch=True)
    assert info is not None and MARK not in json.dumps(info)
    assert info["patch"].endswith(f'+TOKEN = "{REDACTED}"\n')


# -- GPU / NVML ---------------------------------------------------------------------------------


def test_real_nvml_absent_gives_empty_list_and_note() -> None:
    info = gpu_info()
    if info["devices"]:
        pytest.skip("this machine has a GPU")
    assert info["devices"] == []
    from repro_core.capture.gpu import _INSTALL_HINT

    note = info["nvml_error"]  # pynvml missing, or present without a driver
    assert note == _INSTALL_HINT or note.startswith("NVML unavailable: "), note


def test_pynvml_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    info = gpu_info()
    assert info["devices"] == []
    assert "pip install 'repro-lightning[nvml]'" in info["nvml_error"]


def test_fake_nvml_two_gpus() -> None:
    nvml = FakeNVML(TWO_GPUS)
    info = gpu_info(nvml)
    assert info["nvml_error"] is None and info["errors"] == []
    assert info["driver_version"] == "550.54.15"
    assert info["cuda_driver_version"] == "12.4"
    assert info["devices"] == [
        {"index": 0, "name": "NVIDIA A100-SXM4-40GB", "memory_total_bytes": 40 * GIB,
         "compute_capability": "8.0"},
        {"index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_total_bytes": 80 * GIB,
         "compute_capability": "9.0"},
    ]
    assert nvml.inits == nvml.shutdowns == 1


def test_fake_nvml_error_is_reported_not_raised() -> None:
    nvml = FakeNVML(TWO_GPUS, fail={("nvmlDeviceGetMemoryInfo", 1)})
    info = gpu_info(nvml)
    assert info["devices"][0]["memory_total_bytes"] == 40 * GIB
    assert info["devices"][1]["memory_total_bytes"] is None
    assert info["devices"][1]["name"] == "NVIDIA H100 80GB HBM3"
    assert info["errors"] == ["nvmlDeviceGetMemoryInfo(gpu 1): FakeNVMLError: "
                              "nvmlDeviceGetMemoryInfo failed on 1"]
    assert nvml.shutdowns == 1


def test_fake_nvml_init_failure() -> None:
    nvml = FakeNVML(TWO_GPUS, init_error=True)
    info = gpu_info(nvml)
    assert info["devices"] == []
    assert "Driver Not Loaded" in info["nvml_error"]


def test_environment_uses_injected_nvml(repo: Path) -> None:
    env = capture_environment(STANDARD, path=repo, nvml_module=FakeNVML(TWO_GPUS))
    assert [d["name"] for d in env["gpu"]["devices"]] == [n for n, _, _ in TWO_GPUS]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, [0, 1, 2]), ("", []), ("2,0", [2, 0]), ("1,7,0", [1]), ("-1", []),
     ("GPU-1234abcd", None)],
)
def test_visible_indices(value: str | None, expected: list[int] | None,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert visible_indices(3) == expected


# -- seeds --------------------------------------------------------------------------------------


# conftest's autouse ``_restore_seed_state`` puts back what seed_everything sets.


def test_seed_everything_seeds_and_is_recorded(repo: Path) -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    assert seed_everything(1234, workers=True) == 1234
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    seed_everything(1234, workers=True)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first
    assert os.environ["PL_GLOBAL_SEED"] == "1234" and os.environ["PL_SEED_WORKERS"] == "1"
    seeds = capture_environment(STANDARD, path=repo)["seeds"]
    assert seeds["repro"] == {"seed": 1234, "workers": True, "deterministic": False,
                              "seeded": ["python", "numpy", "torch"]}
    assert seeds["PL_GLOBAL_SEED"] == "1234"
    assert recorded_seed() == seeds["repro"]


def test_seed_everything_deterministic(repo: Path) -> None:
    torch = pytest.importorskip("torch")
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        seed_everything(7, deterministic=True)
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        det = capture_environment(STANDARD, path=repo)["determinism"]
        assert det["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert det["torch"]["deterministic_algorithms"] is True
        assert det["torch"]["cudnn_deterministic"] is True
        assert det["torch"]["cudnn_benchmark"] is False
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2:]


@pytest.mark.parametrize("bad", [-1, 2**32, True, "1", 1.5])
def test_seed_everything_rejects_bad_seeds(bad: Any) -> None:
    with pytest.raises(InvalidArgumentError):
        seed_everything(bad)


def test_lightning_seed_env_is_captured(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PL_GLOBAL_SEED", "99")
    assert capture_environment(STANDARD, path=repo)["seeds"]["PL_GLOBAL_SEED"] == "99"


# -- validate_environment -----------------------------------------------------------------------


def test_validate_packages() -> None:
    numpy_version = importlib.metadata.version("numpy")
    ok = validate_environment(["numpy", f"numpy>={numpy_version}", "packaging>=20,<1000"])
    assert ok["is_valid"] is True and ok["errors"] == []
    assert ok["packages"]["numpy"] == numpy_version

    bad = ConfigCapture.validate_environment(["numpy<1.0", "no-such-package-xyz>=1"])
    assert bad["is_valid"] is False
    assert bad["packages"]["no-such-package-xyz"] is None
    assert any("numpy" in e and "numpy<1.0" in e for e in bad["errors"])
    assert any("no-such-package-xyz is not installed" in e for e in bad["errors"])
    assert len(bad["errors"]) == 2


def test_validate_versions_compare_as_versions() -> None:
    # packaging is >= 23 here; as text "9.0" > "23.0", so a string compare would fail this.
    assert validate_environment(["packaging>=9.0"])["is_valid"] is True


def test_validate_marker_not_applicable_is_a_warning() -> None:
    result = validate_environment(['no-such-package-xyz; python_version < "3"'])
    assert result["is_valid"] is True
    assert result["warnings"] and "marker" in result["warnings"][0]


@pytest.mark.parametrize("bad", [["torch>=>2"], ["not a requirement!"], "torch"])
def test_validate_rejects_invalid_requirements(bad: Any) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        validate_environment(bad)
    assert info.value.argument == "required_packages"
    assert repr(bad if isinstance(bad, str) else bad[0]) in str(info.value)


def test_validate_rejects_bad_numbers() -> None:
    with pytest.raises(InvalidArgumentError):
        validate_environment(min_gpu_memory_gb=-1)
    with pytest.raises(InvalidArgumentError):
        validate_environment(min_cuda_version="twelve")


@pytest.mark.parametrize(
    ("found", "minimum", "valid"),
    [("12.10", "12.9", True), ("12.1", "9.0", True), ("12.9", "12.10", False),
     ("11.8", "12.1", False), ("12.1", "12.1", True)],
)
def test_validate_cuda_version_numeric(found: str, minimum: str, valid: bool) -> None:
    result = validate_environment(min_cuda_version=minimum, cuda_version=found)
    assert result["is_valid"] is valid
    assert result["cuda_version"] == found
    assert bool(result["errors"]) is not valid


def test_validate_cuda_detection_source_is_patchable(monkeypatch: pytest.MonkeyPatch) -> None:
    from repro_core.capture import validate

    monkeypatch.setattr(validate, "detect_cuda_version", lambda gpus=None: ("12.10", "test"))
    result = validate_environment(min_cuda_version="12.9")
    assert result["is_valid"] is True and result["cuda_version_source"] == "test"
    monkeypatch.setattr(validate, "detect_cuda_version", lambda gpus=None: (None, "no CUDA"))
    result = validate_environment(min_cuda_version="11.0")
    assert result["is_valid"] is False and "no CUDA" in result["errors"][0]


def test_validate_gpu_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    nvml = FakeNVML(TWO_GPUS)
    assert validate_environment(min_gpu_memory_gb=32, nvml_module=nvml)["is_valid"] is True
    short = validate_environment(min_gpu_memory_gb=48, nvml_module=nvml)
    assert short["is_valid"] is False
    assert short["errors"] == ["GPU 0 (NVIDIA A100-SXM4-40GB) has 40.00 GiB, below the "
                               "required 48 GiB"]
    assert [g["name"] for g in short["gpus"]] == [n for n, _, _ in TWO_GPUS]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # only the H100 is used
    assert validate_environment(min_gpu_memory_gb=48, nvml_module=nvml)["is_valid"] is True


def test_validate_gpu_missing_or_unknown() -> None:
    none = validate_environment(min_gpu_memory_gb=1, nvml_module=FakeNVML([], init_error=True))
    assert none["is_valid"] is False and "no GPU found" in none["errors"][0]
    unknown = validate_environment(
        min_gpu_memory_gb=1, nvml_module=FakeNVML(TWO_GPUS, fail={("nvmlDeviceGetMemoryInfo", 0)})
    )
    assert unknown["is_valid"] is False and "memory size unknown" in unknown["errors"][0]
    assert unknown["warnings"]  # the NVML error itself is reported
    assert validate_environment(nvml_module=FakeNVML([]))["is_valid"] is True  # no requirement


# -- capture_config -----------------------------------------------------------------------------


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


@dataclasses.dataclass
class Optim:
    name: str = "adam"
    betas: tuple[float, float] = (0.9, 0.999)


@dataclasses.dataclass
class TrainConfig:
    data: Path = Path("/data/imagenet")
    color: Color = Color.RED
    level: Level = Level.HIGH
    optim: Optim = dataclasses.field(default_factory=Optim)
    tags: frozenset[str] = frozenset({"b", "a"})


def test_config_from_dict_and_dataclass() -> None:
    expected = {"data": "/data/imagenet", "color": "red", "level": 3,
                "optim": {"name": "adam", "betas": [0.9, 0.999]}, "tags": ["a", "b"]}
    assert capture_config(TrainConfig()) == expected
    assert capture_config({"cfg": TrainConfig()}) == {"cfg": expected}
    assert capture_config(None) == {}
    assert capture_config([1, 2]) == {"value": [1, 2]}


def test_config_from_namespace_and_namedtuple() -> None:
    point = namedtuple("point", "x y")
    ns = argparse.Namespace(lr=0.1, layers=[64, 64], out=Path("runs"), p=point(1, 2))
    assert capture_config(ns) == {"lr": 0.1, "layers": [64, 64], "out": "runs",
                                  "p": {"x": 1, "y": 2}}


def test_config_from_pydantic() -> None:
    pydantic = pytest.importorskip("pydantic")

    class Model(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        lr: float = 0.01
        path: Path = Path("/x")
        api_token: str = MARK

    assert capture_config(Model()) == {"lr": 0.01, "path": "/x", "api_token": REDACTED}

    class WithSecret(pydantic.BaseModel):  # type: ignore[misc,name-defined]
        db: pydantic.SecretStr = pydantic.SecretStr(MARK)  # type: ignore[name-defined]

    out = capture_config(WithSecret())
    assert out["db"]["__object__"]["type"] == "pydantic.types.SecretStr"
    assert MARK not in json.dumps(out)


def test_config_from_omegaconf() -> None:
    import omegaconf  # in the test extra: a missing one must fail, not skip
    cfg = omegaconf.OmegaConf.create({"lr": 0.1, "model": {"width": 8, "lr": "${lr}"}})
    assert capture_config(cfg) == {"lr": 0.1, "model": {"width": 8, "lr": 0.1}}


def test_config_from_lightning_hparams() -> None:
    data = pytest.importorskip("lightning.fabric.utilities.data")
    hparams = data.AttributeDict(lr=0.1, ns=argparse.Namespace(depth=2))
    assert capture_config(hparams) == {"lr": 0.1, "ns": {"depth": 2}}


def test_config_numpy_tensor_nan_and_keys() -> None:
    np = pytest.importorskip("numpy")
    torch = pytest.importorskip("torch")
    cfg = {
        "i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True), "nan": float("nan"),
        "inf": math.inf, "ninf": -math.inf, "np_nan": np.float64("nan"),
        "w": torch.zeros(64, 3, dtype=torch.float32), "small": torch.tensor([1.0, float("nan")]),
        "arr": np.ones((100, 2), dtype=np.int16), "set": {3, 1, 2}, "tup": (1, (2, 3)),
        1: "int key", None: "none key", 2.5: "float key", Color.RED: "enum key",
        "dtype": torch.float16,
    }
    out = capture_config(cfg)
    assert out["i"] == 3 and type(out["i"]) is int
    assert out["f"] == 0.5 and out["b"] is True
    assert (out["nan"], out["inf"], out["ninf"], out["np_nan"]) == ("nan", "inf", "-inf", "nan")
    assert out["w"] == {"__tensor__": {"shape": [64, 3], "dtype": "float32"}}
    assert out["small"] == {"__tensor__": {"shape": [2], "dtype": "float32",
                                           "values": [1.0, "nan"]}}
    assert out["arr"] == {"__ndarray__": {"shape": [100, 2], "dtype": "int16"}}
    assert out["set"] == [1, 2, 3] and out["tup"] == [1, [2, 3]]
    assert (out["1"], out["null"], out["2.5"], out["red"]) == (
        "int key", "none key", "float key", "enum key")
    assert capture_config({True: 1, False: 0}) == {"true": 1, "false": 0}
    assert out["dtype"] == "torch.float16"
    json.loads(canonical_json(out))


def test_config_key_collision_is_an_error() -> None:
    with pytest.raises(SerializationError):
        capture_config({1: "a", "1": "b"})


class Opaque:
    pass


def test_config_unknown_objects_and_cycles() -> None:
    cyclic: dict[str, Any] = {"name": "loop"}
    cyclic["self"] = cyclic
    out = capture_config({"obj": Opaque(), "fn": len, "loop": cyclic})
    assert out["obj"]["__object__"]["type"] == f"{__name__}.Opaque"
    assert "0x" not in out["obj"]["__object__"]["repr"]  # stable across processes
    assert out["fn"] == {"__object__": {"type": "builtins.builtin_function_or_method",
                                        "repr": "<built-in function len>"}}
    assert out["loop"]["self"]["__object__"]["repr"] == "<cycle>"
    assert capture_config({"obj": Opaque()}) == capture_config({"obj": Opaque()})


def test_config_secret_keys_nested_but_numbers_kept() -> None:
    out = capture_config({"model": {"num_key_value_heads": 8, "api_key": MARK,
                                    "tokenizer_name": "meta-llama/Llama-3-8B"},
                          "runs": [{"token": MARK}], "url": f"https://u:{MARK}@h/x"})
    assert out == {"model": {"num_key_value_heads": 8, "api_key": REDACTED,
                             "tokenizer_name": "meta-llama/Llama-3-8B"},
                   "runs": [{"token": REDACTED}], "url": f"https://{REDACTED}@h/x"}


def test_config_digest_is_stable_across_key_order() -> None:
    a = {"lr": 0.1, "model": {"depth": 4, "width": 8}, "tags": {"x", "y", "z"}}
    b = {"tags": {"z", "y", "x"}, "model": {"width": 8, "depth": 4}, "lr": 0.1}
    assert canonical_json(capture_config(a)) == canonical_json(capture_config(b))
    assert canonical_json(capture_config(a)) != canonical_json(
        capture_config({**a, "lr": 0.2}))
