"""A 5 MiB result through Envoy over gRPC and JSON, and a stream longer than 20 s."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from gateway.kiln_gateway import Envoy
from kiln.common.v1 import artifact_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import channel_to, envoy_for, img2img_json, img2img_request, kiln_server, kinds, sse_event

pytestmark = pytest.mark.asyncio(loop_scope="module")

MiB = 1 << 20
RESULT_BYTES = 5 * MiB


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def large_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KilnServer]:
    root: Path = tmp_path_factory.mktemp("large")
    async with kiln_server(
        "img2img",
        root,
        fake={"steps": 2, "output_bytes": RESULT_BYTES},
        server={"max_message_bytes": 16 * MiB},
        storage={"max_inline_bytes": 16 * MiB},
    ) as server:
        yield server


@pytest.fixture(scope="module")
def large_envoy(large_server: KilnServer) -> Iterator[Envoy]:
    with envoy_for([large_server.port]) as envoy:
        yield envoy


def check_inline_result(events: list[img2img.GenerateResponse]) -> None:
    assert kinds(events)[-1] == "result", kinds(events)
    (artifact,) = events[-1].result.artifacts
    assert len(artifact.inline_data) >= RESULT_BYTES * 0.9
    assert hashlib.sha256(artifact.inline_data).hexdigest() == artifact.sha256


async def test_five_mib_result_over_grpc(large_envoy: Envoy) -> None:
    request = img2img_request(delivery=artifact_pb2.ARTIFACT_DELIVERY_INLINE)
    async with channel_to(large_envoy.port) as channel:
        events = [event async for event in img2img_grpc.Img2ImgProviderStub(channel).Generate(request)]
    check_inline_result(events)


async def test_five_mib_result_over_json(large_envoy: Envoy) -> None:
    events = []
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{large_envoy.port}", timeout=60) as client,
        client.stream("POST", "/v1/img2img:generate", json=img2img_json(delivery="ARTIFACT_DELIVERY_INLINE")) as reply,
    ):
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if (event := sse_event(line)) is not None:
                events.append(event)
    check_inline_result(events)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def slow_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KilnServer]:
    root: Path = tmp_path_factory.mktemp("slow")
    async with kiln_server(
        "img2img", root, fake={"steps": 22, "step_delay_s": 1.0}, runtime={"max_concurrency": 2}
    ) as server:
        yield server


@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_stream_longer_than_20_s_is_not_cut(slow_server: KilnServer) -> None:
    with envoy_for([slow_server.port]) as envoy:

        async def over_grpc() -> list[img2img.GenerateResponse]:
            async with channel_to(envoy.port) as channel:
                return [event async for event in img2img_grpc.Img2ImgProviderStub(channel).Generate(img2img_request())]

        async def over_json() -> list[img2img.GenerateResponse]:
            events = []
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}", timeout=60) as client,
                client.stream("POST", "/v1/img2img:generate", json=img2img_json()) as reply,
            ):
                async for line in reply.aiter_lines():
                    if (event := sse_event(line)) is not None:
                        events.append(event)
            return events

        # Both at once (max_concurrency 2), so the test costs one 22 s run.
        for events in await asyncio.gather(over_grpc(), over_json()):
            assert kinds(events) == ["accepted"] + ["progress"] * 22 + ["result"]


async def test_json_result_over_the_transcoder_limit_is_cut(large_server: KilnServer) -> None:
    """Why max_response_bytes exists: with 1 MiB the 5 MiB result never arrives."""
    events = []
    with envoy_for([large_server.port], max_response_bytes=MiB) as envoy:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}", timeout=60) as client:
            with pytest.raises(httpx.RemoteProtocolError):  # noqa: PT012 - the reset comes mid-read
                async with client.stream(
                    "POST", "/v1/img2img:generate", json=img2img_json(delivery="ARTIFACT_DELIVERY_INLINE")
                ) as reply:
                    async for line in reply.aiter_lines():
                        if (event := sse_event(line)) is not None:
                            events.append(event)
    assert "result" not in kinds(events)
