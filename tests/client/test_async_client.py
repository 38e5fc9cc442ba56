"""The asyncio clients against real servers (fake provider) on free loopback ports."""

from __future__ import annotations

import asyncio
import hashlib
import time

import grpc
import pytest

from kiln_client import (
    AsyncImg2ImgClient,
    AsyncMeshClient,
    DeadlineExceededError,
    InternalError,
    InvalidArgumentError,
    KilnError,
    ResourceExhaustedError,
    _stream,
)
from kiln_runtime.server import KilnServer
from tests.servers import StartServer
from tests.support import png_bytes


def _slots(server: KilnServer) -> tuple[int, int]:
    admission = server.runtime.admission
    return admission.running, admission.queued


async def test_events_arrive_in_order_and_the_result_is_verified(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake={"steps": 3})
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        kinds = [e.WhichOneof("event") async for e in client.generate(png_bytes(), prompt="a fox", seed=3)]
        result = await client.generate_image(png_bytes(), prompt="a fox", seed=3)
        info = await client.get_info()
    assert kinds[0] == "accepted" and kinds[-1] == "result"
    assert kinds.count("progress") >= 3
    assert result.image is not None and hashlib.sha256(result.image).hexdigest() == result.artifact.sha256
    assert result.seed == 3
    assert info.model.provider == "fake"


async def test_mesh_result_is_verified(start_server: StartServer) -> None:
    server, _ = await start_server("mesh", fake={"steps": 2})
    async with AsyncMeshClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        result = await client.generate_mesh(png_bytes(), delivery="CHUNKED")
    assert result.data is not None and len(result.data) == result.artifact.size_bytes
    assert result.media_type == "model/gltf-binary"


async def test_invalid_argument_carries_field_violations(start_server: StartServer) -> None:
    server, _ = await start_server("img2img")
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        with pytest.raises(InvalidArgumentError) as caught:
            await client.generate_image(png_bytes(), prompt="x", strength=1.5)
    assert [field for field, _ in caught.value.field_violations] == ["strength"]
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT


async def test_resource_exhausted_is_retried_after_the_servers_delay(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One slot and no queue: while a job holds the slot the next one is refused with RetryInfo,
    # and the client must wait the delay the server named before it tries again.
    server, _ = await start_server(
        "img2img", fake={"steps": 10, "step_delay_s": 0.05}, runtime={"max_concurrency": 1, "max_queue": 0}
    )
    waits: list[tuple[float | None, float]] = []
    real_delay = _stream._retry_delay

    def recording_delay(error: KilnError, attempt: int) -> float:
        waits.append((error.retry_delay_s, real_delay(error, attempt)))
        return waits[-1][1]

    monkeypatch.setattr(_stream, "_retry_delay", recording_delay)
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        holder = asyncio.create_task(client.generate_image(png_bytes(), prompt="hold the slot"))
        while _slots(server)[0] == 0:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        result = await client.generate_image(png_bytes(), prompt="second", retries=5)
        waited = time.monotonic() - started
        await holder
    assert result.image is not None
    assert waits, "the first attempt should have been refused"
    server_delay, used = waits[0]
    assert server_delay is not None and server_delay > 0
    assert used == pytest.approx(min(server_delay, _stream.MAX_RETRY_DELAY_S))
    assert waited >= used


async def test_retries_zero_surfaces_resource_exhausted_with_the_delay(start_server: StartServer) -> None:
    server, _ = await start_server(
        "img2img", fake={"steps": 40, "step_delay_s": 0.05}, runtime={"max_concurrency": 1, "max_queue": 0}
    )
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        holder = client.generate(png_bytes(), prompt="hold the slot")
        assert (await anext(holder)).WhichOneof("event") == "accepted"
        with pytest.raises(ResourceExhaustedError) as caught:
            await client.generate_image(png_bytes(), prompt="refused", retries=0)
        await holder.aclose()
    assert caught.value.reason == "CAPACITY"
    assert caught.value.retry_delay_s is not None and caught.value.retry_delay_s > 0


async def test_leaving_the_stream_cancels_the_job_and_frees_the_slot(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake={"steps": 200, "step_delay_s": 0.02}, runtime={"max_concurrency": 1})
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        events = client.generate(png_bytes(), prompt="x")
        async for event in events:
            if event.WhichOneof("event") == "progress":
                break
        await events.aclose()
        for _ in range(200):
            if _slots(server) == (0, 0):
                break
            await asyncio.sleep(0.01)
        assert _slots(server) == (0, 0)
    # Cancelled before the result: nothing was stored.
    assert list(server.runtime.store.root.glob("*/*")) == []


async def test_deadline_shorter_than_the_job(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake={"steps": 50, "step_delay_s": 0.05})
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}") as client:
        with pytest.raises(DeadlineExceededError):
            await client.generate_image(png_bytes(), prompt="x", timeout=0.5)


async def test_in_band_failure_names_its_reason(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake={"steps": 5, "fail_at_step": 3})
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        with pytest.raises(InternalError) as caught:
            await client.generate_image(png_bytes(), prompt="x")
    assert caught.value.reason == "PROVIDER_FAILED"
