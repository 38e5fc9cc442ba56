"""grpc.health.v1: NOT_SERVING while the model loads, SERVING when warm, Watch sees both."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_img2img import SERVICE_NAME
from tests.servers import StartServer
from tests.support import png_bytes

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_transitions_and_watch(start_server: StartServer) -> None:
    server, channel = await start_server(fake={"load_delay_s": 0.5}, wait_ready=False)
    health = health_pb2_grpc.HealthStub(channel)
    check = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert check.status == NOT_SERVING
    # Jobs are refused with a clear reason while loading, and GetInfo says why.
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    info = await stub.GetInfo(img2img.GetInfoRequest())
    assert info.model.readiness == 1 and "loading" in info.model.readiness_reason  # READINESS_LOADING

    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    seen = [(await watch.read()).status]
    seen.append((await asyncio.wait_for(watch.read(), timeout=5)).status)
    assert seen == [NOT_SERVING, SERVING]
    overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert overall.status == SERVING

    await server.runtime.manager.drain()
    assert (await asyncio.wait_for(watch.read(), timeout=5)).status == NOT_SERVING
    watch.cancel()


async def test_generate_while_loading_is_unavailable(start_server: StartServer) -> None:
    _, channel = await start_server(fake={"load_delay_s": 2.0}, wait_ready=False)
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    request = img2img.GenerateRequest(
        image=b"\x89PNG", prompt="x", scheduler=img2img.SCHEDULER_EULER, output_format=img2img.IMAGE_FORMAT_PNG
    )
    call = stub.Generate(request)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call.read()
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "loading" in (raised.value.details() or "")


async def test_unknown_service_name_is_not_found(start_server: StartServer) -> None:
    _, channel = await start_server()
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await health.Check(health_pb2.HealthCheckRequest(service="kiln.nope.v1.Nope"))
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_answers_while_the_worker_is_busy(start_server: StartServer) -> None:
    _, channel = await start_server(fake={"steps": 10, "step_delay_s": 0.1, "burn_cpu": True})
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    request = img2img.GenerateRequest(
        image=png_bytes(), prompt="busy", scheduler=img2img.SCHEDULER_EULER, output_format=img2img.IMAGE_FORMAT_PNG
    )
    call = stub.Generate(request)
    await call.read()
    assert (await call.read()).WhichOneof("event") == "progress"  # the worker is computing now
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(20):
        response = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=1.0)
        assert response.status == SERVING
    call.cancel()
