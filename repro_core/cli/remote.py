"""``repro remote add|list|remove``, ``repro push``, ``repro pull``, ``repro status``.

    repro remote add origin s3://team-bucket/repro
    repro push [REMOTE] [KEY | --run RUN | --all]      (nothing named: everything)
    repro pull [REMOTE] [KEY | --run RUN | --all]
    repro status                                       (background pushes still queued)

``REMOTE`` may be omitted when the store has one remote, one called ``origin``, or
``$REPRO_REMOTE`` names one; a single argument that is not a remote name is taken as the KEY
(as ``git push`` takes a branch). Long transfers draw a bytes/rate bar on a terminal;
``--json`` prints the report instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from .. import remote as remote_api
from ..errors import ArtifactNotFoundError, StoreNotFoundError
from ..store._remote import redact_url
from ._common import clean, console, emit_json, json_option, root_option, store_root, table

__all__ = ["pull", "push", "remote", "status"]


@click.group(short_help="Name, list or remove remotes.")
def remote() -> None:
    """Remotes of the store: object stores (s3://, gs://), directories, W&B mirrors
    (wandb://[entity/]project). Credentials are never stored: the provider's own settings
    (AWS_* / AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, wandb login) are used."""


@remote.command("add", short_help="Name a remote.")
@click.argument("name")
@click.argument("url")
@click.option("--replace", is_flag=True, help="Re-point an existing name.")
@root_option
def add(name: str, url: str, replace: bool, root: Path | None) -> None:
    """Name a remote: NAME URL (s3://bucket/prefix, gs://…, a directory, wandb://project)."""
    stored = remote_api.add_remote(name, url, root=store_root(root), replace=replace)
    click.echo(f"remote {name} -> {redact_url(stored)}")


@remote.command("list", short_help="List the remotes.")
@root_option
@json_option
def list_(root: Path | None, as_json: bool) -> None:
    """List the store's remotes."""
    named = remote_api.remotes(root=store_root(root))
    if as_json:
        emit_json({n: redact_url(u) for n, u in named.items()})
        return
    for name, url in named.items():
        click.echo(f"{clean(name)}\t{clean(redact_url(url))}")


@remote.command("remove", short_help="Forget a remote.")
@click.argument("name")
@root_option
def remove(name: str, root: Path | None) -> None:
    """Forget a remote (nothing on it is deleted)."""
    dropped = remote_api.drop_remote(name, root=store_root(root))
    if dropped is None:
        raise ArtifactNotFoundError(f"no remote named {name!r}", key=name)
    click.echo(f"removed remote {name}" + (f" and its {dropped} queued push(es)" if dropped
                                           else ""))


def _target(args: tuple[str, ...], root: Path) -> tuple[str | None, str | None]:
    """``[REMOTE] [KEY]``: one argument is a remote if the store knows that name."""
    if len(args) > 2:
        raise click.UsageError("expected at most REMOTE and KEY")
    if len(args) == 2:
        return args[0], args[1]
    if len(args) == 1:
        if "://" in args[0] or args[0].startswith(("/", ".", "~")):
            return args[0], None  # a URL or a directory
        try:
            known = remote_api.remotes(root=root)
        except StoreNotFoundError:  # a new store has no remotes: the name is the remote's
            return args[0], None
        return (args[0], None) if args[0] in known else (None, args[0])
    return None, None


@contextmanager
def _remote_hint(args: tuple[str, ...], name: str | None, root: Path) -> Iterator[None]:
    """One argument taken as a KEY (no remote has that name) that turns out to be no key
    either was probably a remote's name, mistyped or removed: say so."""
    try:
        yield
    except ArtifactNotFoundError as exc:
        if len(args) != 1 or name is not None:
            raise
        try:
            known = ", ".join(remote_api.remotes(root=root)) or "none"
        except StoreNotFoundError:
            raise exc from None
        raise ArtifactNotFoundError(f"{exc} (if {args[0]!r} was meant as a remote: this "
                                    f"store's remotes are {known})", key=args[0]) from exc


def _sync_options(fn: click.decorators.FC) -> click.decorators.FC:
    for option in reversed([
        click.argument("args", nargs=-1, metavar="[REMOTE] [KEY]"),
        click.option("--run", "run_id", default=None, help="A run (id or unique prefix): "
                     "what it logged and used, with their lineage."),
        click.option("--all", "everything", is_flag=True,
                     help="Every version and run (the default when nothing is named)."),
        root_option, json_option]):
        fn = option(fn)
    return fn


@click.command(short_help="Send versions, runs and their rows to a remote.")
@_sync_options
@click.option("--check", is_flag=True,
              help="Look everything up on the remote again instead of trusting what this "
                   "store recorded of it (repairs a remote that lost data).")
def push(args: tuple[str, ...], run_id: str | None, everything: bool, root: Path | None,
         as_json: bool, check: bool) -> None:
    """Push to a remote: a KEY (with its upstream lineage), --run RUN, or everything.
    Idempotent (what the remote has is skipped) and resumable."""
    base = store_root(root)
    name, key = _target(args, base)
    with _remote_hint(args, name, base):
        report = remote_api.push(name, key, run=run_id, all=everything, root=base,
                                 show_progress=not as_json, check=check)
    _show(report, as_json)


@click.command(short_help="Fetch versions, runs and their rows from a remote.")
@_sync_options
def pull(args: tuple[str, ...], run_id: str | None, everything: bool, root: Path | None,
         as_json: bool) -> None:
    """Pull from a remote: a KEY (name:v3, name:best, name@<digest prefix>), --run RUN, or
    everything. Every blob is verified; rows are imported in one transaction."""
    base = store_root(root)
    name, key = _target(args, base)
    with _remote_hint(args, name, base):
        report = remote_api.pull(name, key, run=run_id, all=everything, root=base,
                                 show_progress=not as_json)
    _show(report, as_json)


def _show(report: remote_api.SyncReport, as_json: bool) -> None:
    if as_json:
        emit_json(report.to_json())
        return
    arrow = "->" if report.direction == "push" else "<-"
    where = f"{report.remote} ({redact_url(report.url)})"
    if not report.transferred:
        click.echo(f"{report.direction} {arrow} {where}: up to date"
                   + (f" ({report.skipped} version(s) already there)"
                      if report.direction == "push" else ""))
    else:
        click.echo(f"{report.direction} {arrow} {where}: {len(report.versions)} version(s), "
                   f"{len(report.runs)} run(s), {report.blobs} blob(s), {report.bytes} bytes, "
                   f"{report.aliases} alias(es); {report.skipped} already there")
    for old, new in report.renumbered:
        click.echo(f"renumbered {clean(old)} -> {clean(new)} (the number was taken on the "
                   "remote; the version, its digest and lineage are unchanged)")
    for problem in report.problems:
        click.echo(f"note: {clean(problem)}", err=True)


@click.command(short_help="Show remotes and the pushes still queued.")
@root_option
@json_option
def status(root: Path | None, as_json: bool) -> None:
    """Remotes and the background pushes still queued for each (with their last error)."""
    base = store_root(root)
    state = remote_api.status(root=base)
    if as_json:
        emit_json({name: {
            "url": redact_url(str(info["url"])), "unpushed": info["unpushed"],
            "pending": [{"what": remote_api.describe(i, root=base), "kind": i.kind,
                         "ref": i.ref, "enqueued_at": i.enqueued_at, "attempts": i.attempts,
                         "last_error": i.last_error}
                        for i in info["pending"]]}  # type: ignore[attr-defined]
            for name, info in state.items()})
        return
    if not state:
        click.echo("no remotes (`repro remote add NAME URL`)")
        return
    out = table("remote", "url", "not pushed", "queued", "last error")
    for name, info in state.items():
        items = info["pending"]
        errors = [i.last_error for i in items if i.last_error]  # type: ignore[attr-defined]
        queued = [f"{remote_api.describe(i, root=base)} ({i.attempts} tries)"  # type: ignore[attr-defined]
                  for i in items[:3]]  # type: ignore[index]
        more = len(items) - len(queued)  # type: ignore[arg-type]
        out.add_row(clean(name), clean(redact_url(str(info["url"]))),
                    f"{info['unpushed']} version(s)",
                    clean(", ".join(queued) + (f", +{more} more" if more > 0 else "")) or "0",
                    clean(errors[-1]) if errors else "")
    console().print(out)
