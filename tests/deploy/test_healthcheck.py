"""`python -m kiln_runtime.healthcheck` (the images' Docker HEALTHCHECK) against real servers."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.dev_ca import issue, make_ca
from kiln_img2img import SERVICE_NAME as IMG2IMG
from kiln_mesh import SERVICE_NAME as MESH
from kiln_runtime import healthcheck
from tests.servers import StartServer


async def run(port: int, service: str, timeout_s: float = 3.0) -> int:
    # The check is a blocking call; the server answers it on this test's event loop.
    args = ["--port", str(port), "--service", service, "--timeout", str(timeout_s)]
    return await asyncio.to_thread(healthcheck.main, args)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_the_module_exits_0_for_a_serving_server(start_server: StartServer) -> None:
    server, _ = await start_server("img2img")
    command = [sys.executable, "-m", "kiln_runtime.healthcheck", "--port", str(server.port), "--service", IMG2IMG]
    process = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, env={**os.environ, "PYTHONWARNINGS": "error"}
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, out
    assert out.decode().strip() == f"127.0.0.1:{server.port} {IMG2IMG}: SERVING"


async def test_serving_names_and_the_whole_server(start_server: StartServer) -> None:
    img2img, _ = await start_server("img2img")
    mesh, _ = await start_server("mesh")
    assert await run(img2img.port, IMG2IMG) == 0
    assert await run(img2img.port, "") == 0  # the liveness probe asks about the whole server
    assert await run(mesh.port, MESH) == 0
    # Each server only knows its own model: a probe with the wrong name must fail.
    assert await run(img2img.port, MESH) == 1
    assert await run(mesh.port, IMG2IMG) == 1


async def test_not_serving_while_the_model_loads(start_server: StartServer) -> None:
    server, _ = await start_server("mesh", wait_ready=False, fake={"load_delay_s": 2.0})
    assert await run(server.port, MESH) == 1
    assert await run(server.port, "") == 1


async def test_not_serving_once_draining(start_server: StartServer) -> None:
    server, _ = await start_server("img2img")
    assert await run(server.port, IMG2IMG) == 0
    await server.runtime.manager.drain()  # what SIGTERM does first
    assert await run(server.port, IMG2IMG) == 1


async def test_nothing_listening_fails_within_the_timeout() -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await run(free_port(), IMG2IMG, timeout_s=1.0) == 1
    assert loop.time() - started < 10


async def test_mutual_tls_server_with_options_from_the_environment(
    start_server: StartServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the Kubernetes TLS component's exec probes run: the files come from KILN_HEALTHCHECK_*.
    ca = make_ca(tmp_path / "pki")
    server_files = issue(ca, tmp_path / "pki", "img2img", hosts=["img2img"])
    client = issue(ca, tmp_path / "pki", "probe", client=True)
    tls = {"tls_cert_file": server_files.cert, "tls_key_file": server_files.key, "tls_client_ca_file": ca.cert}
    server, _ = await start_server("img2img", server=tls)
    assert await run(server.port, IMG2IMG) == 1  # plaintext: refused
    environment = healthcheck.ENVIRONMENT
    monkeypatch.setenv(environment["ca_file"], str(ca.cert))
    monkeypatch.setenv(environment["server_name"], "img2img")  # dialled as 127.0.0.1, verified as img2img
    assert await run(server.port, IMG2IMG) == 1  # TLS, but no client certificate: refused
    monkeypatch.setenv(environment["cert_file"], str(client.cert))
    monkeypatch.setenv(environment["key_file"], str(client.key))
    assert await run(server.port, IMG2IMG) == 0
    assert await run(server.port, "") == 0
    monkeypatch.setenv(environment["server_name"], "mesh")  # a name the certificate does not hold
    assert await run(server.port, IMG2IMG) == 1


def test_a_client_certificate_needs_its_key_and_a_ca(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        healthcheck.main(["--port", "1", "--ca-file", "ca.pem", "--cert-file", "c.pem"])
    assert exited.value.code == 2
    assert "--cert-file and --key-file go together" in capsys.readouterr().err
