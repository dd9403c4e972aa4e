"""``WandBStorageBackend``: blobs and versions as W&B artifacts, for users who want them in W&B.

Each blob is one W&B artifact named by its digest (``blake3-<hex>``, type ``repro-blob``);
its metadata keeps the full digest and size. Writes go through a run: the one set with
:meth:`set_run`, else the active ``wandb.run`` of the same project, else one the backend opens
(:meth:`ensure_run`, ``job_type="repro-mirror"``) and finishes in :meth:`close`. In W&B
offline mode they land in the offline run, ready for ``wandb sync``::

    $WANDB_DIR/wandb/offline-run-<time>-<id>/run-<id>.wandb   the artifact record: name,
                                                              aliases, metadata, manifest
    $WANDB_DATA_DIR/artifacts/staging/<tmp>                   a copy of each file it holds

Reads go through the public API (``wandb.Api``), which needs W&B online: offline,
``download`` / ``exists`` / ``delete`` / ``iter_digests`` / ``verify`` raise one
``StorageError`` saying to ``wandb sync`` first or to read from the local store, never an
empty or partial file. Every download is digest-checked before it is renamed into place.

:meth:`mirror_version` is what ``repro push`` to a ``wandb://[ENTITY/]PROJECT`` remote
(:meth:`from_url`) calls for each version: the version's file or directory as the artifact of
its digest, with aliases ``<name>-v<N>`` and ``<name>-<alias>``, and, online, its parents'
artifacts used by the run first, so that W&B's lineage graph shows parent → run → child.

``wandb`` is imported on first use (``import repro_core`` never imports it); missing, it is a
``ModuleNotFoundError`` with the install line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .._offline import detect_offline
from .._safepath import check_digest
from ..errors import ArtifactNotFoundError, IntegrityError, InvalidArgumentError, StorageError
from ..hashing import hash_file, parse_digest
from . import _wandb_offline
from ._wandb_mirror import check_mirror, check_wandb_aliases, check_wandb_name, parse_wandb_url
from .base import StorageBackend

__all__ = ["WandBStorageBackend", "artifact_name"]

ARTIFACT_TYPE = "repro-blob"
JOB_TYPE = "repro-mirror"
_OFFLINE = ("W&B is offline: {what} needs the W&B server. Run `wandb sync` on the offline "
            "run directory and retry online, or read the blob from the local repro store "
            "(REPRO_HOME), which holds everything logged")


def artifact_name(content_hash: str) -> str:
    """The W&B artifact name of a blob: ``blake3-<hex>`` (W&B names allow no ``:``)."""
    algorithm, hexdigest = parse_digest(content_hash)
    return f"{algorithm}-{hexdigest}"


class WandBStorageBackend(StorageBackend):
    """WandB artifact storage backend.

    Args:
        run: the ``wandb`` run uploads are logged into (or later :meth:`set_run`).
        project, entity: where the backend logs and reads (default: the run's); with a
            project, the backend can open its own run (:meth:`ensure_run`).
        api: a ``wandb.Api`` (default: made on first read, online only).
    """

    def __init__(self, run: Any = None, *, project: str | None = None,
                 entity: str | None = None, api: Any = None) -> None:
        self._project = None if project is None else check_wandb_name(project, "project")
        self._entity = None if entity is None else check_wandb_name(entity, "entity")
        self._run, self._api = run, api
        self._own: Any = None  # a run ensure_run opened: the only one close() finishes
        self._lock = threading.Lock()  # two threads' first uploads must not open two runs
        self._lineage_warned = False

    @classmethod
    def from_url(cls, url: str) -> WandBStorageBackend:
        """The backend of a ``wandb://PROJECT`` or ``wandb://ENTITY/PROJECT`` remote, checked
        before any I/O (``InvalidArgumentError``; a URL with ``user:key@`` is refused: W&B
        finds its key itself, from ``wandb login`` or ``WANDB_API_KEY``)."""
        target = parse_wandb_url(url)
        return cls(project=target.project, entity=target.entity)

    @property
    def url(self) -> str | None:
        """``wandb://[ENTITY/]PROJECT`` when the backend names a project, else None."""
        if self._project is None:
            return None
        return f"wandb://{self._entity}/{self._project}" if self._entity else \
            f"wandb://{self._project}"

    def set_run(self, run: Any) -> None:
        """Set the current WandB run."""
        self._run = run

    # -- the run writes go through ----------------------------------------------------------

    def ensure_run(self) -> Any:
        """The run to log into: the one set with :meth:`set_run`, else one this backend
        opened, else ``wandb.run`` when it is active for this project, else a new one
        (``wandb.init(project, entity, job_type="repro-mirror")``), offline when
        ``WANDB_MODE=offline``, ``REPRO_OFFLINE=1`` or W&B is not logged in. The new run
        never replaces the user's ``wandb.run`` (``reinit="create_new"``): mirroring must not
        finish or hijack a training run of another project."""
        with self._lock:
            run = self._run or self._own or self._active_run()
            if run is None:
                run = self._own = self._open_run()
        if getattr(run, "disabled", False):
            raise StorageError("the W&B run is disabled (WANDB_MODE=disabled or "
                               "mode='disabled'): nothing would reach W&B. Use "
                               "WANDB_MODE=offline to log now and `wandb sync` later",
                               path=None)
        return run

    def close(self) -> None:
        """Finish the run :meth:`ensure_run` opened; a run set with :meth:`set_run` or the
        user's ``wandb.run`` is left running. Offline, return only once the run's record
        (``run-<id>.wandb``, what ``wandb sync`` uploads) is on disk: ``finish`` returns
        before wandb-core has written it (see ``_wandb_offline``), and a caller that records
        "mirrored" after ``close`` must not be wrong if the machine goes down next."""
        with self._lock:
            run, self._own = self._own, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as exc:  # W&B's own errors, at the boundary
            raise StorageError(f"finishing the W&B run {getattr(run, 'id', '?')} failed: "
                               f"{exc}", path=None) from exc
        sync_file = getattr(getattr(run, "settings", None), "sync_file", None)
        if _run_offline(run) and sync_file and \
                not _wandb_offline.wait_for_exit_record(Path(sync_file)):
            raise StorageError(f"W&B has not written the offline run {sync_file} within "
                               f"{_wandb_offline.FLUSH_TIMEOUT:.0f} s: what this backend "
                               "logged may be missing from it; push again (W&B keeps one "
                               "copy of what is logged twice)", path=sync_file)

    def _active_run(self) -> Any:
        wandb = sys.modules.get("wandb")  # not imported: no run can be active
        run = getattr(wandb, "run", None) if wandb is not None else None
        if run is None or getattr(run, "_is_finished", False):
            return None
        if self._project and getattr(run, "project", None) != self._project:
            return None
        entity = getattr(run, "entity", None)
        if self._entity and entity and entity != self._entity:
            return None
        return run

    def _open_run(self) -> Any:
        if not self._project:
            raise StorageError("WandBStorageBackend needs a W&B run: call set_run(run) with "
                               "the run of wandb.init(), or name a project "
                               "(WandBStorageBackend.from_url('wandb://PROJECT'))", path=None)
        if os.environ.get("WANDB_MODE", "").strip().lower() == "disabled":
            raise StorageError("W&B is disabled (WANDB_MODE=disabled): nothing would reach "
                               f"{self.url}. Unset it, or use WANDB_MODE=offline to log now "
                               "and `wandb sync` later", path=None)
        wandb = _wandb()
        options: dict[str, Any] = {
            "project": self._project, "entity": self._entity, "job_type": JOB_TYPE,
            "mode": "offline" if detect_offline() else "online", "reinit": "create_new"}
        if os.environ.get("WANDB_DIR"):  # wandb reads it once per process; honour it now
            options["dir"] = os.environ["WANDB_DIR"]
        try:
            return wandb.init(**options)
        except Exception as exc:  # no network, bad entity, …: one typed error
            raise StorageError(f"could not start a W&B run for {self.url}: {exc}",
                               path=None) from exc

    # -- writes (through the run: offline too) ----------------------------------------------

    def upload(self, file_path: Path, content_hash: str, *,
               aliases: list[str] | None = None) -> str:
        """Upload file as WandB artifact (after checking it hashes to ``content_hash``);
        returns ``wandb-artifact://[entity/]project/<name>:latest``. ``aliases``: extra W&B
        aliases (a repro version or alias mirrored, e.g. ``checkpoint-v3``)."""
        parse_digest(content_hash)
        extra = check_wandb_aliases(aliases or [])
        path = Path(file_path)
        size = _check_file(path, content_hash)
        run = self.ensure_run()
        artifact = _stage(path, content_hash, {"digest": content_hash, "size": size})
        self._log(run, artifact, ["latest", *extra], path, wait=not _run_offline(run))
        return f"wandb-artifact://{self._where(run)}/{artifact_name(content_hash)}:latest"

    def mirror_version(self, path: Path, *, digest: str, project: str, name: str,
                       version: int, type: str, aliases: Sequence[str] = (),
                       parents: Sequence[str] = (),
                       metadata: Mapping[str, Any] | None = None) -> str:
        """Log one repro version as the W&B artifact of its digest; return its reference,
        ``wandb-artifact://[ENTITY/]PROJECT/<algo>-<hex>:<name>-v<version>``.

        ``path`` is the version's file (stored in the artifact as ``<algo>-<hex>``, byte for
        byte what :meth:`upload` logs, so W&B keeps one copy) or its materialized directory
        (added whole). A file is hashed and refused unless it is ``digest``
        (``IntegrityError``); a directory is *not* re-hashed: its digest is the manifest's,
        which the caller computed when it materialized it, and trusting it avoids reading
        every file twice. Aliases: ``<name>-v<version>`` and ``<name>-<alias>`` per repro
        alias (``latest`` becomes ``<name>-latest``); metadata: ``repro`` (project, name,
        version, type, digest, aliases, parents), the caller's ``metadata``, ``digest``.

        Lineage: online, the run first uses each parent's artifact (``<algo>-<hex>:latest``,
        so parents must be mirrored first), then logs this one: W&B draws parent → run →
        child. Offline, W&B cannot use an artifact that is not synced, so lineage is skipped
        (a warning says so once per backend; the parents stay in the metadata).

        Every argument is checked before any I/O; any W&B failure is a ``StorageError``
        and nothing is reported as mirrored. Online, the call returns once W&B has committed
        the artifact; offline, once W&B has it, and it is on disk for ``wandb sync`` when
        :meth:`close` returns."""
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidArgumentError(f"path must be a file or directory path, got "
                                       f"{path.__class__.__name__}", argument="path")
        request = check_mirror(digest=digest, project=project, name=name, version=version,
                               kind=type, aliases=aliases, parents=parents, metadata=metadata)
        source = Path(path)
        meta = dict(request.metadata)
        if source.is_dir():
            meta["repro"] = {**meta["repro"], "kind": "directory"}
        else:
            meta["size"] = _check_file(source, request.digest)
            meta["repro"] = {**meta["repro"], "kind": "file"}
        run = self.ensure_run()
        online = not _run_offline(run)
        if request.parents and not online:
            self._warn_lineage_skipped(name, version, len(request.parents))
        artifact = _stage(source, request.digest, meta)
        if online:
            self._use_parents(run, request.parents, request.digest)
        self._log(run, artifact, list(request.aliases), source, wait=online)
        return (f"wandb-artifact://{self._where(run)}/{artifact_name(request.digest)}:"
                f"{request.aliases[0]}")

    def _use_parents(self, run: Any, parents: Sequence[str], digest: str) -> None:
        where = self._where(run)
        for parent in parents:
            ref = f"{where}/{artifact_name(parent)}:latest"
            try:
                run.use_artifact(ref)
            except Exception as exc:
                raise StorageError(f"W&B could not use the parent artifact {ref} ({exc}): "
                                   "mirror the parent version first; nothing was logged for "
                                   f"{digest}", path=None) from exc

    def _log(self, run: Any, artifact: Any, aliases: list[str], path: Path, *,
             wait: bool = False) -> None:
        """``run.log_artifact``; online also waits for W&B to commit it (logging is
        asynchronous, and a push must not report what W&B then refuses)."""
        try:
            logged = run.log_artifact(artifact, aliases=aliases)
            if wait:
                logged.wait()
        except Exception as exc:  # W&B's own errors: one typed error, the local copy is kept
            raise StorageError(f"W&B refused artifact {artifact.name}: {exc}; it is not in "
                               "W&B (the local store keeps it)", path=path) from exc

    def _warn_lineage_skipped(self, name: str, version: int, count: int) -> None:
        if self._lineage_warned:
            return
        self._lineage_warned = True
        warnings.warn(f"W&B is offline: the lineage of {name} v{version} to its {count} "
                      "parent(s), and of every other version this backend mirrors offline, "
                      "is not recorded in W&B (an offline run cannot use artifacts that are "
                      "not synced yet). The parents' digests are kept in each artifact's "
                      "metadata (repro.parents)",
                      UserWarning, stacklevel=3)

    # -- reads (the public API: online only) ------------------------------------------------

    def download(self, content_hash: str, target_path: Path) -> Path:
        """Download artifact from WandB into ``target_path``, digest-checked, atomically."""
        algorithm, _ = parse_digest(content_hash)
        artifact = self._artifact(content_hash, "download")
        target = Path(target_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".repro-wandb-", dir=target.parent) as tmp:
            try:
                root = Path(artifact.download(root=tmp))
            except Exception as exc:
                raise StorageError(f"downloading {artifact_name(content_hash)} from W&B "
                                   f"failed: {exc}", path=target) from exc
            source = root / artifact_name(content_hash)
            if not source.is_file():
                raise IntegrityError(f"W&B artifact {artifact_name(content_hash)} holds no "
                                     "blob file", digest=content_hash, path=source)
            actual = hash_file(source, algorithm)
            if actual != content_hash:
                raise IntegrityError(f"W&B artifact {artifact_name(content_hash)} is corrupt: "
                                     f"its file hashes to {actual}", digest=content_hash,
                                     path=source, expected=content_hash, actual=actual)
            staged = target.with_name(f".{target.name}.{secrets.token_hex(6)}.part")
            shutil.move(os.fspath(source), staged)
            os.replace(staged, target)
        return target

    def exists(self, content_hash: str) -> bool:
        """Check if artifact exists in WandB."""
        try:
            self._artifact(content_hash, "exists")
        except ArtifactNotFoundError:
            return False
        return True

    def delete(self, content_hash: str) -> bool:
        try:
            artifact = self._artifact(content_hash, "delete")
        except ArtifactNotFoundError:
            return False
        try:
            artifact.delete(delete_aliases=True)
        except Exception as exc:
            raise StorageError(f"W&B refused to delete {artifact_name(content_hash)}: {exc}",
                               path=None) from exc
        return True

    def iter_digests(self) -> Iterator[str]:
        api = self._require_api("iter_digests")
        try:
            collections = api.artifact_collections(self._where(self._run or self._own),
                                                 ARTIFACT_TYPE)
            names = [c.name for c in collections]
        except Exception as exc:
            raise StorageError(f"listing W&B artifacts failed: {exc}", path=None) from exc
        for name in names:
            algorithm, _, hexdigest = str(name).partition("-")
            digest = f"{algorithm}:{hexdigest}"
            with contextlib.suppress(IntegrityError):  # (another tool's artifact: skipped)
                yield check_digest(digest, where="a W&B artifact name")

    # -- helpers ----------------------------------------------------------------------------

    def _artifact(self, content_hash: str, what: str) -> Any:
        parse_digest(content_hash)  # a bad digest is refused before anything, offline too
        api = self._require_api(what)
        name = f"{self._where(self._run or self._own)}/{artifact_name(content_hash)}:latest"
        try:
            return api.artifact(name, type=ARTIFACT_TYPE)
        except Exception as exc:
            if _is_not_found(exc):
                raise ArtifactNotFoundError(f"no W&B artifact {name}", key=name) from exc
            raise StorageError(f"W&B could not answer for {name}: {exc}", path=None) from exc

    def _require_api(self, what: str) -> Any:
        if self._api is not None:
            return self._api
        run = self._run or self._own
        if _run_offline(run) if run is not None else detect_offline():
            raise StorageError(_OFFLINE.format(what=what), path=None)
        try:
            self._api = _wandb().Api()
        except Exception as exc:  # no API key, no network
            raise StorageError(f"{_OFFLINE.format(what=what)} ({exc})", path=None) from exc
        return self._api

    def _where(self, run: Any) -> str:
        """``[entity/]project`` of ``run`` (where its artifacts go), else the backend's."""
        project = getattr(run, "project", None) or self._project
        entity = getattr(run, "entity", None) or self._entity
        if not project:
            raise StorageError("WandBStorageBackend needs a project (project= or a run)",
                               path=None)
        return f"{entity}/{project}" if entity else str(project)


def _run_offline(run: Any) -> bool:
    """Whether ``run`` writes to its offline directory rather than to the server."""
    settings = getattr(run, "settings", None)
    return bool(getattr(run, "offline", False) or getattr(settings, "_offline", False))


def _check_file(path: Path, digest: str) -> int:
    """The size of ``path`` after checking it is a readable regular file that hashes to
    ``digest`` (``StorageError`` / ``IntegrityError``): nothing reaches W&B otherwise."""
    algorithm, _ = parse_digest(digest)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f"cannot read {path}: not a regular file", path=path,
                               errno=errno.EINVAL)
        actual = hash_file(path, algorithm)
    except StorageError:
        raise
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc.strerror or exc}", path=path,
                           errno=exc.errno) from exc
    if actual != digest:
        raise IntegrityError(f"{path} hashes to {actual}, not {digest}; nothing was "
                             "uploaded", digest=digest, path=path, expected=digest,
                             actual=actual)
    return info.st_size


def _stage(path: Path, digest: str, metadata: dict[str, Any]) -> Any:
    """A ``wandb.Artifact`` for ``digest`` holding ``path`` (a file as ``<algo>-<hex>``, a
    directory whole). W&B copies each file into its staging directory here (its "mutable"
    policy), so the artifact keeps these bytes even if the source is later removed."""
    wandb = _wandb()
    name = artifact_name(digest)
    try:
        artifact = wandb.Artifact(name, type=ARTIFACT_TYPE, metadata=metadata)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path), name=name)
    except Exception as exc:  # staging disk full, unreadable file, W&B validation
        raise StorageError(f"W&B could not stage {path} as artifact {name}: {exc}",
                           path=path) from exc
    return artifact


def _is_not_found(exc: Exception) -> bool:
    text = str(exc).lower()
    return "not found" in text or "does not exist" in text or "404" in text


def _wandb() -> Any:
    try:
        import wandb
    except ImportError as exc:
        raise ModuleNotFoundError("WandBStorageBackend needs wandb: pip install "
                                  "'repro-lightning[wandb]'", name="wandb") from exc
    return wandb
