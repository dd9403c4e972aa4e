"""Store-wide checks: re-hash every blob, cross-check the registry, and report what is wrong.

``verify_store`` never repairs anything: a corrupt blob is evidence, and deleting it would hide
which versions were affected. The report names every bad blob and the versions that need it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import constants
from .errors import IntegrityError, InvalidArgumentError
from .registry import Registry
from .store.local import LocalStorageBackend

__all__ = ["Problem", "VerifyReport", "verify_store"]


@dataclass(frozen=True)
class Problem:
    """One bad blob: ``kind`` is ``missing``, ``size`` or ``digest``."""

    digest: str
    kind: str
    message: str
    versions: tuple[str, ...] = ()


@dataclass
class VerifyReport:
    """What ``verify_store`` found; ``ok`` is True only when nothing is wrong."""

    root: Path
    blobs_checked: int = 0
    bytes_checked: int = 0
    unreferenced: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    registry_integrity: str = "ok"

    @property
    def ok(self) -> bool:
        return not self.problems and self.registry_integrity == "ok"


def verify_store(
    root: str | Path | None = None,
    *,
    full: bool = True,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check every blob on disk and every blob the registry references.

    ``full`` re-hashes content (otherwise sizes only); ``progress`` receives bytes checked.
    Unreferenced blobs (left by a crash between blob and registry row) are listed, not errors.
    """
    root_path = Path(root or constants.REPRO_HOME or constants.DEFAULT_HOME).absolute()
    if not (root_path / "registry.sqlite").is_file():
        raise InvalidArgumentError(f"{root_path} is not a repro store (no registry.sqlite)",
                                   argument="root")
    registry = Registry(root_path / "registry.sqlite")
    try:
        store = LocalStorageBackend(root_path, algorithm=registry.hash_algorithm())
        report = VerifyReport(root=root_path, registry_integrity=registry.integrity_check())
        referenced = dict(registry.blob_references())
        users = _versions_by_digest(registry)
        on_disk = set(store.iter_digests())
        for digest in sorted(on_disk | referenced.keys()):
            size = referenced.get(digest)
            if size is None:
                report.unreferenced.append(digest)
                size = store.blob_path(digest).stat().st_size
            _check_one(store, digest, size, full, users.get(digest, ()), report)
            if progress is not None:
                progress(size)
        return report
    finally:
        registry.close()


def _check_one(store: LocalStorageBackend, digest: str, size: int, full: bool,
               versions: tuple[str, ...], report: VerifyReport) -> None:
    report.blobs_checked += 1
    try:
        store.check(digest, size, full=full)
    except IntegrityError as exc:
        kind = "missing" if exc.actual is None else ("size" if exc.expected == size else "digest")
        report.problems.append(Problem(digest, kind, str(exc), versions))
        return
    report.bytes_checked += size


def _versions_by_digest(registry: Registry) -> dict[str, tuple[str, ...]]:
    users: dict[str, list[str]] = {}
    for row in registry.list_versions():
        for digest, _ in registry.blobs_of(row.id):
            users.setdefault(digest, []).append(row.key)
    return {d: tuple(v) for d, v in users.items()}
