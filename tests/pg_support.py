"""A real PostgreSQL server on loopback for the registry tests (Debian's ``postgresql``).

``initdb`` + ``pg_ctl`` in a temporary directory, on a free TCP port of 127.0.0.1, with
password (SCRAM) authentication over TCP — the path a team's server takes — and ``trust`` on
its private Unix socket for the fixture's own administration. PostgreSQL refuses to run as
root, so when the tests run as root (CI) the server runs as an unprivileged user through
``setpriv``.

``fsync=off`` (no power failure to survive here; a killed server loses nothing the OS has)
but ``synchronous_commit`` stays on: asynchronous commit loses the last transactions when the
server is killed, which the restart test would rightly report as lost metrics.

Each test gets a schema of its own (``options=-csearch_path=t_<n>`` in its URL): creating one
takes milliseconds, where a database per test would take a checkpoint each.

Where no server can be started the tests that need one are skipped with the reason, except
under ``REPRO_REQUIRE_POSTGRES=1`` (``.ci/run`` sets it), where they fail.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

USER, PASSWORD, DATABASE = "repro", "s3cret-pw", "repro"
_counter = itertools.count()


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgServer:
    """One server: start, stop, kill -9 and restart it on the same port and data."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "data"
        self.sock = base / "sock"
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: list[str] = []
        self.uid = -1
        self.sock.mkdir()
        if os.geteuid() == 0:  # PostgreSQL will not run as root
            entry = pwd.getpwnam("postgres" if _has_user("postgres") else "nobody")
            self.uid = entry.pw_uid
            self._as = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}",
                        "--clear-groups", "--"]
            for path in (base, self.sock):
                os.chown(path, entry.pw_uid, entry.pw_gid)

    def _run(self, *argv: str) -> None:
        subprocess.run([*self._as, *argv], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        pwfile = self.base / "pw"
        pwfile.write_text(PASSWORD)
        if self.uid >= 0:
            os.chown(pwfile, self.uid, -1)
        initdb = _bin("initdb")
        assert initdb
        self._run(initdb, "-D", str(self.data), "-U", USER, "--pwfile", str(pwfile),
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                  "--locale=C.UTF-8" if _has_locale("C.UTF-8") else "--locale=C")
        pwfile.unlink()

    def start(self) -> None:
        postgres = _bin("postgres")
        assert postgres
        log = open(self.base / "server.log", "ab")  # noqa: SIM115 (kept by the child)
        self.proc = subprocess.Popen(
            [*self._as, postgres, "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.sock), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "full_page_writes=off",
             "-c", "max_connections=300", "-c", "shared_buffers=64MB"],
            stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {(self.base / 'server.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
                if self.psql("SELECT 1", check=False, database="postgres").returncode == 0:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("postgres did not start within 60 s")

    def psql(self, sql: str, *, check: bool = True,
             database: str = DATABASE) -> subprocess.CompletedProcess[str]:
        psql = _bin("psql")
        assert psql
        return subprocess.run(
            [psql, "-h", str(self.sock), "-p", str(self.port), "-U", USER, "-d", database,
             "-v", "ON_ERROR_STOP=1", "-qtAc", sql],
            check=check, capture_output=True, text=True, timeout=60)

    def url(self, schema: str | None = None, *, password: bool = True,
            database: str = DATABASE) -> str:
        auth = f"{USER}:{PASSWORD}" if password else USER
        url = f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"
        return f"{url}?options=-csearch_path%3D{schema}" if schema else url

    def new_schema(self) -> str:
        """A fresh, empty schema (one per test) and the URL that works in it."""
        name = f"t_{os.getpid()}_{next(_counter)}"
        self.psql(f"CREATE SCHEMA {name}")
        return self.url(name)

    def kill(self) -> None:
        """SIGKILL the postmaster (its backends exit when they notice)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        _wait_port_free(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def _wait_port_free(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
        except OSError:
            return
        time.sleep(0.05)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def _has_locale(name: str) -> bool:
    out = subprocess.run(["locale", "-a"], capture_output=True, text=True, check=False).stdout
    return name.lower().replace("-", "") in out.lower().replace("-", "")


def required() -> bool:
    return os.environ.get("REPRO_REQUIRE_POSTGRES", "") == "1"


def start_server() -> Iterator[PgServer]:
    """Start a server for the session (skip or fail, as above, when that is impossible)."""
    if not _bin("initdb") or not _bin("postgres"):
        reason = "PostgreSQL server binaries (Debian package postgresql) are not installed"
        if required():
            pytest.fail(reason)
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="repro-pg-"))
    server = PgServer(base)
    try:
        server.init()
        server.start()
        server.psql(f"CREATE DATABASE {DATABASE}", database="postgres")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        server.stop()
        detail = getattr(exc, "stderr", "") or ""
        if required():
            pytest.fail(f"cannot start PostgreSQL: {exc} {detail}")
        pytest.skip(f"cannot start PostgreSQL: {exc} {detail}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)
