"""What every command shares: the error boundary, ``--root``, the read-only registry, output.

The error contract (scripts rely on it):

- exit 0: done; exit 1: ``repro verify`` found corruption (and only that);
- exit 2: the command could not do what was asked — bad arguments, unknown run or key, no
  store, a damaged registry, a bad setting. Always **one line** on stderr starting
  ``repro: error:``, never a traceback: errors are typed (``ReproError``) and translated here,
  once, at the boundary (``ReproGroup.invoke``), not in each command. Anything else that
  escapes (a forged registry value a query did not expect) is still one line, naming its type;
  ``repro --debug`` re-raises it with the traceback.
"""

from __future__ import annotations

import errno
import json
import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.table import Table

from .. import constants
from ..errors import ReproError
from ..registry import Registry, RunRow
from ..types import validate_project

__all__ = [
    "ReproGroup", "RootPath", "Usage", "clean", "console", "emit_json", "finite", "fmt_size",
    "fmt_time", "fmt_value", "json_option", "markup_safe", "open_registry", "project_option",
    "root_option", "run_duration", "store_root", "table",
]

_F = TypeVar("_F", bound=Callable[..., Any])
_ROOT = "repro.root"  # ctx.meta key of the group's --root
_DEBUG = "repro.debug"


class Usage(click.ClickException):
    """One line on stderr, exit code 2 (could not do what was asked), as ``git`` and ``dvc``."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"repro: error: {one_line(self.message)}", err=True)


def one_line(text: str) -> str:
    """A message fit for one stderr line (SQLite and OS messages may carry newlines)."""
    return " ".join(text.split())


class ReproGroup(click.Group):
    """The boundary: typed errors and click's own usage errors become one line, exit 2."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # plain ``repro``: the help text is the answer
        except click.UsageError as exc:
            raise _usage_line(exc) from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            raise _usage_line(exc) from exc
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except ReproError as exc:
            raise Usage(str(exc)) from exc
        except Exception as exc:
            if ctx.meta.get(_DEBUG) or (isinstance(exc, OSError) and exc.errno == errno.EPIPE):
                raise  # --debug: the traceback; EPIPE (``| head``): click's own quiet handling
            raise Usage(f"unexpected {type(exc).__name__}: {exc} (a damaged store, or a bug "
                        "in repro: `repro --debug …` shows the traceback)") from exc


def _usage_line(exc: click.UsageError) -> Usage:
    where = exc.ctx.command_path if exc.ctx is not None else "repro"
    return Usage(f"{exc.format_message()} (see `{where} --help`)")


# -- options ----------------------------------------------------------------------------------

def root_option(fn: _F) -> _F:
    return click.option(
        "--root", type=RootPath(), default=None,
        help="Store root (default: repro --root, else $REPRO_HOME, else ./repro_store).",
    )(fn)


class RootPath(click.Path):
    """A store root: any path but the empty string (which click would take as ".")."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("must not be empty (an empty root would make the current directory a "
                      "store)", param, ctx)
        return super().convert(value, param, ctx)


def json_option(fn: _F) -> _F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Machine-readable output (strict JSON).")(fn)


def project_option(fn: _F) -> _F:
    return click.option("--project", default=None, callback=_check_project,
                        help="Only this project's.")(fn)


def _check_project(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return None if value is None else validate_project(value)


def remember_group_options(ctx: click.Context, root: Path | None, debug: bool) -> None:
    """The group's ``--root`` (as ``git -C`` users type it) and ``--debug``, for commands."""
    ctx.meta[_ROOT] = root
    ctx.meta[_DEBUG] = debug


def store_root(root: Path | None) -> Path:
    """The store a command works on: its own ``--root``, else the group's, else
    ``$REPRO_HOME``, else ``./repro_store``. Nothing is checked or created here."""
    ctx = click.get_current_context(silent=True)
    chosen = root or (ctx.meta.get(_ROOT) if ctx is not None else None)
    return Path(chosen or constants.REPRO_HOME or constants.DEFAULT_HOME).expanduser().absolute()


@contextmanager
def open_registry(root: Path | None) -> Iterator[Registry]:
    """The store's registry, read-only: never creates, migrates or writes anything. No store
    is ``StoreNotFoundError``; a lost or damaged registry is ``RegistryDamagedError``."""
    registry = Registry(store_root(root) / "registry.sqlite", readonly=True)
    try:
        registry.open()
        yield registry
    finally:
        registry.close()


# -- output -----------------------------------------------------------------------------------

def console() -> Console:
    """A console on the current stdout; wide when piped so keys and ids are never cut."""
    return Console(highlight=False, width=None if sys.stdout.isatty() else 160)


def clean(value: object) -> str:
    """A stored string made safe to print: control characters (a planted ``ESC]0;…`` would
    retitle the terminal, ``\\n`` would forge a table row) shown as escapes. Stores come from
    other people; what they hold is printed, never obeyed."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape")
                   .decode("ascii") for c in text)


def markup_safe(value: object) -> str:
    """``clean`` and escaped for rich markup, for stored values inside a markup template."""
    from rich.markup import escape

    return escape(clean(value))


class _SafeTable(Table):
    """A table whose string cells are shown as given (no rich markup) and ``clean``ed."""

    def add_row(self, *renderables: Any, **kwargs: Any) -> None:
        from rich.text import Text

        super().add_row(*(Text(clean(r)) if isinstance(r, str) else r for r in renderables),
                        **kwargs)


def table(*headers: str) -> Table:
    out = _SafeTable()
    for header in headers:
        out.add_column(header, overflow="fold")
    return out


def emit_json(value: Any) -> None:
    """Strict JSON for scripts: NaN/inf become the strings "nan"/"inf"/"-inf"."""
    click.echo(json.dumps(finite(value), indent=2, sort_keys=True, default=str,
                          allow_nan=False))


def finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def fmt_value(value: Any) -> str:
    return "-" if value is None else json.dumps(finite(value), default=str)


def run_duration(run: RunRow) -> str:
    if not run.ended_at:
        return "-"
    try:
        seconds = (datetime.fromisoformat(run.ended_at)
                   - datetime.fromisoformat(run.created_at)).total_seconds()
    except (TypeError, ValueError):  # a forged end time: show nothing rather than fail
        return "?"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def fmt_time(unix: object) -> str:
    """A unix time as ``YYYY-MM-DD HH:MM:SS`` UTC (TTRL rows store unix seconds)."""
    if not isinstance(unix, (int, float)):
        return "-"
    try:
        return datetime.fromtimestamp(unix, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):  # NaN or forged: not a time
        return "-"


def fmt_size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover
