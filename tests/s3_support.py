"""A real S3-compatible server on loopback for the tests: moto's server mode, one per session.

``moto_s3`` starts ``ThreadedMotoServer`` on 127.0.0.1 (a free port chosen by the OS) and FAILS
the test when it cannot: S3 tests that silently skip would leave the S3 backend untested in CI.
``s3_env`` points botocore at it the way a user would (``AWS_*`` variables, for this test
only); ``s3_bucket`` is a fresh bucket per test, emptied and removed after.

``moto_process`` is moto's server in a child process instead, one per test: its memory (moto
keeps every object in the server's process, and loads a whole object for each GET) is not
the test's, and it can be killed mid-transfer and started again on the same port (empty: a
new moto knows no bucket).
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

MOTO_START_TIMEOUT = 60.0


@dataclass
class MotoS3:
    endpoint: str
    server: Any

    def client(self) -> Any:
        """A boto3 client for checking and tampering with what the backend wrote."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # pragma: no cover - the [test] extra installs it
        pytest.fail(f"moto[server] is not installed ({exc}): pip install 'moto[server]>=5'")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    # start() waits for the server with no timeout (for ever if it dies while binding).
    starter = threading.Thread(target=server.start, daemon=True)
    starter.start()
    starter.join(MOTO_START_TIMEOUT)
    if starter.is_alive():
        pytest.fail(f"the moto S3 server did not start within {MOTO_START_TIMEOUT:.0f} s")
    host, port = server.get_host_and_port()
    try:
        yield MotoS3(f"http://{host}:{port}", server)
    finally:
        server.stop()


@pytest.fixture
def s3_env(moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch) -> MotoS3:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in moto_s3.env().items():
        monkeypatch.setenv(name, value)
    return moto_s3


@pytest.fixture
def s3_bucket(s3_env: MotoS3) -> Iterator[str]:
    client = s3_env.client()
    name = f"repro-{uuid.uuid4().hex[:16]}"
    client.create_bucket(Bucket=name)
    yield name
    drop_bucket(client, name)


def drop_bucket(client: Any, name: str) -> None:
    """Empty and remove a bucket (moto keeps objects in memory for the whole session)."""
    for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
        client.abort_multipart_upload(Bucket=name, Key=upload["Key"],
                                      UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


class MotoProcess(MotoS3):
    """``python -m moto.server`` on 127.0.0.1 in a child process (see the module docstring)."""

    def __init__(self, scratch: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        super().__init__(f"http://127.0.0.1:{self.port}", None)
        self.scratch = scratch  # moto's temp files (objects over 5 MB), removed with tmp_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start a server on our port and wait until it answers (FAIL after a minute)."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env={**os.environ, "TMPDIR": str(self.scratch)}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + MOTO_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"moto's server exited at its start (code {self.proc.returncode})")
            try:
                with urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        self.kill()
        pytest.fail(f"moto's server did not answer within {MOTO_START_TIMEOUT:.0f} s")

    def kill(self) -> None:
        """SIGKILL: the server dies mid-request, as a crashed host would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def moto_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MotoProcess]:
    """A started ``MotoProcess`` that botocore in this test (and its children) talks to."""
    server = MotoProcess(tmp_path / "moto-tmp")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
    server.start()
    try:
        yield server
    finally:
        server.kill()
