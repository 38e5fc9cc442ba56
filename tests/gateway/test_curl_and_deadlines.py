"""curl -N against the JSON route (the real client people debug with), and deadlines through Envoy."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from gateway.kiln_gateway import Envoy
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from tests.gateway.conftest import channel_to, envoy_running, img2img_json, img2img_request, kiln_server, sse_event

pytestmark = pytest.mark.asyncio(loop_scope="module")
STEPS, STEP_DELAY_S = 5, 0.4


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def envoy(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Envoy]:
    fake = {"steps": STEPS, "step_delay_s": STEP_DELAY_S}
    async with (
        kiln_server("img2img", tmp_path_factory.mktemp("curl") / "img2img", fake=fake) as server,
        envoy_running([server.port], [server.port]) as running,
    ):
        yield running


async def test_curl_receives_sse_events_incrementally(envoy: Envoy) -> None:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-N", "--max-time", "60", "-X", "POST",
        f"http://127.0.0.1:{envoy.port}/v1/img2img:generate",
        "-H", "content-type: application/json", "-d", json.dumps(img2img_json()),
        stdout=asyncio.subprocess.PIPE, limit=1 << 24,  # the result line carries the image
    )  # fmt: skip
    assert process.stdout is not None
    started = time.perf_counter()
    arrivals: list[tuple[float, str]] = []
    while line := await process.stdout.readline():
        event = sse_event(line.decode())
        if event is not None:
            arrivals.append((time.perf_counter() - started, event.WhichOneof("event") or ""))
    assert await process.wait() == 0
    kinds = [kind for _, kind in arrivals]
    assert kinds[0] == "accepted" and kinds[-1] == "result" and kinds.count("progress") == STEPS
    first_at, last_at = arrivals[0][0], arrivals[-1][0]
    # The first event is not held back until the end: curl prints it while the job still runs.
    assert last_at - first_at > (STEPS - 1) * STEP_DELAY_S * 0.8


async def test_client_deadline_through_envoy_is_deadline_exceeded(envoy: Envoy) -> None:
    async with channel_to(envoy.port) as channel:
        call = img2img_grpc.Img2ImgProviderStub(channel).Generate(img2img_request(), timeout=0.6)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in call:
                pass
    # Not INTERNAL: Envoy forwards grpc-timeout and the server enforces it.
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
