"""`make up` / `make down` through deploy/local_stack.py: both servers SERVING, nothing left behind."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def envoy_processes() -> list[int]:
    """Envoy processes running with make up's config (its state folder is in the command line)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"envoy" in cmdline and str(ROOT / ".kiln" / "gateway").encode() in cmdline:
            found.append(int(proc.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def banner(launcher: subprocess.Popen[str]) -> str:
    """What `make up` printed up to its "Try:" line (printed once the stack serves)."""
    assert launcher.stdout is not None
    lines = []
    for line in launcher.stdout:
        lines.append(line)
        if line.startswith("Try:"):
            break
    return "".join(lines)


@pytest.mark.parametrize("profile", ["fake", "tiny"])
def test_up_then_down_leaves_no_process(tmp_path: Path, profile: str) -> None:
    # "fake": both servers on the fake provider; "tiny": KILN_PROFILE=tiny runs img2img on the tiny SD model.
    fake = {"KILN_IMG2IMG__PROVIDER": "fake", "KILN_MESH__PROVIDER": "fake"}
    gateway_port = free_port()
    chosen = {"KILN_PROFILE": "tiny"} if profile == "tiny" else fake
    env = {
        **os.environ,
        **chosen,
        "KILN_STORAGE__DATA_DIR": str(tmp_path / "data"),
        "KILN_IMG2IMG__SERVER__PORT": str(free_port()),
        "KILN_IMG2IMG__SERVER__METRICS_PORT": str(free_port()),
        "KILN_MESH__SERVER__PORT": str(free_port()),
        "KILN_MESH__SERVER__METRICS_PORT": str(free_port()),
        "KILN_GATEWAY__PORT": str(gateway_port),
        "KILN_GATEWAY__ADMIN_PORT": str(free_port()),
    }
    launcher = subprocess.Popen(
        [sys.executable, "deploy/local_stack.py", "up"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        output = banner(launcher)
        assert output.count("SERVING") == 2, output
        assert ("tiny models" in output) is (profile == "tiny")
        assert f"http://127.0.0.1:{gateway_port}/" in output
        assert f"auth: none — anyone who can reach 127.0.0.1:{gateway_port} may run jobs" in output
        # The servers share one signing key, kept private to this user.
        assert (ROOT / ".kiln" / "url-signing-key").stat().st_mode & 0o777 == 0o600
        # The whole path answers through the gateway: JSON transcoding of GetInfo, and the page.
        info = httpx.get(f"http://127.0.0.1:{gateway_port}/v1/img2img/info", timeout=10).json()
        assert info["model"]["readiness"] == "READINESS_READY"
        assert "<h1>Kiln</h1>" in httpx.get(f"http://127.0.0.1:{gateway_port}/", timeout=10).text
        run_dir = ROOT / ".kiln" / "run"
        pids = [int(p.read_text()) for p in run_dir.glob("*.pid")]
        assert len(pids) == 4 and all(alive(pid) for pid in pids)

        down = subprocess.run(
            [sys.executable, "deploy/local_stack.py", "down"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert down.returncode == 0, down.stderr
        assert launcher.wait(timeout=60) == 0
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in pids)
        assert not envoy_processes(), "an Envoy started by make up outlived make down"
        assert not list(run_dir.glob("*.pid"))
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)
            launcher.wait(timeout=60)
        if launcher.stdout is not None:
            launcher.stdout.close()


def stack_env(tmp_path: Path, gateway_port: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "KILN_IMG2IMG__PROVIDER": "fake",
        "KILN_MESH__PROVIDER": "fake",
        "KILN_STORAGE__DATA_DIR": str(tmp_path / "data"),
        "KILN_IMG2IMG__SERVER__PORT": str(free_port()),
        "KILN_IMG2IMG__SERVER__METRICS_PORT": str(free_port()),
        "KILN_MESH__SERVER__PORT": str(free_port()),
        "KILN_MESH__SERVER__METRICS_PORT": str(free_port()),
        "KILN_GATEWAY__PORT": str(gateway_port),
        "KILN_GATEWAY__ADMIN_PORT": str(free_port()),
        **extra,
    }


def test_tls_dev_serves_https_and_mutual_tls(tmp_path: Path) -> None:
    gateway_port = free_port()
    env = stack_env(tmp_path, gateway_port, KILN_TLS="dev")
    launcher = subprocess.Popen(
        [sys.executable, "deploy/local_stack.py", "up"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    tls = ROOT / ".kiln" / "tls"
    try:
        output = banner(launcher)
        assert output.count("SERVING") == 2, output
        assert f"gateway  https://127.0.0.1:{gateway_port}" in output, output
        assert "update-ca-certificates" in output and "--cacert .kiln/tls/ca.pem" in output
        ca = str(tls / "ca.pem")
        for name in ("ca", "gateway", "servers", "gateway-client"):
            assert (tls / f"{name}.key").stat().st_mode & 0o777 == 0o600
        # HTTPS with the development CA, through the gateway's mutual TLS to the server.
        with httpx.Client(verify=ssl.create_default_context(cafile=ca), timeout=10) as client:
            info = client.get(f"https://127.0.0.1:{gateway_port}/v1/img2img/info").json()
        assert info["model"]["readiness"] == "READINESS_READY"
        # A server's port refuses a client that is not the gateway: no client certificate.
        port = env["KILN_IMG2IMG__SERVER__PORT"]
        with grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(Path(ca).read_bytes())) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError):
                health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        down = subprocess.run(
            [sys.executable, "deploy/local_stack.py", "down"], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert down.returncode == 0, down.stderr
        assert launcher.wait(timeout=60) == 0
    finally:
        if launcher.poll() is None:
            launcher.send_signal(signal.SIGINT)
            launcher.wait(timeout=60)
        if launcher.stdout is not None:
            launcher.stdout.close()
