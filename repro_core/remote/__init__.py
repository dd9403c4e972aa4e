"""Remotes: push and pull versions, runs and their registry rows between stores.

    from repro_core import remote
    remote.add_remote("origin", "s3://team-bucket/repro")
    remote.push("origin", run="3f2a…")            # a run, what it logged and used, upstream
    remote.pull("origin", "checkpoint:best", root="/fresh/store")

A remote is any store URL (``s3://``, ``gs://``, ``file://`` or a directory): blobs keep the
local layout (``blobs/<algo>/<ab>/<rest>``) and the registry rows travel as records beside them
(``meta/``: see ``_records``). A pulled store answers ``use_artifact``, ``repro lineage`` and
``repro verify`` as the source did. Push and pull are idempotent (a second push transfers
nothing) and resumable (an interrupted one is finished by the next). Version numbers never
collide: see ``_local`` for how a number logged on two machines is reconciled.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .. import _progress
from ..errors import (
    ArtifactNotFoundError,
    IntegrityError,
    InvalidArgumentError,
    ReproError,
    StorageError,
)
from ..registry import Registry
from ..store.local import LocalStorageBackend
from ..types import DEFAULT_PROJECT, parse_key
from ._config import (
    check_remote,
    default_remote,
    is_wandb,
    list_remotes,
    normalize_url,
    remove_remote,
    set_remote,
)
from ._exports import export_pulled_run
from ._local import closure
from ._pull import Puller
from ._queue import QueueItem, pending, push_selection
from ._records import AliasRecord, RemoteVersion, alias_path, decode, version_path
from ._remote import Remote, SyncReport

__all__ = ["QueueItem", "Remote", "SyncReport", "add_remote", "check_remote", "describe",
           "drop_remote", "pull", "push", "remotes", "status"]


_RUN_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{3,63}")


def _root(root: str | Path | None) -> Path:
    from .._store_access import default_root

    return Path(root).expanduser().absolute() if root is not None else default_root()


def _open(root: str | Path | None, *, create: bool | None = False
          ) -> tuple[Registry, LocalStorageBackend]:
    base = _root(root)
    registry = Registry(base / "registry.sqlite", create=create)
    registry.open()
    store = LocalStorageBackend(base, algorithm=registry.hash_algorithm())
    return registry, store


def add_remote(name: str, url: str, *, root: str | Path | None = None,
               replace: bool = False) -> str:
    """Name a remote of the store (``repro remote add``); returns its canonical URL."""
    normalize_url(url)  # a bad URL is refused before the store is opened
    registry, _ = _open(root)
    try:
        return set_remote(registry, name, url, replace=replace)
    finally:
        registry.close()


def remotes(*, root: str | Path | None = None) -> dict[str, str]:
    """Name -> URL of every remote of the store."""
    registry, _ = _open(root)
    try:
        return list_remotes(registry)
    finally:
        registry.close()


def drop_remote(name: str, *, root: str | Path | None = None) -> int | None:
    """Forget a remote (``repro remote remove``; nothing on it is deleted). Its queued
    background pushes go too: returns how many, or None when there was no such remote."""
    registry, _ = _open(root)
    try:
        url = list_remotes(registry).get(name)
        if not remove_remote(registry, name) or url is None:
            return None
        with registry.transaction() as conn:
            return int(conn.execute("DELETE FROM remote_queue WHERE url = ?", (url,)).rowcount)
    finally:
        registry.close()


def status(*, root: str | Path | None = None) -> dict[str, dict[str, object]]:
    """Per remote: ``url``, ``pending`` (the background pushes still queued, with attempts
    and last error) and ``unpushed`` (live versions of this store it has not received: what
    a ``repro push`` would send)."""
    registry, _ = _open(root)
    try:
        names = list_remotes(registry)
        by_url: dict[str, list[QueueItem]] = {}
        for item in pending(registry):
            by_url.setdefault(item.url, []).append(item)
        out: dict[str, dict[str, object]] = {}
        for name, url in names.items():
            out[name] = {"url": url, "pending": by_url.pop(url, []),
                         "unpushed": _unpushed(registry, url)}
        for url, left in by_url.items():  # queued for a remote since removed or unnamed
            out[url] = {"url": url, "pending": left, "unpushed": _unpushed(registry, url)}
        return out
    finally:
        registry.close()


def _unpushed(registry: Registry, url: str) -> int:
    return int(registry._read(
        "SELECT COUNT(*) FROM versions v WHERE v.pruned_at IS NULL AND NOT EXISTS (SELECT 1"
        " FROM remote_versions r WHERE r.url = ? AND r.version_id = v.id)", (url,))[0][0])


def describe(item: QueueItem, *, root: str | Path | None = None) -> str:
    """What a queued item is, as a person names it (``project/name:vN``, ``run <id>``)."""
    if item.kind != "version":
        return f"run {item.ref}"
    registry, _ = _open(root)
    try:
        return registry.get_version(int(item.ref)).key
    except (ReproError, ValueError):
        return f"version #{item.ref} (no longer in the store)"
    finally:
        registry.close()


def _selection(key: str | None, run: str | None, everything: bool) -> None:
    given = sum(x is not None and x is not False for x in (key, run, everything or None))
    if given > 1:
        raise InvalidArgumentError("give one of KEY, --run RUN or --all", argument="key")
    if key is not None:
        parse_key(key)


def push(remote: str | None = None, key: str | None = None, *, run: str | None = None,
         all: bool = False, root: str | Path | None = None,
         show_progress: bool = True, check: bool = False) -> SyncReport:
    """Push a version (``key``, with its upstream lineage), a run (``run``: what it logged
    and used) or everything (``all``, the default when nothing is named) to a remote.
    ``check``: look everything up on the remote again instead of trusting what this store
    recorded (a remote that lost data, or was restored from a backup, is repaired)."""
    _selection(key, run, all)
    registry, store = _open(root)
    try:
        name, url = default_remote(registry, remote)
        target = Remote.open(name, url)
        if key is not None:
            versions, runs = [registry.resolve(parse_key(key), anywhere=True).id], []
        elif run is not None:
            versions, runs = [], [registry.resolve_run_id(run)]
        else:
            versions = [v.id for v in registry.list_versions()]
            runs = [r.id for r in registry.list_runs()]
        report = SyncReport("push", name, url)
        total = sum(s for v in closure(registry, versions, runs)[0]
                    for _, s in registry.blobs_of(v))
        with _bar(total, f"push → {name}", show_progress) as advance:
            return push_selection(registry, store, target, versions, runs, report, advance,
                                  check=check)
    finally:
        registry.close()


def pull(remote: str | None = None, key: str | None = None, *, run: str | None = None,
         all: bool = False, root: str | Path | None = None,
         show_progress: bool = True) -> SyncReport:
    """Pull a version (``key``), a run (its id or a unique prefix of 4+ characters) or
    everything from a remote into the store. A store that does not exist yet is created —
    and removed again if the pull fails, so a failed first pull leaves nothing behind."""
    _selection(key, run, all)
    if run is not None and not (isinstance(run, str) and _RUN_PREFIX.fullmatch(run)):
        raise InvalidArgumentError(f"--run takes a run id or a unique prefix of 4+ "
                                   f"characters, got {run!r}", argument="run")
    base = _root(root)
    fresh = not base.exists() or (base.is_dir() and not any(base.iterdir()))
    if not fresh:
        registry, store = _open(base)
        try:
            return _pull(registry, store, base, None, remote, key, run, show_progress)
        finally:
            registry.close()
    named = _fresh_remote(remote, base)  # checked before anything is made
    # A new store is pulled into a hidden sibling and renamed into place: a failed pull
    # leaves nothing, and nothing another process puts at ``base`` meanwhile is touched.
    base.parent.mkdir(parents=True, exist_ok=True)
    _sweep_dead_pulls(base)
    work = Path(tempfile.mkdtemp(prefix=f".{base.name}.pull-", dir=base.parent))
    lock = _hold(Path(f"{work}.lock"))  # while held, no other pull sweeps ``work``
    try:
        registry, store = _open(work, create=True)
        try:
            report = _pull(registry, store, work, named, remote, key, run, show_progress)
        finally:
            registry.close()
        _move_into_place(work, base)
        return report
    finally:
        shutil.rmtree(work, ignore_errors=True)  # (gone already when it was moved)
        Path(f"{work}.lock").unlink(missing_ok=True)
        os.close(lock)


def _pull(registry: Registry, store: LocalStorageBackend, base: Path,
          named: tuple[str, str] | None, remote: str | None, key: str | None,
          run: str | None, show_progress: bool) -> SyncReport:
    name, url = named or default_remote(registry, remote)
    if named is not None:  # a new store names its source, as ``git clone`` does
        set_remote(registry, "origin", url)
    if is_wandb(url):
        raise InvalidArgumentError(
            f"remote {name!r} is a W&B mirror ({url}): W&B remotes are push-only; pull from "
            "the store or object-store remote the artifacts were pushed to", argument="remote")
    source = Remote.open(name, url)
    report = SyncReport("pull", name, url)
    if key is not None:
        paths, runs = [_resolve_remote(source, key)], []
    elif run is not None:
        paths, runs = [], [_resolve_run(source, run)]
    else:
        known = {version_path(p, n, int(number)) for p, n, number in registry._read(
            "SELECT v.project, v.name, r.number FROM remote_versions r JOIN versions v ON"
            " v.id = r.version_id WHERE r.url = ?", (url,))}  # pulled or pushed before
        listed = source.records.list("versions")
        run_paths = source.records.list("runs")
        if not listed and not run_paths:  # a mistyped URL must not look like "up to date"
            raise ArtifactNotFoundError(
                f"{source.where} holds no version or run records: check the URL (a typo "
                "in the bucket, prefix or path?), or push to it first", key=url)
        paths = [p for p in listed if p.endswith(".json") and p not in known]
        runs = [p.rsplit("/", 1)[-1].removesuffix(".json") for p in run_paths
                if p.endswith(".json")]
    puller = Puller(registry, store, source, report, lambda _: None)
    puller.everything = key is None and run is None
    puller.bar = lambda total: _bar(total, f"pull ← {name}", show_progress)
    puller.pull(paths, runs)
    for run_id in sorted(puller.touched):
        export_pulled_run(registry, base, run_id)
    return report


def _resolve_run(source: Remote, prefix: str) -> str:
    """The run a prefix names on the remote (listed there: a remote expands prefixes too)."""
    ids = [p.rsplit("/", 1)[-1].removesuffix(".json") for p in source.records.list("runs")
           if p.endswith(".json")]
    matches = sorted(i for i in ids if i.startswith(prefix))
    if prefix in matches:
        return prefix
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ArtifactNotFoundError(f"no run {prefix!r} on {source.where}", key=prefix)
    raise ArtifactNotFoundError(f"run prefix {prefix!r} is ambiguous on {source.where} "
                                f"({', '.join(matches[:5])}…): give more characters",
                                key=prefix)


def _hold(path: Path) -> int:
    """An exclusive ``flock`` on ``path`` for as long as this process keeps the fd open (a
    killed process lets go of it: how a later pull tells its leftovers from a live pull)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _sweep_dead_pulls(base: Path) -> None:
    """Remove what first pulls into ``base`` killed by SIGTERM or ``kill -9`` left: their
    hidden work directories, whose lock no live process holds."""
    for work in base.parent.glob(f".{base.name}.pull-*"):
        if not work.is_dir() or work.is_symlink():
            continue
        try:
            fd = os.open(f"{work}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # a pull in progress
        try:
            shutil.rmtree(work, ignore_errors=True)
            Path(f"{work}.lock").unlink(missing_ok=True)
        finally:
            os.close(fd)


def _move_into_place(work: Path, base: Path) -> None:
    """Rename the new store onto ``base`` (replacing it only while it is an empty
    directory: ``rename(2)`` refuses a non-empty one)."""
    try:
        os.rename(work, base)
    except OSError as exc:
        raise StorageError(f"{base} was created by someone else during the pull; nothing of "
                           f"this pull was kept there: pull again ({exc.strerror})",
                           path=base, errno=exc.errno) from exc


def _fresh_remote(remote: str | None, base: Path) -> tuple[str, str]:
    """The remote of a pull into a store that does not exist yet: it has no named remotes, so
    only a URL (or a directory) can say where to pull from."""
    from .. import constants

    chosen = remote or constants.REPRO_REMOTE
    if chosen is None or not ("://" in chosen or chosen.startswith(("/", ".", "~"))):
        raise InvalidArgumentError(
            f"no repro store at {base} yet, so no named remotes: give the remote's URL (repro pull "
            f"s3://bucket/prefix …{'' if chosen is None else f', not {chosen!r}'}), or create "
            "the store and name the remote first (`repro init`, `repro remote add`)",
            argument="remote")
    return "origin", normalize_url(chosen)


def _bar(total: int | None, description: str, show: bool
         ) -> contextlib.AbstractContextManager[Callable[[int], None]]:
    """A bytes/rate bar on a terminal (``show``), else a no-op advance."""
    if not show:
        return contextlib.nullcontext(lambda _: None)
    return _progress.progress(total, description, min_total=0)


def _remote_project(source: Remote, name: str, key: str) -> str:
    """The project a bare name means on a remote: ``default``, else the one project that
    has it (as the CLI resolves a bare name in a store)."""
    projects = sorted({p.split("/")[1] for p in source.records.list("versions")
                       if p.count("/") >= 3 and p.split("/")[2] == name})
    if not projects or DEFAULT_PROJECT in projects:
        return DEFAULT_PROJECT
    if len(projects) == 1:
        return projects[0]
    raise ArtifactNotFoundError(f"{key!r} is ambiguous on {source.where}: {name!r} is in "
                                f"projects {', '.join(projects)}; write <project>/{key}",
                                key=key)


def _resolve_remote(source: Remote, key: str) -> str:
    """The record path a key names on a remote (``name:vN``, ``:alias``, ``:latest``)."""
    parsed = parse_key(key)
    project = parsed.project or _remote_project(source, parsed.name, key)
    if parsed.version is not None:
        path = version_path(project, parsed.name, parsed.version)
        if source.records.get(path) is None:
            raise ArtifactNotFoundError(f"{key!r} is not on {source.where}", key=key)
        return path
    if parsed.alias is not None and parsed.alias != "latest":
        data = source.records.get(alias_path(project, parsed.name, parsed.alias))
        record = decode(data, source.where) if data is not None else None
        if not isinstance(record, AliasRecord):
            raise ArtifactNotFoundError(f"{key!r} is not on {source.where}", key=key)
        path = version_path(project, parsed.name, record.number)
        target = source.records.get(path)
        version = decode(target, source.where) if target is not None else None
        if not isinstance(version, RemoteVersion) or version.uid != record.uid:
            raise IntegrityError(f"alias {key!r} on {source.where} names v{record.number}, "
                                 "which is not the version it was set on: the remote is "
                                 "damaged or forged", path=source.where)
        return path
    numbers = sorted((int(p.rsplit("/", 1)[-1][:-5]) for p in source.records.list(
        f"versions/{project}/{parsed.name}") if p.endswith(".json")
        and p.rsplit("/", 1)[-1][:-5].isdigit()), reverse=True)
    for number in numbers:
        path = version_path(project, parsed.name, number)
        data = source.records.get(path)
        record = decode(data, source.where) if data is not None else None
        if not isinstance(record, RemoteVersion) or record.pruned_at is not None:
            continue
        if parsed.digest_prefix is None or record.digest.startswith(parsed.digest_prefix):
            return path
    raise ArtifactNotFoundError(f"{key!r} is not on {source.where}", key=key)
