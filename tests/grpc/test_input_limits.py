"""Inputs up to the image limit over gRPC, refusals by field above it, and admission before decoding.

Real servers (fake provider) on loopback ports. The default `limits.max_image_bytes` (20 MiB)
is used on purpose: the caps derived from it (kiln_client.limits) are what these sizes cross.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kiln.common.v1 import job_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_client import Img2ImgClient, InvalidArgumentError
from kiln_client.limits import DEFAULT_MAX_IMAGE_BYTES, max_request_message_bytes
from kiln_runtime.errors import RETRIABLE_HEADER
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import requests_total
from tests.photos import MiB, photo_jpeg, truncated_jpeg
from tests.servers import StartServer

LIMIT = DEFAULT_MAX_IMAGE_BYTES


def request(image: bytes, **fields: Any) -> img2img.GenerateRequest:
    return img2img.GenerateRequest(
        image=image,
        prompt="a fox",
        seed=1,
        scheduler=img2img.SCHEDULER_EULER,
        output_format=img2img.IMAGE_FORMAT_PNG,
        **fields,
    )


def violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return {v.field: v.description for v in bad.field_violations}
    raise AssertionError(f"no BadRequest in {status}")


def reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, error
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


async def events(channel: grpc.aio.Channel, image: bytes) -> list[str]:
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    return [event.WhichOneof("event") or "" async for event in stub.Generate(request(image))]


async def test_an_image_at_the_limit_gives_a_result(start_server: StartServer) -> None:
    _, channel = await start_server()
    kinds = await events(channel, photo_jpeg(LIMIT))
    assert kinds[0] == "accepted" and kinds[-1] == "result", kinds


@pytest.mark.parametrize("size", [LIMIT + 1, 25 * MiB, 2 * LIMIT], ids=["limit+1", "25MiB", "twice"])
async def test_an_image_over_the_limit_is_refused_by_name_with_the_limit(start_server: StartServer, size: int) -> None:
    server, channel = await start_server()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await events(channel, photo_jpeg(size))
    # Not RESOURCE_EXHAUSTED ("message larger than max"): the receive cap has room above the limit.
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    description = violations(raised.value)["image"]
    assert f"is {size} bytes" in description and f"the {LIMIT} allowed (20 MiB)" in description
    assert RETRIABLE_HEADER not in dict(raised.value.trailing_metadata() or ())
    assert server.runtime.admission.running == server.runtime.admission.queued == 0


async def test_the_receive_cap_follows_the_image_limit(start_server: StartServer) -> None:
    """Above twice the limit the transport refuses; that size is where the client stops sending."""
    _, channel = await start_server()
    over_cap = max_request_message_bytes(LIMIT) + 1
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await events(channel, photo_jpeg(over_cap))
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (raised.value.details() or "")
    assert RETRIABLE_HEADER not in dict(raised.value.trailing_metadata() or ())


async def test_the_client_sends_over_limit_images_and_never_retries_their_refusal(start_server: StartServer) -> None:
    server, _ = await start_server()
    image = photo_jpeg(25 * MiB)
    before = requests_total(server)

    def run() -> InvalidArgumentError:
        with Img2ImgClient(f"127.0.0.1:{server.port}", retries=3) as client:
            with pytest.raises(InvalidArgumentError) as raised:
                client.generate_image(image, prompt="a fox", scheduler="EULER", output_format="PNG")
            return raised.value

    error = await asyncio.to_thread(run)
    (field, description), *_ = error.field_violations
    assert field == "image" and str(LIMIT) in description
    # The access-log interceptor counts the call after its status has gone out: wait for it, then
    # check that it stays at one (the client retries, if at all, before generate_image returns).
    async with asyncio.timeout(10):
        while requests_total(server) == before:
            await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    assert requests_total(server) - before == 1  # reached the server once, not retried


async def test_the_client_refuses_what_it_cannot_send_by_field(start_server: StartServer) -> None:
    server, _ = await start_server()
    image = photo_jpeg(max_request_message_bytes(LIMIT) + 1)
    before = requests_total(server)

    def run() -> InvalidArgumentError:
        with Img2ImgClient(f"127.0.0.1:{server.port}") as client:
            with pytest.raises(InvalidArgumentError) as raised:
                client.generate_image(image, prompt="a fox", scheduler="EULER", output_format="PNG")
            return raised.value

    error = await asyncio.to_thread(run)
    assert [field for field, _ in error.field_violations] == ["image"]
    assert "limits.max_image_bytes" in error.field_violations[0][1]
    assert requests_total(server) == before  # refused before sending


async def hold_the_only_slot(server: KilnServer, channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
    call = img2img_grpc.Img2ImgProviderStub(channel).Generate(
        request(photo_jpeg(2 * MiB), on_disconnect=job_pb2.DISCONNECT_POLICY_CANCEL)
    )
    assert (await call.read()).WhichOneof("event") == "accepted"  # type: ignore[union-attr]
    assert server.runtime.admission.running == 1
    return call


async def test_a_capacity_refusal_decodes_nothing_and_says_retry_elsewhere(start_server: StartServer) -> None:
    server, channel = await start_server(
        runtime={"max_concurrency": 1, "max_queue": 0}, fake={"steps": 400, "step_delay_s": 0.05}
    )
    busy = await hold_the_only_slot(server, channel)
    try:
        # The header is fine, the pixels are not: only a full decode would notice. Refused for
        # capacity, so nothing was decoded before admission.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await events(channel, truncated_jpeg())
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert reason(raised.value) == "CAPACITY"
        assert dict(raised.value.trailing_metadata() or ()).get(RETRIABLE_HEADER) == "true"
    finally:
        busy.cancel()
    for _ in range(200):
        if server.runtime.admission.running == 0:
            break
        await asyncio.sleep(0.05)
    # Admitted, the same image is decoded and refused by field, before any event, and frees its slot.
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await events(channel, truncated_jpeg())
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "truncated" in violations(raised.value)["image"]
    assert server.runtime.admission.running == server.runtime.admission.queued == 0


async def test_the_header_checks_still_come_before_admission(start_server: StartServer) -> None:
    """A file that is not an image is refused by field even when the server is full."""
    server, channel = await start_server(
        runtime={"max_concurrency": 1, "max_queue": 0}, fake={"steps": 400, "step_delay_s": 0.05}
    )
    busy = await hold_the_only_slot(server, channel)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await events(channel, b"GIF89a not really")
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "image" in violations(raised.value)
    finally:
        busy.cancel()
