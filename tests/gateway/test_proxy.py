"""gRPC, JSON+SSE and CORS through a real Envoy to real servers (fake provider).

One slow img2img server (5 steps x 0.3 s; prompts containing FAIL fail at step 2) and one
mesh server, behind one Envoy, for the whole module.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format
from google.rpc import code_pb2

from gateway.kiln_gateway import Envoy
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln.mesh.v1 import mesh_service_pb2 as mesh
from kiln.mesh.v1 import mesh_service_pb2_grpc as mesh_grpc
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import (
    bad_request_violations,
    channel_to,
    envoy_for,
    img2img_json,
    img2img_request,
    kiln_server,
    kinds,
    mesh_request,
    requests_total,
    sse_event,
    upstream_requests,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALLOWED = "http://127.0.0.1:8081"
STEPS = 5
STEP_DELAY_S = 0.3


@dataclass
class Stack:
    img2img: KilnServer
    mesh: KilnServer
    envoy: Envoy

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.envoy.port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[KilnServer, KilnServer]]:
    root: Path = tmp_path_factory.mktemp("proxy")
    fake = {"steps": STEPS, "step_delay_s": STEP_DELAY_S, "fail_when_prompt_contains": "FAIL", "fail_at_step": 2}
    async with (
        kiln_server("img2img", root / "img2img", fake=fake) as img2img_server,
        kiln_server("mesh", root / "mesh", fake={"steps": 3}) as mesh_server,
    ):
        yield img2img_server, mesh_server


@pytest.fixture(scope="module")
def stack(servers: tuple[KilnServer, KilnServer]) -> Iterator[Stack]:
    img2img_server, mesh_server = servers
    with envoy_for([img2img_server.port], [mesh_server.port], cors_allowed_origins=[ALLOWED]) as envoy:
        yield Stack(img2img_server, mesh_server, envoy)


def comparable(event: img2img.GenerateResponse | mesh.GenerateResponse) -> dict[str, object]:
    """An event without what differs between two runs of the same request (ids, times, paths)."""
    data = json_format.MessageToDict(event)
    for value in data.values():
        if isinstance(value, dict):
            for key in ("jobId", "timings", "eta"):
                value.pop(key, None)
            for artifact in value.get("artifacts", []):
                for key in ("id", "uri"):
                    artifact.pop(key, None)
    return data


async def generate_both(stack: Stack, kind: str) -> tuple[list[object], list[object]]:
    server = stack.img2img if kind == "img2img" else stack.mesh
    results = []
    for port in (server.port, stack.envoy.port):
        async with channel_to(port) as channel:
            if kind == "img2img":
                call = img2img_grpc.Img2ImgProviderStub(channel).Generate(img2img_request())
            else:
                call = mesh_grpc.MeshProviderStub(channel).Generate(mesh_request())
            results.append([event async for event in call])
    direct, via_envoy = results
    return direct, via_envoy


async def test_grpc_img2img_generate_matches_direct(stack: Stack) -> None:
    direct, via_envoy = await generate_both(stack, "img2img")
    assert kinds(via_envoy) == kinds(direct) == ["accepted"] + ["progress"] * STEPS + ["result"]
    assert [comparable(e) for e in via_envoy] == [comparable(e) for e in direct]  # type: ignore[arg-type]
    assert via_envoy[-1].result.artifacts[0].inline_data  # type: ignore[attr-defined]


async def test_grpc_mesh_generate_matches_direct(stack: Stack) -> None:
    direct, via_envoy = await generate_both(stack, "mesh")
    assert kinds(via_envoy) == kinds(direct)
    assert kinds(via_envoy)[0] == "accepted" and kinds(via_envoy)[-1] == "result"
    assert [comparable(e) for e in via_envoy] == [comparable(e) for e in direct]  # type: ignore[arg-type]


async def test_grpc_get_info_matches_direct(stack: Stack) -> None:
    for server, stub_type, request in (
        (stack.img2img, img2img_grpc.Img2ImgProviderStub, img2img.GetInfoRequest()),
        (stack.mesh, mesh_grpc.MeshProviderStub, mesh.GetInfoRequest()),
    ):
        answers = []
        for port in (server.port, stack.envoy.port):
            async with channel_to(port) as channel:
                answers.append(await stub_type(channel).GetInfo(request))
        assert answers[0] == answers[1]
        assert answers[1].model.provider == "fake"


async def test_json_get_info(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
        for path, service in (("/v1/img2img/info", img2img), ("/v1/mesh/info", mesh)):
            response = await client.get(path)
            assert response.status_code == 200, response.text
            info = json_format.Parse(response.text, service.GetInfoResponse())
            assert info.model.provider == "fake"


async def test_json_sse_stream_is_incremental(stack: Stack) -> None:
    arrivals: list[tuple[float, img2img.GenerateResponse]] = []
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        start = time.monotonic()
        async with client.stream("POST", "/v1/img2img:generate", json=img2img_json()) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                if (event := sse_event(line)) is not None:
                    arrivals.append((time.monotonic() - start, event))
    events = [event for _, event in arrivals]
    assert kinds(events) == ["accepted"] + ["progress"] * STEPS + ["result"]
    first, last = arrivals[0][0], arrivals[-1][0]
    # The run takes STEPS x STEP_DELAY_S = 1.5 s; buffered delivery would bring everything at once.
    assert last - first > (STEPS - 1) * STEP_DELAY_S, [round(t, 2) for t, _ in arrivals]
    assert first < 1.0
    result = events[-1].result
    assert result.parameters.seed == 7 and result.artifacts[0].inline_data.startswith(b"\x89PNG")


async def test_json_invalid_argument_is_http_400_with_field_violations(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
        response = await client.post("/v1/img2img:generate", json=img2img_json(scheduler="SCHEDULER_UNSPECIFIED"))
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["code"] == code_pb2.INVALID_ARGUMENT
    fields = [violation["field"] for violation in bad_request_violations(body)]
    assert "scheduler" in fields


async def test_json_failure_after_first_event_is_the_error_event(stack: Stack) -> None:
    events: list[img2img.GenerateResponse] = []
    async with (
        httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client,
        client.stream("POST", "/v1/img2img:generate", json=img2img_json(prompt="please FAIL")) as response,
    ):
        assert response.status_code == 200  # the stream had started
        async for line in response.aiter_lines():
            if (event := sse_event(line)) is not None:
                events.append(event)
    assert kinds(events) == ["accepted", "progress", "error"]
    assert events[-1].error.code == code_pb2.INTERNAL


async def test_grpc_failure_after_first_event_fails_the_call(stack: Stack) -> None:
    events = []
    async with channel_to(stack.envoy.port) as channel:
        call = img2img_grpc.Img2ImgProviderStub(channel).Generate(img2img_request(prompt="FAIL now"))
        with pytest.raises(grpc.aio.AioRpcError) as failure:  # noqa: PT012 - events arrive before the error
            async for event in call:
                events.append(event)
    assert kinds(events) == ["accepted", "progress", "error"]
    assert failure.value.code() == grpc.StatusCode.INTERNAL


def preflight_headers(origin: str, request_headers: str) -> dict[str, str]:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": request_headers,
    }


@pytest.mark.parametrize(
    ("path", "request_headers"),
    [
        ("/v1/img2img:generate", "content-type"),
        ("/kiln.img2img.v1.Img2ImgProvider/Generate", "content-type,x-grpc-web,x-user-agent"),
        ("/v1/mesh:generate", "content-type"),
    ],
)
async def test_cors_preflight_from_allowed_origin(stack: Stack, path: str, request_headers: str) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
        response = await client.options(path, headers=preflight_headers(ALLOWED, request_headers))
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in response.headers["access-control-allow-methods"]
    assert "x-grpc-web" in response.headers["access-control-allow-headers"]


async def test_cors_other_origin_gets_no_allow_origin_and_reaches_no_server(stack: Stack) -> None:
    before = requests_total(stack.img2img), upstream_requests(stack.envoy, "img2img")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
        for path in ("/v1/img2img:generate", "/kiln.img2img.v1.Img2ImgProvider/Generate"):
            response = await client.options(
                path, headers=preflight_headers("http://evil.example", "content-type,x-grpc-web")
            )
            # Envoy answers the preflight itself; without ACAO the browser refuses the call.
            assert "access-control-allow-origin" not in response.headers, response.headers
    await asyncio.sleep(0.2)
    # The servers' metrics alone would not show a forwarded preflight: grpcio drops an OPTIONS
    # request before any interceptor runs. Envoy's upstream request counter does (it was 1 with
    # forward_not_matching_preflights true, checked by hand).
    assert (requests_total(stack.img2img), upstream_requests(stack.envoy, "img2img")) == before


async def test_cors_actual_response_carries_allow_origin(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
        allowed = await client.get("/v1/img2img/info", headers={"Origin": ALLOWED})
        other = await client.get("/v1/img2img/info", headers={"Origin": "http://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == ALLOWED
    assert "grpc-status" in allowed.headers["access-control-expose-headers"]
    assert "access-control-allow-origin" not in other.headers


async def test_envoy_local_reply_is_json(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=10) as client:
        response = await client.get("/nothing/here")
    assert response.status_code == 404
    assert response.json()["code"] == 404
