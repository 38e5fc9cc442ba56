"""The Gemini provider behind the real img2img server: vendor outcomes become Kiln's events and statuses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2

from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from tests.servers import StartServer
from tests.standins.gemini import GeminiStandIn
from tests.support import png_bytes

KEY = "test-key-0123456789"


@pytest.fixture
def gemini() -> Iterator[GeminiStandIn]:
    with GeminiStandIn(api_key=KEY) as server:
        yield server


def request() -> pb.GenerateRequest:
    return pb.GenerateRequest(
        image=png_bytes(),
        prompt="make it a watercolor",
        scheduler=pb.SCHEDULER_EULER,
        output_format=pb.IMAGE_FORMAT_PNG,
    )


async def run(stub: pb_grpc.Img2ImgProviderStub) -> tuple[list[pb.GenerateResponse], grpc.aio.AioRpcError | None]:
    call = stub.Generate(request())
    events: list[Any] = []
    try:
        while (event := await call.read()) is not grpc.aio.EOF:
            events.append(event)
    except grpc.aio.AioRpcError as err:
        return events, err
    return events, None


async def test_success_through_the_server(start_server: StartServer, gemini: GeminiStandIn) -> None:
    _, channel = await start_server(provider="gemini", gemini={"api_key": KEY, "base_url": gemini.base_url})
    stub = pb_grpc.Img2ImgProviderStub(channel)
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert info.model.provider == "gemini" and info.model.device == "vendor"
    events, error = await run(stub)
    assert error is None
    stages = [e.progress.stage for e in events if e.WhichOneof("event") == "progress"]
    assert stages[:3] == [9, 10, 11]  # VENDOR_SUBMITTED, VENDOR_WAITING, VENDOR_RECEIVED
    result = events[-1].result
    assert result.provenance.reproducibility == 3  # NONE
    assert result.artifacts[0].media_type == "image/png" and result.width > 0
    assert gemini.requests[0].prompt.startswith("make it a watercolor")


@pytest.mark.parametrize(
    ("scenario", "code", "reason"),
    [
        ("blocked_prompt", code_pb2.FAILED_PRECONDITION, "CONTENT_BLOCKED_INPUT"),
        ("text_only", code_pb2.FAILED_PRECONDITION, "NO_IMAGE_PRODUCED"),
        ("internal", code_pb2.UNAVAILABLE, "VENDOR_UNAVAILABLE"),
        ("quota", code_pb2.RESOURCE_EXHAUSTED, "VENDOR_QUOTA"),
    ],
)
async def test_vendor_failures_are_in_band_errors(
    start_server: StartServer, gemini: GeminiStandIn, scenario: str, code: int, reason: str
) -> None:
    gemini.scenario = scenario
    settings = {"api_key": KEY, "base_url": gemini.base_url, "max_retries": 0}
    _, channel = await start_server(provider="gemini", gemini=settings)
    events, error = await run(pb_grpc.Img2ImgProviderStub(channel))
    assert events[0].WhichOneof("event") == "accepted"
    assert events[-1].WhichOneof("event") == "error"
    status = events[-1].error
    assert status.code == code
    info = error_details_pb2.ErrorInfo()
    next(d for d in status.details if d.Is(info.DESCRIPTOR)).Unpack(info)
    assert info.reason == reason
    assert info.metadata["vendor"] == "gemini"
    assert error is not None and error.code().value[0] == code
    assert KEY not in status.message
    if scenario == "quota":
        retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert len(retry) == 1
