"""``WandBStorageBackend``: blobs as W&B artifacts, for users who want to see them in W&B.

Each blob is one W&B artifact named by its digest (``blake3-<hex>``, type ``repro-blob``)
holding one file; its metadata keeps the full digest and size. Uploads go through the run set
with :meth:`set_run` (``run.log_artifact``): in W&B offline mode they land in the offline run
directory (the file staged under ``WANDB_DATA_DIR``), ready for ``wandb sync``. Reads go
through the public API (``wandb.Api``), which needs W&B online: offline, ``download`` /
``exists`` / ``delete`` / ``iter_digests`` raise one ``StorageError`` saying to ``wandb sync``
first or to read from the local store, never an empty or partial file. Every download is
digest-checked before it is renamed into place.

``wandb`` is imported on first use (``import repro_core`` never imports it); missing, it is a
``ModuleNotFoundError`` with the install line.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .._safepath import check_digest
from ..errors import ArtifactNotFoundError, IntegrityError, MissingFileError, StorageError
from ..hashing import hash_file, parse_digest
from .base import StorageBackend

__all__ = ["WandBStorageBackend", "artifact_name"]

ARTIFACT_TYPE = "repro-blob"
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
        project, entity: where reads look (default: the run's).
        api: a ``wandb.Api`` (default: made on first read, online only).
    """

    def __init__(self, run: Any = None, *, project: str | None = None,
                 entity: str | None = None, api: Any = None) -> None:
        self._run = run
        self._project, self._entity, self._api = project, entity, api

    def set_run(self, run: Any) -> None:
        """Set the current WandB run."""
        self._run = run

    # -- writes (through the run: offline too) ----------------------------------------------

    def upload(self, file_path: Path, content_hash: str, *,
               aliases: list[str] | None = None) -> str:
        """Upload file as WandB artifact (after checking it hashes to ``content_hash``);
        returns ``wandb-artifact://[entity/]project/<name>:latest``. ``aliases``: extra W&B
        aliases (a repro version or alias mirrored, e.g. ``checkpoint-v3``)."""
        algorithm, _ = parse_digest(content_hash)
        run = self._require_run("upload")
        path = Path(file_path)
        if not path.is_file():
            raise MissingFileError(f"no file {path} to upload", path=path)
        actual = hash_file(path, algorithm)
        if actual != content_hash:
            raise IntegrityError(f"{path} hashes to {actual}, not {content_hash}; nothing was "
                                 "uploaded", digest=content_hash, path=path,
                                 expected=content_hash, actual=actual)
        wandb = _wandb()
        name = artifact_name(content_hash)
        artifact = wandb.Artifact(name, type=ARTIFACT_TYPE,
                                  metadata={"digest": content_hash, "size": path.stat().st_size})
        artifact.add_file(str(path), name=name)
        try:
            run.log_artifact(artifact, aliases=["latest", *(aliases or [])])
        except Exception as exc:  # W&B's own errors: one typed error, the local copy is kept
            raise StorageError(f"W&B refused artifact {name}: {exc}", path=path) from exc
        return f"wandb-artifact://{self._where(run)}/{name}:latest"

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
            collections = api.artifact_collections(self._where(self._run), ARTIFACT_TYPE)
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
        api = self._require_api(what)
        name = f"{self._where(self._run)}/{artifact_name(content_hash)}:latest"
        try:
            return api.artifact(name, type=ARTIFACT_TYPE)
        except Exception as exc:
            if _is_not_found(exc):
                raise ArtifactNotFoundError(f"no W&B artifact {name}", key=name) from exc
            raise StorageError(f"W&B could not answer for {name}: {exc}", path=None) from exc

    def _require_run(self, what: str) -> Any:
        if self._run is None:
            raise StorageError(f"WandBStorageBackend.{what} needs a W&B run: call set_run(run) "
                               "with the run of wandb.init()", path=None)
        return self._run

    def _require_api(self, what: str) -> Any:
        if self._api is not None:
            return self._api
        if self._offline():
            raise StorageError(_OFFLINE.format(what=what), path=None)
        try:
            self._api = _wandb().Api()
        except Exception as exc:  # no API key, no network
            raise StorageError(f"{_OFFLINE.format(what=what)} ({exc})", path=None) from exc
        return self._api

    def _offline(self) -> bool:
        run = self._run
        settings = getattr(run, "settings", None)
        if run is not None and bool(getattr(run, "offline", False) or
                                    getattr(settings, "_offline", False)):
            return True
        return os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled")

    def _where(self, run: Any) -> str:
        project = self._project or getattr(run, "project", None)
        entity = self._entity or getattr(run, "entity", None)
        if not project:
            raise StorageError("WandBStorageBackend needs a project (project= or a run)",
                               path=None)
        return f"{entity}/{project}" if entity else str(project)


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
