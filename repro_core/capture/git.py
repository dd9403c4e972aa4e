"""State of the git repository a run starts in: commit, branch, remotes, dirty flag, and (on
request) the uncommitted changes as a patch.

Every git call is a subprocess with a timeout (``REPRO_GIT_TIMEOUT`` seconds, default 10, in
``constants``), with
``GIT_OPTIONAL_LOCKS=0`` so ``git status`` never takes ``index.lock`` away from a concurrent
``git commit`` of the user, and ``GIT_TERMINAL_PROMPT=0`` so nothing ever waits for a password.

``dirty`` means *tracked* files differ from HEAD (staged or not), as ``git describe --dirty``;
untracked files are listed separately (COMPLETE) because build outputs would otherwise mark every
run dirty.

The patch is capped: past ``max_bytes`` it is cut at a line boundary and ends with the line
``# [repro: patch truncated at N bytes of M]`` — never cut silently.

Everything :func:`git_info` returns is scrubbed by the :class:`~.redact.Redactor` it is given
(default: ``REPRO_REDACT_ALLOW``/``DENY``): remote URLs and messages as text, the patch with
:meth:`~.redact.Redactor.patch` (``DB_PASSWORD = "…"`` in a diff loses its value; the lines,
their count and the truncation marker stay). ``patch_bytes`` is the size git produced.
:func:`git_patch` returns raw bytes: scrub them before storing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import constants
from ..errors import InvalidArgumentError, ReproError
from .redact import Redactor

__all__ = [
    "DEFAULT_MAX_PATCH_BYTES", "GitCommandError", "git_info", "git_patch", "truncation_marker",
]

DEFAULT_MAX_PATCH_BYTES = 1 << 20
_MAX_UNTRACKED = 1000
_READ_CHUNK = 1 << 20


class GitCommandError(ReproError, RuntimeError):
    """A git command failed or timed out; the message says which and why."""


class _NoGit(Exception):
    """git is not installed, or the directory is not inside a work tree."""


def _timeout() -> float:
    return constants.REPRO_GIT_TIMEOUT


def _git_env() -> dict[str, str]:
    return {
        **os.environ, "GIT_OPTIONAL_LOCKS": "0", "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C",
        "GIT_PAGER": "cat",
    }


def _git(args: list[str], cwd: Path, timeout: float) -> bytes:
    """Run ``git args`` in ``cwd``; raise ``_NoGit`` if git is missing, ``GitCommandError`` else."""
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, timeout=timeout, env=_git_env(),
            stdin=subprocess.DEVNULL, check=False,
        )
    except FileNotFoundError as exc:
        raise _NoGit("git is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise GitCommandError(f"git {args[0]} timed out after {timeout:g} s") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise GitCommandError(f"git {args[0]} failed: {err[-1] if err else proc.returncode}")
    return proc.stdout


def git_info(
    path: str | Path | None = None,
    *,
    patch: bool = False,
    max_patch_bytes: int | None = None,
    redactor: Redactor | None = None,
) -> dict[str, Any] | None:
    """Commit, branch, remotes and dirty flag of the repo containing ``path`` (default cwd).

    Returns None when git is missing or ``path`` is not in a work tree. A later command that
    fails (timeout, corrupt repo) leaves its field None and is named in ``errors``.
    With ``patch=True`` adds ``patch`` (text of ``git diff HEAD``, capped) and ``untracked``.
    Every string is scrubbed by ``redactor`` (see the module docstring).
    """
    cwd = Path(path) if path is not None else Path.cwd()
    if not cwd.is_dir():
        raise InvalidArgumentError(f"path={str(cwd)!r} is not a directory", argument="path")
    timeout = _timeout()
    try:
        head = _head(cwd, timeout)
    except _NoGit:
        return None
    info: dict[str, Any] = {**head, "remote": None, "remotes": {}, "dirty": None, "errors": []}
    _add_remotes(info, cwd, timeout)
    untracked = _add_status(info, cwd, timeout)
    if patch:
        info["untracked"] = untracked[:_MAX_UNTRACKED]
        info["untracked_count"] = len(untracked)
        _add_patch(info, cwd, timeout, max_patch_bytes)
    return _scrubbed(info, redactor or Redactor.from_settings())


def _scrubbed(info: dict[str, Any], redactor: Redactor) -> dict[str, Any]:
    return {
        key: redactor.patch(value) if key == "patch" and value else redactor.tree(value)
        for key, value in info.items()
    }


def _head(cwd: Path, timeout: float) -> dict[str, Any]:
    try:
        top = _git(["rev-parse", "--show-toplevel"], cwd, timeout).decode("utf-8", "replace")
    except GitCommandError as exc:
        raise _NoGit(str(exc)) from exc
    try:
        raw = _git(["rev-parse", "HEAD", "--abbrev-ref", "HEAD"], cwd, timeout)
        out = raw.decode("utf-8", "replace").split()
        commit, branch = out[0], out[1]
    except (GitCommandError, IndexError):  # no commit yet
        commit, branch = None, None
    return {"root": top.strip(), "commit": commit, "branch": None if branch == "HEAD" else branch}


def _add_remotes(info: dict[str, Any], cwd: Path, timeout: float) -> None:
    try:
        out = _git(["config", "--get-regexp", r"^remote\..*\.url$"], cwd, timeout)
    except GitCommandError:  # exit status 1 = no remote configured: not an error
        return
    remotes: dict[str, str] = {}
    for line in out.decode("utf-8", "replace").splitlines():
        key, _, url = line.partition(" ")
        remotes[key.removeprefix("remote.").removesuffix(".url")] = url
    info["remotes"] = remotes
    info["remote"] = remotes.get("origin") or next(iter(remotes.values()), None)


def _add_status(info: dict[str, Any], cwd: Path, timeout: float) -> list[str]:
    """Set ``dirty`` from ``git status``; return the untracked paths it listed."""
    try:
        out = _git(["status", "--porcelain=v1", "-z", "--untracked-files=normal"], cwd, timeout)
    except GitCommandError as exc:
        info["errors"].append(str(exc))
        return []
    entries = [e for e in out.decode("utf-8", "replace").split("\0") if e]
    untracked = [e[3:] for e in entries if e.startswith("?? ")]
    # Renames add the old path as an extra NUL-separated entry without a status prefix; any
    # non-"??" entry means a tracked change, which is all ``dirty`` needs.
    info["dirty"] = len(untracked) != len(entries)
    return untracked


def _add_patch(
    info: dict[str, Any], cwd: Path, timeout: float, max_bytes: int | None
) -> None:
    if info["commit"] is None:
        info.update(patch=None, patch_bytes=0, patch_truncated=False)
        return
    try:
        raw, total = git_patch(cwd, max_bytes=max_bytes, timeout=timeout)
    except GitCommandError as exc:
        info["errors"].append(str(exc))
        info.update(patch=None, patch_bytes=None, patch_truncated=None)
        return
    info.update(
        patch=raw.decode("utf-8", "replace"), patch_bytes=total, patch_truncated=len(raw) != total
    )


def truncation_marker(kept: int, total: int) -> bytes:
    """The line that ends a capped patch, so a reader always knows it is incomplete."""
    return f"# [repro: patch truncated at {kept} bytes of {total}]\n".encode()


@dataclass
class _Capped:
    head: bytearray
    total: int = 0


def git_patch(
    path: str | Path, *, max_bytes: int | None = None, timeout: float | None = None
) -> tuple[bytes, int]:
    """``git diff --binary HEAD`` (staged + unstaged changes) as bytes, and its full size.

    Streams the output so a huge diff costs ``max_bytes`` of memory, not its size; when cut,
    the result ends at a line boundary followed by :func:`truncation_marker`.
    """
    limit = _max_patch_bytes() if max_bytes is None else max_bytes
    timeout = _timeout() if timeout is None else timeout
    args = ["git", "-c", "core.quotepath=off", "diff", "--no-ext-diff", "--no-color",
            "--binary", "HEAD"]
    try:
        # Its own process group: a `git` that is a wrapper script (shims, module systems)
        # leaves children holding our pipes, and killing the wrapper alone would leave the
        # reads below blocked until they exit; the timer kills the whole group.
        proc = subprocess.Popen(
            args, cwd=Path(path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, env=_git_env(), start_new_session=True,
        )
    except FileNotFoundError as exc:
        raise GitCommandError("git is not installed") from exc
    timer = threading.Timer(timeout, _kill_group, (proc,))  # a blocking read cannot time out
    timer.start()
    try:
        capped = _read_capped(proc, limit)
        err = proc.stderr.read() if proc.stderr else b""
        code = proc.wait()
    finally:
        timer.cancel()
    if code != 0:
        reason = "timed out" if code < 0 else err.decode("utf-8", "replace").strip()
        raise GitCommandError(f"git diff failed: {reason}")
    return _finish(capped, limit), capped.total


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _read_capped(proc: subprocess.Popen[bytes], limit: int) -> _Capped:
    capped = _Capped(bytearray())
    assert proc.stdout is not None
    while chunk := proc.stdout.read(_READ_CHUNK):
        capped.total += len(chunk)
        room = limit + 1 - len(capped.head)
        if room > 0:
            capped.head += chunk[:room]
    return capped


def _finish(capped: _Capped, limit: int) -> bytes:
    if capped.total <= limit:
        return bytes(capped.head)
    head = bytes(capped.head[:limit])
    cut = head.rfind(b"\n") + 1  # keep whole lines; 0 if the first line is already too long
    return head[:cut] + truncation_marker(cut, capped.total)


def _max_patch_bytes() -> int:
    return constants.REPRO_MAX_PATCH_BYTES
