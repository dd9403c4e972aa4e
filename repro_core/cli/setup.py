"""``repro init`` and ``repro recover``: the only commands that write a registry.

A registry is never created by accident (DESIGN.md): ``init`` makes one in an empty place, and
refuses where blobs or run exports exist without one (that registry was lost: ``recover``
rebuilds it from ``runs/*/`` and the blobs). Neither ever deletes a registry: one that is
replaced is moved aside, with its ``-wal``/``-shm``/``-journal`` files, as
``registry.sqlite.bak-<UTC time>`` — the WAL must move too, or SQLite would replay the old
database's un-checkpointed pages into the new one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import click

from .. import _fsio, constants
from ..errors import InvalidArgumentError, RegistryDamagedError, StorageError
from ..registry import Registry, store_has_data
from ..store.local import stored_algorithm
from ._common import clean, emit_json, json_option, root_option, store_root

__all__ = ["init", "recover"]

_REGISTRY = "registry.sqlite"
_SIDE_FILES = ("-wal", "-shm", "-journal")
_State = Literal["none", "healthy", "damaged"]


@click.command(short_help="Create an empty store.")
@click.option("--force", is_flag=True,
              help="Also where blobs or run exports exist without a readable registry (they "
                   "become unreferenced; a damaged registry is moved aside).")
@click.option("--hash", "algorithm", type=click.Choice(constants.HASH_ALGORITHMS),
              default=None, help="Digest algorithm of the new store (default: $REPRO_HASH, "
                                 "else blake3; with existing blobs, theirs).")
@root_option
def init(force: bool, algorithm: str | None, root: Path | None) -> None:
    """Create an empty store: registry, blobs/, tmp/, CACHEDIR.TAG. The explicit way to make a
    store (every other command refuses to create one). A readable registry is left as is."""
    from ..store.local import LocalStorageBackend

    path = store_root(root)
    state = registry_state(path)
    if state == "healthy":
        click.echo(f"{path} is already a repro store; nothing changed")
        return
    has_data = path.is_dir() and store_has_data(path)
    if (state == "damaged" or has_data) and not force:
        what = "a damaged registry" if state == "damaged" else "blobs or run exports"
        raise InvalidArgumentError(
            f"{path} holds {what} but no readable registry: rebuild it with `repro recover "
            f"--root {path}`, or pass --force to start an empty registry anyway",
            argument="root")
    moved = move_aside(path)
    algorithm = algorithm or stored_algorithm(path) or constants.REPRO_HASH
    registry = Registry(path / _REGISTRY, algorithm=algorithm, create=True)
    try:
        registry.open()
    finally:
        registry.close()
    LocalStorageBackend(path, algorithm=algorithm).ensure_layout()
    click.echo(f"initialized an empty repro store at {path} ({algorithm})")
    if moved is not None:
        click.echo(f"the old registry is kept at {moved}")


@click.command(short_help="Rebuild a lost registry from run exports and blobs.")
@click.option("--force", is_flag=True,
              help="Rebuild even over a readable registry (moved aside as "
                   "registry.sqlite.bak-<time>).")
@root_option
@json_option
def recover(force: bool, root: Path | None, as_json: bool) -> None:
    """Rebuild a lost or damaged registry from the run exports (runs/*/) and the blobs.

    A damaged registry is moved aside as registry.sqlite.bak-<time>; a readable one only with
    --force. Metrics and TTRL rows live only in the registry and cannot come back. Stop every
    process using the store first. Problems (entries that could not be recovered) are
    reported; the exit code is 0 once a registry was rebuilt.
    """
    from ..recover import recover_store

    path = store_root(root)
    if registry_state(path) == "healthy" and not force:
        raise InvalidArgumentError(
            f"{path / _REGISTRY} is readable: nothing to recover. To rebuild it from the run "
            "exports anyway, pass --force (the current one is kept as "
            "registry.sqlite.bak-<time>)", argument="root")
    if not (path / "runs").is_dir() and not (path / "blobs").is_dir():
        raise InvalidArgumentError(f"{path} holds no repro store (no runs/, no blobs/)",
                                   argument="root")
    moved = move_aside(path)
    try:
        report = recover_store(path)
    except BaseException:
        _put_back(path, moved)
        raise
    summary = {"registry_path": str(report.registry_path), "runs": report.runs,
               "versions": report.versions, "aliases": report.aliases, "edges": report.edges,
               "problems": list(report.problems),
               "not_recoverable": list(report.not_recoverable),
               "moved_aside": None if moved is None else str(moved)}
    if as_json:
        emit_json(summary)
        return
    click.echo(f"rebuilt {report.registry_path}: {report.runs} run(s), {report.versions} "
               f"version(s), {report.aliases} alias(es), {report.edges} lineage edge(s)")
    if moved is not None:
        click.echo(f"the old registry is kept at {moved}")
    click.echo(f"{len(report.problems)} problem(s)" + (":" if report.problems else ""))
    for problem in report.problems:
        click.echo(f"  - {clean(problem)}")
    for lost in report.not_recoverable:
        click.echo(f"not recoverable: {lost}")


def registry_state(root: Path) -> _State:
    """``none`` (missing or 0 bytes), ``healthy`` (opens and answers), or ``damaged``. A
    registry too new for this repro, or one we may not read, is an error, not "damaged": it
    must never be moved aside and replaced."""
    path = root / _REGISTRY
    try:
        if path.stat().st_size == 0:
            return "none"
    except (FileNotFoundError, NotADirectoryError):
        return "none"
    registry = Registry(path, readonly=True)
    try:
        registry.open()
        registry.hash_algorithm()
    except RegistryDamagedError:
        return "damaged"
    finally:
        registry.close()
    return "healthy"


def move_aside(root: Path) -> Path | None:
    """Rename the registry and its side files to ``registry.sqlite.bak-<time>[-wal…]``;
    return the new name (None: there was nothing to move). Side files without a registry
    (left by a crash) move too: a new registry must not inherit an old WAL."""
    names = [_REGISTRY, *(_REGISTRY + s for s in _SIDE_FILES)]
    present = [n for n in names if (root / n).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    backup = root / f"{_REGISTRY}.bak-{stamp}"
    serial = 1
    while any(Path(f"{backup}{s}").exists() for s in ("", *_SIDE_FILES)):
        serial += 1
        backup = root / f"{_REGISTRY}.bak-{stamp}-{serial}"
    try:
        for name in present:  # the main file first: its WAL must not outlive it under the name
            os.replace(root / name, Path(f"{backup}{name.removeprefix(_REGISTRY)}"))
        _fsio.fsync_dir(root)
    except OSError as exc:
        raise StorageError(f"cannot move {root / _REGISTRY} aside: {exc}", path=root) from exc
    return backup


def _put_back(root: Path, moved: Path | None) -> None:
    """Undo ``move_aside`` after a failed rebuild (which never wrote ``registry.sqlite``)."""
    if moved is None or (root / _REGISTRY).exists():
        return
    for suffix in ("", *_SIDE_FILES):
        source = Path(f"{moved}{suffix}")
        if source.exists():
            try:
                os.replace(source, root / f"{_REGISTRY}{suffix}")
            except OSError as exc:
                raise StorageError(f"the old registry stays at {moved}: {exc}",
                                   path=moved) from exc


