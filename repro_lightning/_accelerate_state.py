"""Accelerate checkpoints as artifacts: ``save_state`` / ``load_state`` / ``save_model``.

Accelerate has no post-save hook (``register_save_state_pre_hook`` runs before anything is
written), so the finished files are logged by wrapping the documented calls. Each wrapper is
called exactly where its Accelerate call is — on every process — and does what Accelerate
does, then:

- ``save_state(accelerator, ...)``: every process meets at a store-based barrier (with the
  ``REPRO_BARRIER_TIMEOUT`` timeout, never a bare collective) once before Accelerate writes
  (every process has chosen its folder, the previous state is logged) and once after (each
  has written its own ``random_states_<rank>.pkl``); then the main process logs the directory
  as one version of ``state`` with lineage to the config, the datasets and the previous state,
  in a background thread, so training goes on while a big state is copied and hashed (joined
  before the next ``save_state``/``load_state``/``save_model`` and at the run's end:
  ``tracker.wait()``). The other processes do nothing more, so nothing can wait on a
  main-process-only branch.
- ``load_state(accelerator, "state:latest")``: every process reads the verified directory
  from the store itself (no collective), Accelerate loads it, the automatic-naming save
  counter is set past the loaded state (the next ``save_state`` would otherwise fail with
  "already exists": accelerate #1601 / #3306), and the tracker continues the run that saved
  it (``ReproTracker(resume="allow")``).
- ``save_model(accelerator, model, dir)``: Accelerate writes on the main process, which then
  logs the directory as a ``model`` version.

What Accelerate writes with pickle (optimizer, scheduler, sampler, RNG states, custom
objects) stays as Accelerate writes it; repro adds no file to the directory and keeps its
own record (the version's metadata) as JSON in the registry.
"""

from __future__ import annotations

import itertools
import os
import re
import warnings
from typing import Any

from repro_core import ArtifactManager, ArtifactType, rank_zero_only
from repro_core.distributed import barrier, is_rank_zero
from repro_core.errors import DistributedTimeoutError, InvalidArgumentError, ReproError
from repro_core.types import ArtifactMetadata, parse_key

from ._accelerate_checks import STATE_KEYS, check_aliases, check_metadata, check_step
from .tracker import ReproTracker

__all__ = ["load_state", "save_model", "save_state", "state_path"]

_calls = itertools.count()  # every process counts its save_state calls: barrier names pair
_FOLDER = re.compile(r"checkpoint_(\d+)$")


def save_state(accelerator: Any, output_dir: str | os.PathLike[str] | None = None, *,
               step: int | None = None, aliases: list[str] | None = None,
               metadata: dict[str, Any] | None = None, **save_kwargs: Any) -> str:
    """``accelerator.save_state(output_dir, **save_kwargs)``, logged as a ``state`` version.

    Call it on every process, as ``save_state`` itself. ``step``: your training step, kept
    with the version (``load_state`` returns it, to continue counting); ``aliases``: extra
    aliases (``latest`` is automatic); ``metadata``: JSON values kept with the version.
    Returns the directory Accelerate wrote. A failure to log (a full disk under
    ``REPRO_HOME``) is a warning: the state is on disk and training goes on.
    """
    step = check_step(step)
    aliases = check_aliases(aliases)
    extra = check_metadata(metadata, STATE_KEYS)
    tracker = find_tracker(accelerator)
    if tracker is not None:
        tracker.wait()  # the previous state is logged before Accelerate writes or deletes
    _skip_taken_iteration(accelerator)
    call = next(_calls)
    # Every process has chosen its folder (before the main one deletes any for total_limit)
    # and the previous state is logged (a reused output_dir is not rewritten under it).
    _meet(f"accelerate/save_state/{call}/begin")
    location = accelerator.save_state(output_dir, **save_kwargs)
    _meet(f"accelerate/save_state/{call}/end")  # every process's own files are written
    if tracker is not None and _is_main(accelerator):
        if tracker._started:
            _log_state(tracker, accelerator, os.path.abspath(os.fspath(location)), step,
                       aliases, extra)
        else:
            tracker.warn_once("save_state", "repro: save_state was not logged: call "
                              "accelerator.init_trackers(...) to start the ReproTracker")
    return os.fspath(location)


def _meet(name: str) -> None:
    try:
        barrier(name)
    except DistributedTimeoutError as exc:
        raise DistributedTimeoutError(
            f"{exc}; repro_lightning.save_state must be called on every process, like "
            "accelerator.save_state (not inside `if accelerator.is_main_process:`)") from exc


