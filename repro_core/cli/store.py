"""``repro verify``, ``repro gc`` and ``repro du``: check every blob against the registry; drop
unreferenced ones; say what deduplication saves. All open the registry read-only first, so a
lost or damaged registry is one line (exit 2) before any work — gc must never see a missing
registry as "nothing is referenced"."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from .._progress import possible, progress, tracked
from ..errors import InvalidArgumentError
from ..registry import Registry, VersionRow
from ..store.local import LocalStorageBackend
from ..types import parse_key
from ._common import (
    console,
    emit_json,
    fmt_size,
    json_option,
    markup_safe,
    open_registry,
    root_option,
    store_root,
)

if TYPE_CHECKING:
    from ..maintenance import StoreUsage, VerifyReport

__all__ = ["du", "gc", "verify"]


@click.command(short_help="Re-hash blobs; exit 1 on corruption.")
@click.argument("key", required=False)
@click.option("--run", "run_id", metavar="RUN", default=None,
              help="Only the versions RUN (id or unique prefix) logged — its outputs, "
                   "deduplicated ones included; not the inputs it used.")
@click.option("--all", "check_all", is_flag=True, help="Check every blob (the default).")
@click.option("--size-only", is_flag=True, help="Check sizes, do not re-hash.")
@root_option
@json_option
def verify(key: str | None, run_id: str | None, check_all: bool, size_only: bool,
           root: Path | None, as_json: bool) -> None:
    """Re-hash blobs (all, one version's KEY, or one run's outputs); exit 1 and name every
    corrupt or missing one — for a part of a chunked checkpoint, the tensor(s) it holds and
    every version that shares it; chunked content is hashed as the files its parts make, so a
    forged manifest is caught too. A bar shows bytes and rate on a terminal (REPRO_PROGRESS=0:
    off). --json adds the store's deduplication figures ("dedup", as `repro du --json`)."""
    from ..maintenance import store_usage

    if sum((key is not None, run_id is not None, check_all)) > 1:
        raise InvalidArgumentError("give one of KEY, --run or --all", argument="key")
    with open_registry(root) as registry:
        versions = _selected(registry, key, run_id)
        total = _bytes_to_check(registry, versions, not size_only)
        usage = store_usage(registry)
    with progress(total, "verify", min_total=0) as advance:
        report = _verify(store_root(root), versions, not size_only, advance)
    if as_json:
        emit_json({"ok": report.ok, "blobs_checked": report.blobs_checked,
                   "bytes_checked": report.bytes_checked, "unreferenced": report.unreferenced,
                   "elsewhere": report.elsewhere,
                   "registry_integrity": report.registry_integrity,
                   "problems": [p.__dict__ for p in report.problems],
                   "dedup": usage.to_json()})
    else:
        out = console()
        for p in report.problems:
            holds = f" holding {', '.join(p.holds)}" if p.holds else ""
            out.print(f"[red]{markup_safe(p.kind.upper())}[/red] {markup_safe(p.digest)}"
                      f"{markup_safe(holds)} (used by "
                      f"{markup_safe(', '.join(p.versions) or 'no version')}): "
                      f"{markup_safe(p.message)}")
        status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
        out.print(f"{report.blobs_checked} blobs, {fmt_size(report.bytes_checked)} verified: "
                  f"{status}")
        if report.elsewhere:
            out.print(f"{len(report.elsewhere)} blob(s) other hosts logged are on a remote, "
                      "not here (fetched when used)")
    if not report.ok:
        raise SystemExit(1)


def _selected(registry: Registry, key: str | None, run_id: str | None
              ) -> list[VersionRow] | None:
    """The versions to check (None: the whole store)."""
    if key is not None:
        return [registry.resolve(parse_key(key), anywhere=True)]
    if run_id is not None:
        return registry.outputs_of(registry.resolve_run_id(run_id))
    return None


def _bytes_to_check(registry: Registry, versions: list[VersionRow] | None, full: bool) -> int:
    """What the bar counts: every blob's bytes; hashing, a chunked version's parts count as
    the file they make (``verify_store`` hashes them so: a part shared by ten checkpoints is
    read ten times). Chunked files inside directories are counted as their parts."""
    rows = registry.list_versions() if versions is None else versions
    if versions is None:
        blobs = {d: size or 0 for d, size in registry.blob_references()}
    else:
        blobs = {d: size for v in versions for d, size in registry.blobs_of(v.id)}
    if not full:
        return sum(blobs.values())
    chunked = {(v.manifest, v.digest): v for v in rows
               if v.manifest is not None and v.pruned_at is None}
    parts = {d for v in chunked.values() for d, _ in registry.blobs_of(v.id)
             if d != v.manifest}
    return (sum(size for d, size in blobs.items() if d not in parts)
            + sum(v.size for v in chunked.values()))


