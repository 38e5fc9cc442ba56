"""Photo-sized inputs through a real Envoy on all three protocols, and refusals above the limit.

A 10 MiB JPEG gives a result over gRPC, gRPC-Web and JSON/SSE; a 25 MiB one is refused with
INVALID_ARGUMENT (HTTP 400 on the REST path) naming `image` and the limit, reaching the server
exactly once (Envoy's `upstream_rq_total`) and never retried (`upstream_rq_retry`). A JSON body
beyond Envoy's own limit gets Envoy's 413 in the same JSON shape, and never reaches a server.
The servers keep the default limit (20 MiB): the derived caps are what these sizes cross.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from gateway.kiln_gateway import Envoy
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_client.limits import DEFAULT_MAX_IMAGE_BYTES, max_json_request_bytes
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import (
    bad_request_violations,
    channel_to,
    envoy_running,
    img2img_json,
    img2img_request,
    kiln_server,
    kinds,
    sse_event,
    upstream_requests,
)
from tests.gateway.grpc_web import GrpcWebCall, GrpcWebError, collect
from tests.photos import MiB, photo_jpeg

pytestmark = pytest.mark.asyncio(loop_scope="module")

LIMIT = DEFAULT_MAX_IMAGE_BYTES
GENERATE = "/kiln.img2img.v1.Img2ImgProvider/Generate"


@dataclass
class Stack:
    server: KilnServer
    envoy: Envoy

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.envoy.port}", timeout=120)

    def counters(self) -> tuple[int, int]:
        """(requests sent upstream, retries) of the img2img cluster."""
        return upstream_requests(self.envoy, "img2img"), envoy_counter(self.envoy, "cluster.img2img.upstream_rq_retry")


def envoy_counter(envoy: Envoy, name: str) -> int:
    for line in envoy.admin(f"/stats?filter=^{re.escape(name)}$").splitlines():
        stat, _, value = line.partition(": ")
        if stat == name:
            return int(value)
    return 0


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    async with (
        kiln_server("img2img", tmp_path_factory.mktemp("limits"), fake={"steps": 2}) as server,
        envoy_running([server.port]) as envoy,
    ):
        yield Stack(server, envoy)


@pytest.fixture(scope="module")
def ten_mib() -> bytes:
    return photo_jpeg(10 * MiB)


@pytest.fixture(scope="module")
def twenty_five_mib() -> bytes:
    return photo_jpeg(25 * MiB)


def image_violation(status: Any) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}["image"]
    raise AssertionError(f"no BadRequest in {status}")


def assert_names_the_limit(description: str, size: int) -> None:
    assert f"is {size} bytes" in description and f"{LIMIT} allowed (20 MiB)" in description, description


async def test_ten_mib_over_grpc(stack: Stack, ten_mib: bytes) -> None:
    async with channel_to(stack.envoy.port) as channel:
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        events = [event async for event in stub.Generate(img2img_request(image=ten_mib))]
    assert kinds(events)[-1] == "result", kinds(events)


async def test_ten_mib_over_grpc_web(stack: Stack, ten_mib: bytes) -> None:
    async with stack.http() as client:
        events = await collect(GrpcWebCall(client, GENERATE, img2img_request(image=ten_mib), img2img.GenerateResponse))
    assert kinds(events)[-1] == "result", kinds(events)


async def test_ten_mib_over_json_sse(stack: Stack, ten_mib: bytes) -> None:
    body = img2img_json(image=base64.b64encode(ten_mib).decode())
    async with stack.http() as client, client.stream("POST", "/v1/img2img:generate", json=body) as response:
        assert response.status_code == 200, await response.aread()
        events = [event async for line in response.aiter_lines() if (event := sse_event(line)) is not None]
    assert kinds(events)[-1] == "result", kinds(events)


async def test_25_mib_over_grpc_is_refused_by_name_once(stack: Stack, twenty_five_mib: bytes) -> None:
    sent, retried = stack.counters()
    async with channel_to(stack.envoy.port) as channel:
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [event async for event in stub.Generate(img2img_request(image=twenty_five_mib))]
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    assert_names_the_limit(image_violation(rpc_status.from_call(raised.value)), len(twenty_five_mib))  # type: ignore[arg-type]
    assert stack.counters() == (sent + 1, retried)


async def test_25_mib_over_grpc_web_is_refused_by_name_once(stack: Stack, twenty_five_mib: bytes) -> None:
    sent, retried = stack.counters()
    async with stack.http() as client:
        call = GrpcWebCall(client, GENERATE, img2img_request(image=twenty_five_mib), img2img.GenerateResponse)
        with pytest.raises(GrpcWebError) as raised:
            await collect(call)
    assert raised.value.code == code_pb2.INVALID_ARGUMENT, raised.value
    assert_names_the_limit(image_violation(raised.value.status), len(twenty_five_mib))
    assert stack.counters() == (sent + 1, retried)


async def test_25_mib_over_json_is_400_by_name_once(stack: Stack, twenty_five_mib: bytes) -> None:
    sent, retried = stack.counters()
    body = img2img_json(image=base64.b64encode(twenty_five_mib).decode())
    async with stack.http() as client:
        response = await client.post("/v1/img2img:generate", json=body)
    assert response.status_code == 400, response.text[:500]
    answer = response.json()
    assert answer["code"] == code_pb2.INVALID_ARGUMENT
    (violation,) = bad_request_violations(answer)
    assert violation["field"] == "image"
    assert_names_the_limit(violation["description"], len(twenty_five_mib))
    assert stack.counters() == (sent + 1, retried)


async def test_a_json_body_over_envoys_limit_is_413_naming_image(stack: Stack) -> None:
    """Envoy's own refusal: same JSON shape as the server's, the limit stated, no upstream request."""
    small_limit = 1 * MiB  # a gateway configured for 1 MiB images; its JSON cap is a few MiB
    async with envoy_running([stack.server.port], max_image_bytes=small_limit) as envoy:
        sent = upstream_requests(envoy, "img2img")
        too_big = base64.b64encode(bytes(max_json_request_bytes(small_limit))).decode()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}", timeout=60) as client:
            response = await client.post("/v1/img2img:generate", json=img2img_json(image=too_big))
            assert response.status_code == 413, response.text[:500]
            answer = json.loads(response.text)
            assert upstream_requests(envoy, "img2img") == sent
            # Below the cap the same gateway passes the request on, and the server decides.
            fits = base64.b64encode(photo_jpeg(2 * MiB)).decode()
            accepted = await client.post("/v1/img2img:generate", json=img2img_json(image=fits))
            assert accepted.status_code == 200, accepted.text[:500]
    assert answer["code"] == code_pb2.INVALID_ARGUMENT
    (violation,) = bad_request_violations(answer)
    assert violation["field"] == "image"
    assert f"images up to {small_limit} bytes (1 MiB)" in violation["description"]
    assert answer["message"].startswith("invalid request: image: ")


async def test_a_photo_sized_request_refused_for_capacity_is_retried_on_another_replica(
    tmp_path_factory: pytest.TempPathFactory, ten_mib: bytes
) -> None:
    """The retry buffer holds a request within the limit, so a 10 MiB upload is replayed, not lost."""
    root = tmp_path_factory.mktemp("retry")
    runtime = {"max_concurrency": 1, "max_queue": 0}
    async with (
        kiln_server("img2img", root / "a", fake={"steps": 400, "step_delay_s": 0.1}, runtime=runtime) as full,
        kiln_server("img2img", root / "b", fake={"steps": 2}, runtime=runtime) as free,
        channel_to(full.port) as direct,
        envoy_running([full.port, free.port]) as envoy,
    ):
        # Keep the first replica's only slot busy with a request that bypasses Envoy.
        busy = img2img_grpc.Img2ImgProviderStub(direct).Generate(img2img_request())
        assert (await busy.read()).WhichOneof("event") == "accepted"  # type: ignore[union-attr]
        try:
            done = retries = 0
            async with (
                channel_to(envoy.port) as channel,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}", timeout=120) as http,
            ):
                stub = img2img_grpc.Img2ImgProviderStub(channel)
                json_body = img2img_json(image=base64.b64encode(ten_mib).decode())
                # Least-request picks the full replica about half the time; go on until both
                # protocols have been retried at least once.
                while done < 30 and (done < 4 or retries < 2):
                    events = [event async for event in stub.Generate(img2img_request(image=ten_mib))]
                    assert kinds(events)[-1] == "result", kinds(events)
                    response = await http.post("/v1/img2img:generate", json=json_body)
                    assert response.status_code == 200 and '"result"' in response.text, response.text[:300]
                    done += 2
                    retries = envoy_counter(envoy, "cluster.img2img.upstream_rq_retry")
            abandoned_stat = "cluster.img2img.retry_or_shadow_abandoned"
            assert abandoned_stat in envoy.admin("/stats?filter=retry_or_shadow_abandoned")
            abandoned = envoy_counter(envoy, abandoned_stat)
        finally:
            busy.cancel()
    assert retries >= 2, (done, retries)
    assert abandoned == 0  # no body was too large to keep for a retry