def _log_state(tracker: ReproTracker, accelerator: Any, location: str, step: int | None,
               aliases: list[str], extra: dict[str, Any]) -> None:
    """Main process: log the directory in the tracker's background thread (joined before the
    next ``save_state``, ``load_state``, ``save_model`` and at the run's end), so training
    does not wait for the copy and hash of a big state."""
    try:
        context = tracker._open()
    except ReproError as exc:
        warnings.warn(f"repro: the state saved at {location} was not logged: {exc}",
                      RuntimeWarning, stacklevel=3)
        return
    if context is None:
        return
    _warn_if_incomplete(location, int(accelerator.num_processes))
    writer = context.manager.metrics_writer()
    try:
        if writer is not None:  # a relaunch from this state keeps every metric before it
            writer.flush()
    except ReproError as exc:  # (kept in memory and retried by the writer)
        warnings.warn(f"repro: metrics not yet written: {exc}", RuntimeWarning, stacklevel=3)
    extra = {**extra, "project": tracker.project, "step": step,
             "next_log_step": tracker.next_step,
             "iteration": int(accelerator.save_iteration),
             "num_processes": int(accelerator.num_processes),
             "distributed_type": str(getattr(accelerator.distributed_type, "value",
                                             accelerator.distributed_type))}
    tracker.submit(lambda: _log_now(tracker, location, step, aliases, extra))


def _log_now(tracker: ReproTracker, location: str, step: int | None, aliases: list[str],
             extra: dict[str, Any]) -> None:
    session = tracker._session
    try:
        meta = session.log_checkpoint(None, location, _View(step), link=False,
                                      aliases=aliases, extra=extra)
    except Exception as exc:  # the state is on disk: report, never stop the training
        warnings.warn(f"repro: the state saved at {location} was not logged: {exc!r}",
                      RuntimeWarning, stacklevel=2)
        return
    tracker._last_state = meta
    for path in [p for p in session.paths if not os.path.exists(p)]:
        session.released(path)  # Accelerate deleted it (total_limit): prune="mirror"


def _warn_if_incomplete(location: str, processes: int) -> None:
    """Every process writes its ``random_states_<i>.pkl``: one missing means a process saved
    elsewhere (several machines without a shared ``project_dir``), so the version would not
    restore that process."""
    missing = [i for i in range(processes) if processes > 1 and
               not os.path.exists(os.path.join(location, f"random_states_{i}.pkl"))]
    if missing:
        warnings.warn(f"repro: {location} lacks the RNG states of process(es) {missing}: "
                      "they saved into another directory (a project_dir not shared between "
                      "machines?); the logged state will not restore them", RuntimeWarning,
                      stacklevel=4)


def load_state(accelerator: Any, source: str | os.PathLike[str], *,
               verify: bool | None = None, **load_kwargs: Any) -> ArtifactMetadata | None:
    """``accelerator.load_state`` from a logged state (``"state:latest"``, ``"state:v3"``,
    ``"demo/state:best"``) or a directory. Call it on every process.

    A key is read by each process from the store (digest-checked unless ``verify=False``);
    its version's metadata is returned (``.metadata["step"]``: the step given to
    ``save_state``), the save counter of automatic naming is set past it, and the
    ``ReproTracker`` continues the run that saved it. A bare name resolves in the tracker's
    project. A directory path is loaded as Accelerate would, and None is returned.
    """
    tracker = find_tracker(accelerator)
    if tracker is not None:
        tracker.wait()
    path = os.fspath(source)
    if isinstance(source, os.PathLike) or os.path.isdir(path) or _looks_like_path(path):
        if not os.path.isdir(path):
            raise InvalidArgumentError(f"no directory {path!r} to load a state from (an "
                                       "artifact key looks like 'state:latest')",
                                       argument="source")
        accelerator.load_state(path, **load_kwargs)
        return None
    meta = state_metadata(path, project=tracker.project if tracker else None, verify=verify,
                          name=tracker._session.settings.checkpoint_name if tracker else None)
    saved_by = meta.metadata.get("num_processes")
    if isinstance(saved_by, int) and saved_by != int(accelerator.num_processes):
        warnings.warn(f"repro: {meta.key} was saved by {saved_by} processes and is loaded by "
                      f"{accelerator.num_processes}: Accelerate restores the RNG state of "
                      "the processes both have", RuntimeWarning, stacklevel=2)
    accelerator.load_state(os.fspath(meta.path or ""), **load_kwargs)
    iteration = meta.metadata.get("iteration")
    config = accelerator.project_configuration
    if isinstance(iteration, int) and not isinstance(iteration, bool):
        config.iteration = max(int(config.iteration), iteration)
    if tracker is not None and _is_main(accelerator):
        tracker.loaded_state(meta)
    return meta


