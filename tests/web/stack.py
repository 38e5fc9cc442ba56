"""The whole Kiln stack as real processes for the browser tests: both model servers on the tiny
models, Envoy in front of them serving a freshly built page.

Everything runs as separate processes, like `make up` with `KILN_PROFILE=tiny`, so the tests
themselves stay synchronous (Playwright's sync API refuses to run inside an event loop, and
grpc.aio servers would need one). Ports are 0 everywhere: each server logs the ports it bound,
Envoy reports its own, so nothing races for a "free" port.

`python -m tests.web.stack` runs the same stack in the foreground, for trying the page by hand.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.local_stack import tiny_profile
from gateway.kiln_gateway import Envoy, GatewaySettings

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "clients" / "web"
READY_TIMEOUT_S = 90.0
#: "kiln.img2img.v1.Img2ImgProvider serving on 127.0.0.1:40123, plaintext (metrics on 40124)"; the
#: transport word ("plaintext", "TLS", ...) is optional so older logs still match.
SERVING_LINE = re.compile(
    r"(?P<service>kiln\.\w+\.v1\.\w+) serving on [^\s,]+:(?P<port>\d+)(?:, [^(]*)? \(metrics on (?P<metrics>\d+)\)"
)


class StackError(RuntimeError):
    """A server or the page build failed; the message carries the log tail."""


@dataclass
class ServerProcess:
    """One model server process and the ports it bound."""

    name: str
    service: str
    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    metrics_port: int = 0

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-chars:]
        return ""

    def metrics(self) -> str:
        """The Prometheus text exposition of this server."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text: str = response.read().decode()
            return text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when there are none)."""
        total = 0.0
        for line in self.metrics().splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            sample, _, value = line.rpartition(" ")
            metric_name, _, label_text = sample.partition("{")
            if metric_name != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
            if all(found.get(key) == wanted for key, wanted in labels.items()):
                total += float(value)
        return total


@dataclass
class Stack:
    """The running stack: servers, Envoy, and where artifacts are stored."""

    img2img: ServerProcess
    mesh: ServerProcess
    envoy: Envoy
    data_dir: Path
    web_root: Path
    extra: dict[str, str] = field(default_factory=dict)
    #: "https" when the gateway was given a certificate (its listener then speaks TLS only).
    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.envoy.port}/"

    @property
    def output_dir(self) -> Path:
        return self.data_dir / "outputs"


def build_page(out_dir: Path) -> Path:
    """Bundle clients/web into `out_dir` (esbuild, well under a second) so tests see current sources."""
    if not (WEB / "node_modules").is_dir():
        raise StackError("clients/web/node_modules is missing; run `make web` (npm ci in clients/web) first")
    result = subprocess.run(
        ["node", "build.mjs", "--outdir", str(out_dir)],
        cwd=WEB,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise StackError(f"building the page failed:\n{result.stdout}{result.stderr}")
    for name in ("index.html", "app.js", "app.css"):
        if not (out_dir / name).is_file():
            raise StackError(f"the build wrote no {name} into {out_dir}")
    return out_dir


def tiny_environment(data_dir: Path, **overrides: str) -> dict[str, str]:
    """The environment `make up` uses with KILN_PROFILE=tiny, on ports chosen by the kernel."""
    env = {
        key: value
        for key, value in os.environ.items()
        # The caller's own KILN_ settings (a .env for `make up`) must not leak into the test stack.
        if not key.startswith("KILN_")
    }
    env.update(tiny_profile())  # the models of `KILN_PROFILE=tiny make up`
    env.update(
        {
            "OMP_WAIT_POLICY": "PASSIVE",
            "OMP_NUM_THREADS": "1",
            "KILN_STORAGE__DATA_DIR": str(data_dir),
            "KILN_TELEMETRY__LOG_FORMAT": "text",
            "KILN_IMG2IMG__RUNTIME__DEVICE": "cpu",
            "KILN_IMG2IMG__SERVER__PORT": "0",
            "KILN_IMG2IMG__SERVER__METRICS_PORT": "0",
            "KILN_MESH__RUNTIME__DEVICE": "cpu",
            "KILN_MESH__SERVER__PORT": "0",
            "KILN_MESH__SERVER__METRICS_PORT": "0",
        }
    )
    env.update(overrides)
    return env


def _start_server(name: str, service: str, env: dict[str, str], log_dir: Path) -> ServerProcess:
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", f"kiln_{name}"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return ServerProcess(name, service, process, log_path)


def _wait_serving(server: ServerProcess, deadline: float) -> None:
    """Wait for the bound ports in the log, then for SERVING on grpc.health.v1."""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise StackError(f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}")
        if not server.port:
            match = SERVING_LINE.search(server.log_tail(100_000))
            if match:
                server.port, server.metrics_port = int(match["port"]), int(match["metrics"])
        if server.port:
            request = health_pb2.HealthCheckRequest(service=server.service)
            with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel, contextlib.suppress(grpc.RpcError):
                status = health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
        time.sleep(0.2)
    raise StackError(f"{server.name} not SERVING after {READY_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def _stop(servers: list[ServerProcess]) -> None:
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
    for server in servers:
        try:
            server.process.wait(15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


@contextlib.contextmanager
def running_stack(work_dir: Path, gateway: Mapping[str, Any] | None = None, **overrides: str) -> Iterator[Stack]:
    """Build the page, start both servers and Envoy; stop everything on exit.

    Args:
        work_dir: Holds the page build, the artifact storage and the server logs.
        gateway: Extra GatewaySettings fields (e.g. `auth`, `tls` sections as dicts); none by default.
        **overrides: Extra KILN_... environment for both servers (e.g. admission limits).

    Yields:
        The running stack.
    """
    web_root = build_page(work_dir / "web")
    data_dir = work_dir / "data"
    log_dir = work_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = tiny_environment(data_dir, **overrides)
    servers = [
        _start_server("img2img", "kiln.img2img.v1.Img2ImgProvider", env, log_dir),
        _start_server("mesh", "kiln.mesh.v1.MeshProvider", env, log_dir),
    ]
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for server in servers:
            _wait_serving(server, deadline)
        settings = GatewaySettings(
            _env_file=None,
            port=0,
            admin_port=0,
            img2img_upstreams=[f"127.0.0.1:{servers[0].port}"],
            mesh_upstreams=[f"127.0.0.1:{servers[1].port}"],
            web_root=web_root,
            access_log=False,
            **(gateway or {}),
        )
        scheme = "https" if settings.tls.cert_file is not None else "http"
        with Envoy(settings) as envoy:
            yield Stack(servers[0], servers[1], envoy, data_dir, web_root, overrides, scheme)
    finally:
        _stop(servers)


def main() -> int:
    """Run the test stack in the foreground until Ctrl-C (the page on the printed URL)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kiln-web-") as tmp, running_stack(Path(tmp)) as stack:
        print(f"page: {stack.url}   (img2img :{stack.img2img.port}, mesh :{stack.mesh.port}); Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while stack.img2img.process.poll() is None and stack.mesh.process.poll() is None:
                time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
