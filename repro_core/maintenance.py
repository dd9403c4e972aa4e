"""Store-wide upkeep: verify (re-hash every blob, cross-check the registry), gc, and how much
deduplication saves (``store_usage``, ``repro du``).

``verify_store`` never repairs anything: a corrupt blob is evidence, and deleting it would hide
which versions were affected. The report names every bad blob and the versions that need it —
for a part of chunked content (``chunks``) also what it holds ("tensor 'layer.0.weight'"), and
every version whose manifest lists it (a frozen layer's blob is shared by many checkpoints).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import _cache, _progress, constants
from ._cache_gc import entry_bytes
from ._journal import journal_digests
from ._safepath import check_digest
from ._verify_chunks import ChunkedFile, Manifests, hash_through_parts, read_manifests
from .errors import IntegrityError
from .registry import Registry
from .store.local import LocalStorageBackend, is_stale_temp
from .types import parse_key

__all__ = ["GcReport", "Problem", "StoreUsage", "VerifyReport", "collect_garbage",
           "store_usage", "verify_store"]


@dataclass(frozen=True)
class Problem:
    """One bad blob: ``kind`` is ``missing``, ``size``, ``digest``, ``type`` (not a regular
    file), ``name`` (not a digest) or ``manifest`` (a directory's or a chunked version's
    manifest that ``use_artifact`` would refuse: malformed, paths leaving the tree, parts the
    registry does not record, or not describing the version). ``holds`` says what a part of
    chunked content holds ("tensor 'layer.0.weight'", "the header", "chunk manifest")."""

    digest: str
    kind: str
    message: str
    versions: tuple[str, ...] = ()
    holds: tuple[str, ...] = ()


@dataclass
class VerifyReport:
    """What ``verify_store`` found; ``ok`` is True only when nothing is wrong."""

    root: Path
    blobs_checked: int = 0
    bytes_checked: int = 0
    unreferenced: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    registry_integrity: str = "ok"
    # A shared (PostgreSQL) registry names blobs other hosts logged: those this host does not
    # hold but a remote does are not missing (``use_artifact`` fetches them), only elsewhere.
    elsewhere: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.registry_integrity == "ok"


def verify_store(
    root: str | Path | None = None,
    *,
    full: bool = True,
    progress: Callable[[int], None] | None = None,
    key: str | None = None,
) -> VerifyReport:
    """Check every blob on disk and every blob the registry references (or one version's).

    ``full`` re-hashes content (otherwise sizes only); ``progress`` receives bytes checked;
    ``key`` (``name:v3``, an alias…) limits the check to the blobs that version needs.
    Unreferenced blobs (left by a crash between blob and registry row) are listed, not errors.
    Every manifest must be one ``use_artifact`` accepts; chunked content is hashed as the files
    its parts make (``_verify_chunks``), and a bad part is reported with what it holds.
    """
    root_path = _store_root(root)
    registry = Registry(root_path / "registry.sqlite", readonly=True)
    try:
        store = LocalStorageBackend(root_path, algorithm=registry.hash_algorithm())
        report = VerifyReport(root=root_path, registry_integrity=registry.integrity_check())
        wanted = registry.resolve(parse_key(key)) if key is not None else None
        referenced: dict[str, int | None]
        if wanted is not None:
            # a pruned version's blobs were released on purpose (gc may have taken them)
            referenced = {} if wanted.pruned_at is not None else dict(registry.blobs_of(wanted.id))
            candidates = set(referenced)
        else:
            referenced = dict(registry.blob_references())
            candidates = set(store.iter_digests()) | referenced.keys()
        manifests = read_manifests(store, registry, None if wanted is None else wanted.id)
        check = _BlobCheck(store, report, _versions_by_digest(registry), full, progress,
                           manifests.parts() if full else {})
        check.blobs(sorted(candidates), referenced, _held_by_remotes(registry))
        _report_manifests(manifests, report)
        if full:
            check.whole(manifests)
        _label(manifests, report)
        return report
    finally:
        registry.close()


def _held_by_remotes(registry: Registry) -> set[str]:
    """Digests a remote holds, for a shared registry (empty for SQLite: its rows only name
    what this store holds or pulled)."""
    if registry.engine != "postgresql":
        return set()
    return {str(r[0]) for r in registry._read(
        "SELECT DISTINCT vb.digest FROM version_blobs vb JOIN remote_versions rv"
        " ON rv.version_id = vb.version_id")}


def total_referenced_bytes(root: str | Path | None = None) -> int:
    """Bytes every referenced blob holds (``repro verify``'s bar counts chunked content as
    the files its parts make: ``cli/store._bytes_to_check``)."""
    registry = Registry(_store_root(root) / "registry.sqlite", readonly=True)
    try:
        return sum(size or 0 for _, size in registry.blob_references())
    finally:
        registry.close()


class _BlobCheck:
    """The blob checks of one ``verify_store``. ``parts``: the parts of chunked files whose
    manifests read back well (full mode only) — size-checked with the other blobs, their
    content proven by hashing each file through its parts (``whole``), one by one only where
    that fails or never ran."""

    def __init__(self, store: LocalStorageBackend, report: VerifyReport,
                 users: dict[str, tuple[str, ...]], full: bool,
                 progress: Callable[[int], None] | None, parts: dict[str, int]) -> None:
        self.store, self.report, self.users, self.full = store, report, users, full
        self.progress, self.parts = progress, parts

    def blobs(self, digests: list[str], referenced: dict[str, int | None],
              remote_held: set[str]) -> None:
        for digest in digests:
            size = referenced.get(digest)
            if digest in remote_held and not self.store.exists(digest):
                self.report.elsewhere.append(digest)
                continue
            if digest not in referenced:
                self.report.unreferenced.append(digest)
            if size is None:  # unreferenced, or a payload row written before sizes were kept
                try:
                    size = self.store.blob_path(digest).stat().st_size
                except FileNotFoundError:
                    if digest not in referenced:
                        continue  # gc'd while we looked: nothing to verify
                    size = -1  # referenced but gone: reported as missing
            whole = digest in self.parts  # hashed with its file(s) below
            self.one(digest, size, hashing=self.full and not whole, count=True)
            if self.progress is not None and not whole:
                self.progress(size)

    def one(self, digest: str, size: int, *, hashing: bool, count: bool) -> bool:
        """One blob's check; False (and a problem naming every version that needs it) when
        it fails. ``count``: first look at this blob (not a part hashed again)."""
        self.report.blobs_checked += count
        try:
            check_digest(digest, where="blob name")
            # identity=False: a sizes-only verify stays sizes-only, even for blobs never
            # verified
            self.store.check(digest, size, full=hashing, identity=False)
        except IntegrityError as exc:
            self.report.problems.append(Problem(digest, _problem_kind(exc, size), str(exc),
                                                self.users.get(digest, ())))
            return False
        if hashing or not self.full:  # a part's bytes count when its file is hashed
            self.report.bytes_checked += size
        return True

    def whole(self, manifests: Manifests) -> None:
        """Each chunked file hashed through its parts against its whole-file digest; on a
        mismatch its parts are hashed one by one (each at most once) and the bad ones
        reported, or — every part good — the manifest is wrong. Then every part no file
        proved (its files were skipped: another part missing, a manifest reported) alone."""
        reported = {p.digest for p in self.report.problems}
        done: set[tuple[str, str]] = set()
        proven: set[str] = set()
        for item in manifests.files:
            blobs = [d for d, _ in item.manifest.blobs()]
            if (item.manifest_digest, item.digest) in done \
                    or any(d in reported for d in [item.manifest_digest, *blobs]):
                continue  # shared and hashed already, or a part missing / of another size
            done.add((item.manifest_digest, item.digest))
            actual = hash_through_parts(self.store, item)
            self.report.bytes_checked += item.size
            if self.progress is not None:
                self.progress(item.size)
            if actual != item.digest:
                bad = self._diagnose(item, actual, proven)
                reported.update(bad)
                blobs = [d for d in blobs if d not in bad]
            proven.update(blobs)
        for digest in sorted(self.parts.keys() - proven - reported):
            self.one(digest, self.parts[digest], hashing=True, count=False)

    def _diagnose(self, item: ChunkedFile, actual: str | None, proven: set[str]) -> set[str]:
        bad = {d for d, n in item.manifest.blobs()
               if d not in proven and not self.one(d, n, hashing=True, count=False)}
        if not bad:
            self.report.problems.append(Problem(
                item.manifest_digest, "manifest",
                f"the parts that chunk manifest {item.manifest_digest} lists for "
                f"{item.version}{item.of} put together hash to {actual}, not to the "
                f"{item.digest} recorded; the manifest is wrong (forged?)",
                self.users.get(item.manifest_digest, (item.version,))))
        return bad


def _problem_kind(exc: IntegrityError, size: int) -> str:
    if exc.digest is None:
        return "name"  # not a digest: a stray file under blobs/, or a forged row
    if exc.actual is None:
        return "missing"
    if exc.expected == "regular file":
        return "type"  # a symlink or special file where a blob belongs
    return "size" if exc.expected == size else "digest"


def _report_manifests(manifests: Manifests, report: VerifyReport) -> None:
    """Manifests ``use_artifact`` would refuse are problems of their version — unless the
    manifest's own blob is already reported (missing, corrupt: its versions are named)."""
    reported = {p.digest for p in report.problems}
    for error in manifests.errors:
        if error.digest not in reported:
            report.problems.append(Problem(error.digest, "manifest", error.message,
                                           (error.version,)))


def _label(manifests: Manifests, report: VerifyReport) -> None:
    """Say what each reported blob of chunked content holds: a part ("tensor 'x'", "the
    header", with " of file 'y'" in a directory) or a chunk manifest."""
    holds: dict[str, set[str]] = {}
    reported = {p.digest for p in report.problems if p.kind != "manifest"}
    for item in manifests.files:
        for digest, _ in item.manifest.blobs():
            if digest in reported:
                holds.setdefault(digest, set()).add(f"{item.manifest.label(digest)}{item.of}")
    for error in manifests.errors:
        if error.label and error.digest in reported:
            holds.setdefault(error.digest, set()).add(error.label)
    report.problems[:] = [dataclasses.replace(p, holds=tuple(sorted(holds[p.digest])))
                          if p.digest in holds and p.kind != "manifest" else p
                          for p in report.problems]


@dataclass(frozen=True)
class StoreUsage:
    """What live (unpruned) versions hold against what the store keeps for them: ``logical``
    is the sum of their sizes, ``stored`` the distinct blobs they reference, each once (parts
    of chunked content shared between checkpoints, identical files, manifests)."""

    versions: int
    chunked_versions: int
    logical_bytes: int
    blobs: int
    stored_bytes: int

    @property
    def saved_bytes(self) -> int:
        return self.logical_bytes - self.stored_bytes

    @property
    def ratio(self) -> float | None:
        """Logical over stored bytes (2.0: half the bytes kept); None for an empty store."""
        return self.logical_bytes / self.stored_bytes if self.stored_bytes else None

    def to_json(self) -> dict[str, int | float | None]:
        return {**dataclasses.asdict(self), "saved_bytes": self.saved_bytes,
                "ratio": self.ratio}


def store_usage(registry: Registry) -> StoreUsage:
    """The store's deduplication figures, from the registry alone (no blob is read)."""
    return StoreUsage(*registry.usage_totals())


def _versions_by_digest(registry: Registry) -> dict[str, tuple[str, ...]]:
    keys = {row.id: row.key for row in registry.list_versions()}
    users: dict[str, list[str]] = {}
    for version_id, digest in registry.version_blob_pairs():
        if version_id in keys:
            users.setdefault(digest, []).append(keys[version_id])
    return {d: tuple(v) for d, v in users.items()}


@dataclass
class GcReport:
    """What ``collect_garbage`` removed (or would remove, in a dry run)."""

    root: Path
    dry_run: bool
    blobs: list[str] = field(default_factory=list)
    blob_bytes: int = 0
    temp_files: int = 0
    materialized_dirs: int = 0  # every stale cache entry (assembled ones included)
    kept_young: int = 0
    assembled: int = 0  # of those, assembled chunked files (or a dead build's temp file)
    assembled_bytes: int = 0

    @property
    def bytes_freed(self) -> int:
        return self.blob_bytes


def collect_garbage(
    root: str | Path | None = None, *, dry_run: bool = True, grace_seconds: float = 3600.0
) -> GcReport:
    """Remove blobs no version references, dead writers' temp files, stale directory caches.

    Dry run by default (like ``dvc gc``, deleting needs an explicit choice). Artifact writers
    hold the store's publish guard from blob to registry row, and gc takes it exclusively, so
    no logged version (nor TTRL payload, committed with its row under the same guard) can lose
    its blob. Unreferenced blobs younger than ``grace_seconds`` are kept too: a crashed
    writer's blob is evidence for a while, and a blob any run journal names is always kept.
    """
    root_path = _store_root(root)
    registry = Registry(root_path / "registry.sqlite", readonly=True)
    report = GcReport(root=root_path, dry_run=dry_run)
    try:
        store = LocalStorageBackend(root_path, algorithm=registry.hash_algorithm())
        # Exclusive: no writer is between publishing a blob and committing its row, so the
        # registry read inside the lock is the truth for every blob it does not list. A dry
        # run deletes nothing, so it needs no lock (and works on a read-only store).
        # With a PostgreSQL registry the writers may be on other hosts: the registry's guard
        # (an advisory lock on the server) covers them as the store's lock file covers this one.
        guard = contextlib.nullcontext() if dry_run else store.publish_guard(exclusive=True)
        shared = contextlib.nullcontext() if dry_run else registry.publish_guard(exclusive=True)
        with guard, shared:
            # A blob a run journal names is kept even if no row names it (see _journal).
            referenced = {d for d, _ in registry.blob_references()} | journal_digests(root_path)
            _collect_blobs(store, referenced, grace_seconds, report)
            for entry in _cache.stale_entries(store, grace_seconds):
                report.materialized_dirs += 1
                if entry.kind == "assembled":
                    report.assembled += 1
                    report.assembled_bytes += entry_bytes(store, entry)
                if not dry_run:
                    _cache.remove_stale(store, entry)
    finally:
        registry.close()
    report.temp_files = (store.sweep_tmp() if not dry_run
                         else _count_stale_tmp(store, time.time()))
    return report


def _collect_blobs(store: LocalStorageBackend, referenced: set[str], grace_seconds: float,
                   report: GcReport) -> None:
    """Unreferenced blobs older than the grace period are reported, and deleted unless it is
    a dry run."""
    now = time.time()
    for digest in list(store.iter_digests()):
        _progress.report(1)  # one blob looked at (a bar only when the caller shows one)
        if digest in referenced:
            continue
        try:
            st = store.blob_path(digest).stat()
        except FileNotFoundError:  # removed meanwhile by another gc
            continue
        if now - st.st_mtime < grace_seconds:
            report.kept_young += 1
            continue
        report.blobs.append(digest)
        report.blob_bytes += st.st_size
        if not report.dry_run:
            store.delete(digest)


def _count_stale_tmp(store: LocalStorageBackend, now: float) -> int:
    if not store.tmp_dir.is_dir():
        return 0
    return sum(1 for entry in store.tmp_dir.iterdir() if is_stale_temp(entry, now))


def _store_root(root: str | Path | None) -> Path:
    """The store to work on; opening its registry read-only then says whether there is one
    (``StoreNotFoundError``) or it was lost (``RegistryDamagedError``)."""
    return Path(root or constants.REPRO_HOME or constants.DEFAULT_HOME).expanduser().absolute()
