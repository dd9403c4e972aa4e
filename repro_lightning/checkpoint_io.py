"""``SafetensorsCheckpointIO``: Lightning checkpoints written once, into the store, as
safetensors, and loaded back without pickle.

Lightning calls a strategy's ``CheckpointIO`` on global rank 0 for every save (the default
``ModelCheckpoint`` included), on every rank to load (``trainer.fit(ckpt_path=...)``), and on
rank 0 when ``ModelCheckpoint`` deletes a top-k file. Saving here:

1. encodes the whole checkpoint (model, optimizer states, LR schedulers, loops, callbacks,
   hparams, precision plugin) as tensors + a JSON skeleton (``_skeleton``) — anything that
   cannot be represented is an error naming the key before a byte is written;
2. streams the bytes through the store's hashing writer straight into a blob (``repro_core``
   ``log_artifact(data=Payload)``): never written elsewhere first, never read back;
3. puts a hard link to that read-only blob at the ``ModelCheckpoint`` path (a symbolic link
   across file systems) — the file users see is the stored version, not a second copy. Each
   save links a *new* name and renames it over the path, so re-saving ``last.ckpt`` replaces
   the link and never writes into the blob an earlier version owns.

``TorchLoggingCheckpointIO`` (``checkpoint_format="torch"``) keeps Lightning's own format:
``torch.save`` writes the file, which is then logged and replaced by a link to its blob.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io.checkpoint_plugin import CheckpointIO

from repro_core import ArtifactManager, IntegrityError, StoreNotFoundError
from repro_core.errors import ArtifactNotFoundError

from . import _skeleton
from ._session import RunSession

__all__ = ["SafetensorsCheckpointIO", "TorchLoggingCheckpointIO"]


class SafetensorsCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO``: safetensors + JSON skeleton, logged as it is written.

    Without a session (used on its own, ``Trainer(plugins=[SafetensorsCheckpointIO()])``)
    it writes the file at the path atomically and logs nothing. Loading accepts both its own
    files and Lightning's pickle checkpoints (``torch.load``, as Lightning would)."""

    def __init__(self, session: RunSession | None = None) -> None:
        self.session = session
        self.trainer: Any = None  # set by ReproCallback: ``best`` follows its ModelCheckpoint
        self._torch = TorchCheckpointIO()

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafetensorsCheckpointIO.save_checkpoint takes no storage_options,"
                            f" got {storage_options!r}")
        path = os.fspath(path)
        payload = dataclasses.replace(
            _skeleton.payload(checkpoint, _header(self.session, checkpoint)),
            filename=os.path.basename(path))  # validated: nothing written on a bad value
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        session = self.session
        if session is not None and session.log_checkpoint(payload, path, self.trainer,
                                                          checkpoint=checkpoint):
            return
        _write_atomic(payload, path)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        path = os.fspath(path)
        if not _skeleton.is_repro_checkpoint(path):
            return self._torch.load_checkpoint(path, map_location=map_location,
                                               weights_only=weights_only)
        loaded = verify_checkpoint(path)
        if self.session is not None and loaded is not None:
            self.session.loaded(loaded, path)
        return _skeleton.load(path, map_location=map_location)

    def remove_checkpoint(self, path: Any) -> None:
        _remove(path)
        if self.session is not None:
            self.session.released(os.fspath(path))


class TorchLoggingCheckpointIO(TorchCheckpointIO):
    """Lightning's own ``torch.save`` format (``checkpoint_format="torch"``), each file
    logged as a ``checkpoint`` version once written and replaced by a link to its blob."""

    def __init__(self, session: RunSession | None = None) -> None:
        self.session = session
        self.trainer: Any = None

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any,
                        storage_options: Any | None = None) -> None:
        # The file at ``path`` may be our hard link to an earlier version's blob. Lightning
        # writes through fsspec, whose temp file lives in the system temp directory: on
        # another file system its final "move" is a copy *into* the existing file, which
        # would rewrite that blob (as root, whom 0444 does not stop). Unlinking first makes
        # every save a new file; the earlier version stays whole in the store.
        _unlink_link(os.fspath(path))  # (also after the run: the blob outlives it)
        super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        if self.session is not None:
            self.session.log_checkpoint(None, os.fspath(path), self.trainer,
                                        checkpoint=checkpoint)

    def load_checkpoint(self, path: Any, map_location: Any | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        loaded = super().load_checkpoint(path, map_location=map_location,
                                         weights_only=weights_only)
        session = self.session
        if session is not None:  # which version this is: the next checkpoint's parent
            settings = session.settings
            try:
                meta = ArtifactManager().identify_file(
                    os.fspath(path), f"{settings.project}/{settings.checkpoint_name}")
            except (StoreNotFoundError, ArtifactNotFoundError, OSError):
                meta = None
            if meta is not None:
                session.loaded(meta.key, os.fspath(path))
        return loaded

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if self.session is not None:
            self.session.released(os.fspath(path))


def verify_checkpoint(path: str) -> str | None:
    """Check a repro checkpoint against the store that logged it; return its version key.

    The file names the run and artifact that wrote it. If that store is reachable and knows
    the run, the file's digest must be one of the artifact's versions (it was modified after
    it was saved otherwise: ``IntegrityError``). A checkpoint copied to a machine without
    its store loads unverified, with a warning: safetensors loading runs no code either way.
    """
    header = _skeleton.read_metadata(path)
    artifact, run_id = header.get("repro_artifact"), header.get("repro_run_id")
    if not artifact:
        return None
    manager = ArtifactManager()
    try:
        found = manager.identify_file(path, artifact)
    except (StoreNotFoundError, ArtifactNotFoundError):
        found = None
    if found is not None:
        return found.key
    if run_id and manager.has_run(run_id):
        raise IntegrityError(
            f"{path} was logged by run {run_id} as a version of {artifact}, but its content "
            "now matches none of them: it was modified after it was saved. Load the stored "
            f"version instead (repro_lightning.checkpoint_path('{artifact}:latest')), and "
            "run `repro verify`", path=path)
    warnings.warn(f"repro: {path} was logged by run {run_id or '?'} into a store this process "
                  f"does not see ({manager.root}); loading it unverified", RuntimeWarning,
                  stacklevel=3)
    return None


def _header(session: RunSession | None, checkpoint: dict[str, Any]) -> dict[str, str]:
    """Who wrote the file (read back by ``verify_checkpoint`` and by humans)."""
    header = {"global_step": str(checkpoint.get("global_step", "")),
              "epoch": str(checkpoint.get("epoch", ""))}
    if session is not None and session.active:
        header["repro_run_id"] = session.run_id or ""
        header["repro_artifact"] = f"{session.settings.project}/" \
                                   f"{session.settings.checkpoint_name}"
    return header


def _write_atomic(payload: Any, path: str) -> None:
    """No store: write the file beside its final name and rename it into place."""
    temp = f"{path}.repro-tmp-{os.getpid()}"
    try:
        with open(temp, "wb") as sink:
            payload.write(sink)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def _unlink_link(path: str) -> None:
    """Remove ``path`` if it is a file shared with another name (a link to a blob)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if os.path.islink(path) or st.st_nlink > 1:
        os.unlink(path)


def _remove(path: Any) -> None:
    fs = get_filesystem(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)