def _looks_like_path(text: str) -> bool:
    """A key is ``[project/]name[:version|@digest]``: one slash at most, never leading."""
    return text.startswith(("/", ".", "~")) or text.count("/") > 1 or (os.sep != "/" and \
        os.sep in text)


def state_path(key: str, *, verify: bool | None = None) -> str:
    """The local, verified directory of a logged state, for
    ``accelerator.load_state(state_path("demo/state:latest"))`` (restores the state only:
    ``load_state`` above also continues the run and the save counter). Read by each process
    itself; records nothing."""
    return os.fspath(state_metadata(key, verify=verify).path or "")


def state_metadata(key: str, *, project: str | None = None, name: str | None = None,
                   verify: bool | None = None) -> ArtifactMetadata:
    """Rank-local metadata (``.path``: the checked directory) of a logged state."""
    parsed = parse_key(key)
    if project is not None and parsed.project is None:
        key = f"{project}/{key}"
    meta = ArtifactManager().artifact_metadata(key, "checkpoint", verify=verify)
    if meta.path is None or not os.path.isdir(meta.path):
        raise InvalidArgumentError(f"{meta.key} is not a saved Accelerate state (a "
                                   f"directory); expected a version of {name or 'state'!r}",
                                   argument="key")
    return meta


def save_model(accelerator: Any, model: Any, save_directory: str | os.PathLike[str], *,
               aliases: list[str] | None = None, metadata: dict[str, Any] | None = None,
               **save_kwargs: Any) -> ArtifactMetadata | None:
    """``accelerator.save_model(model, save_directory, **save_kwargs)`` (call it on every
    process), then the main process logs the directory as a ``model`` version descending
    from the config, datasets and newest state. Returns it there, None elsewhere."""
    aliases = check_aliases(aliases)
    extra = check_metadata(metadata)
    tracker = find_tracker(accelerator)
    if tracker is not None:
        tracker.wait()  # the newest state is this model's parent
    accelerator.save_model(model, os.fspath(save_directory), **save_kwargs)
    if tracker is None or not _is_main(accelerator) or not tracker._started:
        return None
    try:
        if tracker._open() is None:
            return None
        session = tracker._session
        parents = [*session.parents, *([session.previous] if session.previous else [])]
        with rank_zero_only():  # Accelerate wrote on the main process only
            return ArtifactManager().log_artifact(
                session.settings.model_name or "model", ArtifactType.MODEL,
                file_path=os.fspath(save_directory), parent_artifacts=parents,
                aliases=aliases, metadata={**extra, "run_id": session.run_id,
                                           "project": tracker.project})
    except ReproError as exc:  # the model is on disk: report, never fail the job here
        warnings.warn(f"repro: the model saved at {save_directory} was not logged: {exc}",
                      RuntimeWarning, stacklevel=2)
        return None


def find_tracker(accelerator: Any) -> ReproTracker | None:
    """The ``ReproTracker`` given to ``Accelerator(log_with=...)`` — on every process (only
    the main one's is started; the others' give the project)."""
    for tracker in [*getattr(accelerator, "trackers", []), *getattr(accelerator, "log_with", [])]:
        if isinstance(tracker, ReproTracker):
            return tracker
    return None


def _skip_taken_iteration(accelerator: Any) -> None:
    """With automatic naming, move the save counter past the folders that already exist (a
    relaunch, or ``load_state`` of a folder: Accelerate restores neither), instead of failing
    with "already exists". Every process lists the folder before any of them passes the
    first barrier (where the main process may delete some), so all agree."""
    config = accelerator.project_configuration
    if not config.automatic_checkpoint_naming:
        return
    folder = os.path.join(accelerator.project_dir, "checkpoints")
    try:
        taken = [int(m.group(1)) for m in map(_FOLDER.match, os.listdir(folder)) if m]
    except OSError:
        return
    # Past the newest, not just past a taken number: total_limit deletes the lowest numbers
    # first, and must never delete this launch's new folders before an older launch's.
    if taken and int(config.iteration) <= max(taken):
        config.iteration = max(taken) + 1


def _is_main(accelerator: Any) -> bool:
    """Accelerate's main process, if it is also repro's global rank 0 (they differ only when
    a process group exists that Accelerate does not use: every process then thinks it is
    the main one, and only rank 0 may write)."""
    return bool(accelerator.is_main_process) and is_rank_zero()


class _View:
    """What ``RunSession`` reads of a Lightning trainer, for an Accelerate save."""

    checkpoint_callback = None
    current_epoch = None

    def __init__(self, step: int | None) -> None:
        self.global_step = step
