"""The sync clients against real servers with the fake provider.

The sync client blocks, so it runs in a worker thread while the server runs on the test's loop.
"""

from __future__ import annotations

import asyncio
import hashlib

import grpc
import pytest

from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_client import (
    DeadlineExceededError,
    Img2ImgClient,
    InternalError,
    MeshClient,
    ResourceExhaustedError,
)
from tests.servers import StartServer
from tests.support import png_bytes


async def test_generate_image_returns_verified_bytes(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake={"steps": 3})
    with Img2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        result = await asyncio.to_thread(client.generate_image, png_bytes(), prompt="a red fox", seed=11)
        info = await asyncio.to_thread(client.get_info)
    assert result.image is not None
    assert hashlib.sha256(result.image).hexdigest() == result.result.artifacts[0].sha256
    assert result.media_type == "image/png"
    assert result.seed == 11
    assert result.width > 0 and result.height > 0
    assert info.model.provider == "fake"


async def test_chunked_delivery_from_a_real_server(start_server: StartServer) -> None:
    server, _ = await start_server(
        "img2img", fake={"steps": 2, "output_bytes": 300_000}, server={"max_message_bytes": 128 * 1024}
    )
    with Img2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        events = await asyncio.to_thread(lambda: list(client.generate(png_bytes(), prompt="x", delivery="CHUNKED")))
        result = await asyncio.to_thread(client.generate_image, png_bytes(), prompt="x", delivery="CHUNKED")
    assert sum(e.WhichOneof("event") == "chunk" for e in events) > 1
    assert result.image is not None and len(result.image) == result.result.artifacts[0].size_bytes
    assert hashlib.sha256(result.image).hexdigest() == result.result.artifacts[0].sha256


async def test_queue_full_raises_resource_exhausted_with_retry_delay(start_server: StartServer) -> None:
    server, channel = await start_server(
        "img2img", fake={"steps": 40, "step_delay_s": 0.05}, runtime={"max_concurrency": 1, "max_queue": 0}
    )
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    busy = stub.Generate(
        img2img.GenerateRequest(
            image=png_bytes(),
            prompt="hold the slot",
            scheduler=img2img.SCHEDULER_EULER,
            output_format=img2img.IMAGE_FORMAT_PNG,
        )
    )
    first = await busy.read()
    assert first.WhichOneof("event") == "accepted"
    try:
        with (
            Img2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client,
            pytest.raises(ResourceExhaustedError) as caught,
        ):
            await asyncio.to_thread(client.generate_image, png_bytes(), prompt="x", retries=0)
    finally:
        busy.cancel()
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.reason == "CAPACITY"
    assert caught.value.retry_delay_s is not None and caught.value.retry_delay_s > 0


async def test_deadline_shorter_than_the_job(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake={"steps": 50, "step_delay_s": 0.05})
    with Img2ImgClient(f"127.0.0.1:{server.port}") as client, pytest.raises(DeadlineExceededError):
        await asyncio.to_thread(client.generate_image, png_bytes(), prompt="x", timeout=0.5)


async def test_provider_failure_surfaces_the_in_band_reason(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake={"steps": 5, "fail_at_step": 3})
    with Img2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client, pytest.raises(InternalError) as caught:
        await asyncio.to_thread(client.generate_image, png_bytes(), prompt="x")
    assert caught.value.reason == "PROVIDER_FAILED"
    assert caught.value.domain == "img2img.kiln.dev"


async def test_generate_mesh_returns_verified_bytes(start_server: StartServer) -> None:
    server, _ = await start_server("mesh", fake={"steps": 2})
    with MeshClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        result = await asyncio.to_thread(client.generate_mesh, png_bytes(), output_format="GLB")
    assert result.data is not None
    assert hashlib.sha256(result.data).hexdigest() == result.result.artifacts[0].sha256
    assert result.media_type == "model/gltf-binary"
    assert result.vertex_count > 0 and result.face_count > 0
