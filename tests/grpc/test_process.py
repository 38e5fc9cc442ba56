"""The server as a real process: SIGTERM drains an in-flight stream, then the process exits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_img2img import SERVICE_NAME
from tests.support import png_bytes


async def start_process(tmp_path: Path, **env: str) -> tuple[asyncio.subprocess.Process, int]:
    """Start `python -m kiln_img2img` on a free port; return it once it logs its port."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    environment = {
        **os.environ,
        "KILN_STORAGE__DATA_DIR": str(tmp_path),
        "KILN_IMG2IMG__PROVIDER": "fake",
        "KILN_IMG2IMG__SERVER__PORT": "0",
        "KILN_IMG2IMG__SERVER__METRICS_PORT": "0",
        "KILN_TELEMETRY__LOG_FORMAT": "json",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kiln_img2img", env=environment, cwd=tmp_path, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    async with asyncio.timeout(30):
        while True:
            line = await process.stderr.readline()
            if not line:
                raise AssertionError(f"server exited early with {await process.wait()}")
            record = json.loads(line)
            if "serving on" in record["message"]:
                return process, int(record["message"].split(":")[1].split()[0])


@pytest.fixture
async def server_process(tmp_path: Path) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    process, port = await start_process(
        tmp_path,
        KILN_IMG2IMG__FAKE__STEPS="10",
        KILN_IMG2IMG__FAKE__STEP_DELAY_S="0.2",
        KILN_IMG2IMG__SERVER__SHUTDOWN_GRACE_S="20",
    )
    yield process, port
    if process.returncode is None:
        process.kill()
        await process.wait()


async def test_sigterm_drains_in_flight_stream(server_process: tuple[asyncio.subprocess.Process, int]) -> None:
    process, port = server_process
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=10)
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        while (await watch.read()).status != health_pb2.HealthCheckResponse.SERVING:
            pass
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        request = img2img.GenerateRequest(
            image=png_bytes(),
            prompt="drain me",
            scheduler=img2img.SCHEDULER_DDIM,
            output_format=img2img.IMAGE_FORMAT_PNG,
        )
        call = stub.Generate(request)
        assert (await call.read()).WhichOneof("event") == "accepted"
        assert (await call.read()).WhichOneof("event") == "progress"

        process.send_signal(signal.SIGTERM)
        # Health flips to NOT_SERVING first, while the stream is still running.
        status = await asyncio.wait_for(watch.read(), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING

        events = []
        while (event := await call.read()) is not grpc.aio.EOF:
            events.append(event)
        assert events[-1].WhichOneof("event") == "result"
        assert [e.progress.step for e in events if e.WhichOneof("event") == "progress"][-1] == 10
        assert await call.code() == grpc.StatusCode.OK

    assert await asyncio.wait_for(process.wait(), timeout=20) == 0


async def test_port_in_use_fails_to_start(tmp_path: Path) -> None:
    first, port = await start_process(tmp_path / "a")
    try:
        environment = {
            **os.environ,
            "KILN_STORAGE__DATA_DIR": str(tmp_path / "b"),
            "KILN_IMG2IMG__PROVIDER": "fake",
            "KILN_IMG2IMG__SERVER__PORT": str(port),
            "KILN_IMG2IMG__SERVER__METRICS_ENABLED": "false",
        }
        second = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kiln_img2img", env=environment, stderr=asyncio.subprocess.PIPE
        )
        _, stderr = await asyncio.wait_for(second.communicate(), timeout=30)
        assert second.returncode == 2
        assert b"bind" in stderr
    finally:
        first.terminate()
        await first.wait()


async def test_unavailable_device_is_a_startup_error(tmp_path: Path) -> None:
    environment = {
        **os.environ,
        "KILN_STORAGE__DATA_DIR": str(tmp_path),
        "KILN_IMG2IMG__PROVIDER": "local",
        "KILN_IMG2IMG__SERVER__PORT": "0",
        "KILN_IMG2IMG__SERVER__METRICS_ENABLED": "false",
        "KILN_IMG2IMG__RUNTIME__DEVICE": "cuda",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kiln_img2img", env=environment, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 2
    assert b"KILN_IMG2IMG__RUNTIME__DEVICE" in stderr
    assert b"serving on" not in stderr
