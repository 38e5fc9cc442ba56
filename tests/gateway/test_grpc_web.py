"""Binary gRPC-Web (`application/grpc-web+proto`) through a real Envoy to real servers.

One slow img2img server (5 steps x 0.3 s; prompts containing FAIL fail at step 2) and one mesh
server behind one Envoy; a second img2img server with 5 MiB results behind its own Envoy.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2

from gateway.kiln_gateway import Envoy
from kiln.common.v1 import artifact_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln.mesh.v1 import mesh_service_pb2 as mesh
from kiln.mesh.v1 import mesh_service_pb2_grpc as mesh_grpc
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import channel_to, envoy_for, img2img_request, kiln_server, kinds, mesh_request
from tests.gateway.grpc_web import GrpcWebCall, GrpcWebError, collect

pytestmark = pytest.mark.asyncio(loop_scope="module")

ALLOWED = "http://127.0.0.1:8081"
STEPS = 5
STEP_DELAY_S = 0.3
MiB = 1 << 20
RESULT_BYTES = 5 * MiB
IMG2IMG_GENERATE = "/kiln.img2img.v1.Img2ImgProvider/Generate"
MESH_GENERATE = "/kiln.mesh.v1.MeshProvider/Generate"


@dataclass
class Stack:
    img2img: KilnServer
    mesh: KilnServer
    envoy: Envoy

    def client(self, timeout: float = 30) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.envoy.port}", timeout=timeout)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[KilnServer, KilnServer]]:
    root: Path = tmp_path_factory.mktemp("grpc-web")
    fake = {"steps": STEPS, "step_delay_s": STEP_DELAY_S, "fail_when_prompt_contains": "FAIL", "fail_at_step": 2}
    async with (
        kiln_server("img2img", root / "img2img", fake=fake, runtime={"max_concurrency": 2}) as img2img_server,
        kiln_server("mesh", root / "mesh", fake={"steps": 3}) as mesh_server,
    ):
        yield img2img_server, mesh_server


@pytest.fixture(scope="module")
def stack(servers: tuple[KilnServer, KilnServer]) -> Iterator[Stack]:
    img2img_server, mesh_server = servers
    with envoy_for([img2img_server.port], [mesh_server.port], cors_allowed_origins=[ALLOWED]) as envoy:
        yield Stack(img2img_server, mesh_server, envoy)


def deterministic(event: Message) -> dict[str, Any]:
    """What two runs of the same request share: the kind, the steps, the seed, artifact hashes."""
    kind = event.WhichOneof("event")
    value = getattr(event, kind or "")
    fields: dict[str, Any] = {"kind": kind}
    if kind == "progress":
        fields.update(stage=value.stage, step=value.step, total=value.total_steps, fraction=round(value.fraction, 4))
    elif kind == "result":
        fields["artifacts"] = [(a.sha256, a.size_bytes, a.media_type) for a in value.artifacts]
        if value.HasField("parameters") and hasattr(value.parameters, "seed"):
            fields["seed"] = value.parameters.seed
    elif kind == "error":
        fields["code"] = value.code
    return fields


async def test_img2img_generate_matches_direct_grpc(stack: Stack) -> None:
    async with channel_to(stack.img2img.port) as channel:
        direct = [event async for event in img2img_grpc.Img2ImgProviderStub(channel).Generate(img2img_request())]
    async with stack.client() as client:
        call = GrpcWebCall(client, IMG2IMG_GENERATE, img2img_request(), img2img.GenerateResponse, timeout_s=30)
        via_web = await collect(call)
    assert call.http_status == 200
    assert call.headers["content-type"].startswith("application/grpc-web")
    assert call.trailers["grpc-status"] == "0"
    assert kinds(via_web) == kinds(direct) == ["accepted"] + ["progress"] * STEPS + ["result"]
    assert [deterministic(e) for e in via_web] == [deterministic(e) for e in direct]
    result = via_web[-1].result
    assert result.parameters.seed == 7
    (artifact,) = result.artifacts
    assert artifact.sha256 == direct[-1].result.artifacts[0].sha256
    if artifact.inline_data:
        assert hashlib.sha256(artifact.inline_data).hexdigest() == artifact.sha256


async def test_mesh_generate_matches_direct_grpc(stack: Stack) -> None:
    async with channel_to(stack.mesh.port) as channel:
        direct = [event async for event in mesh_grpc.MeshProviderStub(channel).Generate(mesh_request())]
    async with stack.client() as client:
        via_web = await collect(GrpcWebCall(client, MESH_GENERATE, mesh_request(), mesh.GenerateResponse))
    assert kinds(via_web) == kinds(direct)
    assert kinds(via_web)[0] == "accepted" and kinds(via_web)[-1] == "result"
    assert [deterministic(e) for e in via_web] == [deterministic(e) for e in direct]


async def test_events_arrive_incrementally(stack: Stack) -> None:
    arrivals: list[float] = []
    events: list[img2img.GenerateResponse] = []
    async with stack.client() as client:
        start = time.monotonic()
        async for event in GrpcWebCall(client, IMG2IMG_GENERATE, img2img_request(), img2img.GenerateResponse):
            arrivals.append(time.monotonic() - start)
            events.append(event)
    assert kinds(events) == ["accepted"] + ["progress"] * STEPS + ["result"]
    # The run takes STEPS x STEP_DELAY_S = 1.5 s; a buffered body would bring everything at once.
    assert arrivals[0] < 1.0, arrivals
    assert arrivals[-1] - arrivals[0] > (STEPS - 1) * STEP_DELAY_S, [round(t, 2) for t in arrivals]


async def test_invalid_argument_carries_bad_request_details(stack: Stack) -> None:
    request = img2img_request(scheduler=img2img.SCHEDULER_UNSPECIFIED)
    events = []
    async with stack.client() as client:
        call = GrpcWebCall(client, IMG2IMG_GENERATE, request, img2img.GenerateResponse)
        with pytest.raises(GrpcWebError) as failure:  # noqa: PT012 - no event may come first
            async for event in call:
                events.append(event)
    assert events == []
    error = failure.value
    assert error.code == code_pb2.INVALID_ARGUMENT, error
    assert error.message
    assert error.status is not None and error.status.code == code_pb2.INVALID_ARGUMENT
    violations = []
    for detail in error.status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            violations += [violation.field for violation in bad_request.field_violations]
    assert "scheduler" in violations, error.status


async def test_failure_mid_stream_is_error_event_then_internal(stack: Stack) -> None:
    events: list[img2img.GenerateResponse] = []
    async with stack.client() as client:
        call = GrpcWebCall(client, IMG2IMG_GENERATE, img2img_request(prompt="please FAIL"), img2img.GenerateResponse)
        with pytest.raises(GrpcWebError) as failure:  # noqa: PT012 - events arrive before the error
            async for event in call:
                events.append(event)
    assert call.http_status == 200  # the stream had started: the status comes in the trailer frame
    assert kinds(events) == ["accepted", "progress", "error"]
    assert events[-1].error.code == code_pb2.INTERNAL
    assert failure.value.code == code_pb2.INTERNAL
    assert failure.value.message == events[-1].error.message


async def test_cors_on_grpc_web_post(stack: Stack) -> None:
    async with stack.client() as client:
        call = GrpcWebCall(
            client, IMG2IMG_GENERATE, img2img_request(), img2img.GenerateResponse, metadata={"Origin": ALLOWED}
        )
        events = await collect(call)
        other = GrpcWebCall(
            client, IMG2IMG_GENERATE, img2img_request(), img2img.GenerateResponse, metadata={"Origin": "http://x.test"}
        )
        await collect(other)
    assert kinds(events)[-1] == "result"
    assert call.headers["access-control-allow-origin"] == ALLOWED
    exposed = {name.strip() for name in call.headers["access-control-expose-headers"].split(",")}
    assert {"grpc-status", "grpc-message", "grpc-status-details-bin"} <= exposed
    assert "access-control-allow-origin" not in other.headers


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def large_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[KilnServer]:
    async with kiln_server(
        "img2img",
        tmp_path_factory.mktemp("grpc-web-large"),
        fake={"steps": 2, "output_bytes": RESULT_BYTES},
        server={"max_message_bytes": 16 * MiB},
        storage={"max_inline_bytes": 16 * MiB},
    ) as server:
        yield server


async def test_five_mib_result_over_grpc_web(large_server: KilnServer) -> None:
    request = img2img_request(delivery=artifact_pb2.ARTIFACT_DELIVERY_INLINE)
    with envoy_for([large_server.port]) as envoy:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}", timeout=60) as client:
            events = await collect(GrpcWebCall(client, IMG2IMG_GENERATE, request, img2img.GenerateResponse))
    assert kinds(events)[-1] == "result", kinds(events)
    (artifact,) = events[-1].result.artifacts
    assert len(artifact.inline_data) >= RESULT_BYTES * 0.9
    assert hashlib.sha256(artifact.inline_data).hexdigest() == artifact.sha256