def _verify(root: Path, versions: list[VersionRow] | None, full: bool,
            advance: Callable[[int], None]) -> VerifyReport:
    """One ``verify_store`` pass, or one per selected version merged into one report (a blob
    two versions share is reported once)."""
    from ..maintenance import VerifyReport, verify_store

    if versions is None:
        return verify_store(root, full=full, progress=advance)
    merged = VerifyReport(root=root)
    seen: set[tuple[str, str]] = set()
    for version in versions:
        part = verify_store(root, full=full, key=version.key, progress=advance)
        merged.blobs_checked += part.blobs_checked
        merged.bytes_checked += part.bytes_checked
        merged.problems += [p for p in part.problems if (p.digest, p.kind) not in seen]
        seen |= {(p.digest, p.kind) for p in part.problems}
        if part.registry_integrity != "ok":
            merged.registry_integrity = part.registry_integrity
    return merged


def _grace(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgumentError(f"--grace must be a number of seconds >= 0, got {value}",
                                   argument="grace")
    return value


@click.command(short_help="Remove unreferenced blobs (dry run by default).")
@click.option("--dry-run/--delete", default=True,
              help="Only report (default), or really delete.")
@click.option("--grace", type=float, default=3600.0, show_default=True, callback=_grace,
              help="Keep unreferenced blobs younger than this many seconds (live writers).")
@root_option
@json_option
def gc(dry_run: bool, grace: float, root: Path | None, as_json: bool) -> None:
    """Remove blobs no version references and stale temp files (dry run by default)."""
    from ..maintenance import collect_garbage

    with open_registry(root):
        pass  # refuses a missing, lost or damaged registry before anything is deleted
    path = store_root(root)
    blobs = sum(1 for _ in LocalStorageBackend(path).iter_digests()) if possible() else None
    with tracked(blobs, "gc: checking blobs", min_total=0, unit="items"):
        report = collect_garbage(path, dry_run=dry_run, grace_seconds=grace)
    if as_json:
        emit_json({"dry_run": dry_run, "blobs": report.blobs, "bytes": report.bytes_freed,
                   "temp_files": report.temp_files, "kept_young": report.kept_young,
                   "materialized_dirs": report.materialized_dirs,
                   "assembled": report.assembled, "assembled_bytes": report.assembled_bytes})
        return
    verb = "would free" if dry_run else "freed"
    out = console()
    out.print(f"{verb} {fmt_size(report.bytes_freed)} in {len(report.blobs)} blob(s); "
              f"{report.temp_files} stale temp file(s); {report.kept_young} young "
              f"unreferenced blob(s) kept")
    if report.assembled:
        out.print(f"{'would remove' if dry_run else 'removed'} {report.assembled} assembled "
                  f"file(s) from the cache ({fmt_size(report.assembled_bytes)}), not used for "
                  f"{grace:g}s")
    if dry_run and (report.blobs or report.temp_files or report.assembled):
        out.print("run `repro gc --delete` to remove them")


@click.command(short_help="Logical vs stored bytes: what deduplication saves.")
@root_option
@json_option
def du(root: Path | None, as_json: bool) -> None:
    """What the store's live versions hold (logical: the sum of their sizes) against what it
    keeps for them (stored: every blob they reference, once — parts a chunked checkpoint
    shares with others, identical files, manifests), and the difference. From the registry
    alone: no blob is read. Pruned versions are left out (gc may reclaim their blobs)."""
    from ..maintenance import store_usage

    with open_registry(root) as registry:
        usage = store_usage(registry)
    if as_json:
        emit_json(usage.to_json())
        return
    for line in _du_lines(usage):
        console().print(line, markup=False)


def _du_lines(usage: StoreUsage) -> list[str]:
    """``repro du``'s text: one figure a line, labels aligned."""
    ratio = "-" if usage.ratio is None else f"{usage.ratio:.2f}x"
    saved = usage.saved_bytes
    return [f"versions: {usage.versions} ({usage.chunked_versions} chunked)",
            f"logical:  {fmt_size(usage.logical_bytes)} ({usage.logical_bytes} bytes)",
            f"stored:   {fmt_size(usage.stored_bytes)} ({usage.stored_bytes} bytes) in "
            f"{usage.blobs} blob(s)",
            f"saved:    {'-' if saved < 0 else ''}{fmt_size(abs(saved))} ({saved} bytes), "
            f"ratio {ratio}"]
