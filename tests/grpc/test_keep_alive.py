"""Keep-alive on real servers with the fake provider and a load delay: idle unload, reload in the
stream (STAGE_LOAD_MODEL), no unload under a job, one shared load for concurrent jobs."""

from __future__ import annotations

import asyncio
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kiln.common.v1 import job_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln.mesh.v1 import mesh_service_pb2 as mesh
from kiln.mesh.v1 import mesh_service_pb2_grpc as mesh_grpc
from kiln_img2img import SERVICE_NAME
from kiln_img2img.providers.fake import FakeImg2ImgProvider
from kiln_runtime.model_manager import ModelManager, ModelState
from kiln_runtime.provider import Stage
from kiln_runtime.server import KilnServer
from kiln_runtime.settings import FakeProviderSettings
from kiln_runtime.telemetry.metrics import ServiceMetrics
from tests.grpc.test_generate_stream import collect, img2img_request, kinds
from tests.servers import StartServer
from tests.support import png_bytes

LOAD = job_pb2.STAGE_LOAD_MODEL
DENOISE = job_pb2.STAGE_DENOISE


def loads(server: KilnServer, result: str = "ok") -> float:
    registry = server.runtime.metrics.registry
    value = registry.get_sample_value("kiln_model_loads_total", {"service": server.runtime.name, "result": result})
    return value or 0.0


def unloads(server: KilnServer) -> float:
    registry = server.runtime.metrics.registry
    return registry.get_sample_value("kiln_model_unloads_total", {"service": server.runtime.name}) or 0.0


async def wait_unloaded(
    server: KilnServer,
    stub: img2img_grpc.Img2ImgProviderStub,
) -> img2img.GetInfoResponse:
    """GetInfo once it says unloaded and the unload has finished (it says so from its start)."""
    async with asyncio.timeout(10):
        while True:
            info = await stub.GetInfo(img2img.GetInfoRequest())
            if not info.model.loaded and server.runtime.manager.state is ModelState.UNLOADED:
                return info
            await asyncio.sleep(0.05)


def stages(events: list[img2img.GenerateResponse]) -> list[int]:
    return [event.progress.stage for event in events if event.WhichOneof("event") == "progress"]


async def test_idle_unload_then_reload_in_the_stream(start_server: StartServer) -> None:
    server, channel = await start_server(runtime={"keep_alive": "300ms"}, fake={"load_delay_s": 0.3, "steps": 3})
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    info = await stub.GetInfo(img2img.GetInfoRequest())
    assert info.model.loaded
    assert info.model.keep_alive.ToMilliseconds() == 300
    assert info.model.last_load_duration.ToNanoseconds() >= 300_000_000
    first_loaded_at = info.model.last_load_time.ToNanoseconds()
    assert first_loaded_at > 0
    assert (loads(server), unloads(server)) == (1, 0)

    # Unloaded with nothing to do, and still SERVING: the next job reloads it.
    info = await wait_unloaded(server, stub)
    assert info.model.readiness == 2  # READINESS_READY
    assert unloads(server) == 1
    health = health_pb2_grpc.HealthStub(channel)
    status = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert status.status == health_pb2.HealthCheckResponse.SERVING

    events = await collect(stub.Generate(img2img_request()))
    assert kinds(events)[0] == "accepted" and kinds(events)[-1] == "result"
    seen = stages(events)
    assert seen[0] == LOAD and DENOISE in seen
    assert LOAD not in seen[seen.index(DENOISE) :]  # the load comes first, never in between
    load_events = [e.progress for e in events if e.progress.stage == LOAD]
    # The last load took ~0.3 s, so the first event's ETA says so (plus the run estimate).
    assert load_events[0].HasField("eta") and load_events[0].eta.ToMilliseconds() >= 250
    assert all(progress.fraction == 0.0 for progress in load_events)
    timings = {t.phase: t.duration.ToNanoseconds() for t in events[-1].result.timings}
    assert timings["load_model"] >= 250_000_000
    assert loads(server) == 2
    info = await stub.GetInfo(img2img.GetInfoRequest())
    assert info.model.last_load_time.ToNanoseconds() > first_loaded_at


async def test_first_lazy_load_has_no_eta_and_unset_keep_alive_stays_loaded(start_server: StartServer) -> None:
    server, channel = await start_server(runtime={"load_on_startup": False}, fake={"load_delay_s": 0.2, "steps": 2})
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    info = await stub.GetInfo(img2img.GetInfoRequest())
    assert not info.model.loaded and info.model.readiness == 2
    assert not info.model.HasField("keep_alive") and not info.model.HasField("last_load_duration")

    events = await collect(stub.Generate(img2img_request()))
    load_events = [e.progress for e in events if e.WhichOneof("event") == "progress" and e.progress.stage == LOAD]
    assert load_events and not load_events[0].HasField("eta")  # no load measured yet
    assert kinds(events)[-1] == "result"

    await asyncio.sleep(1.0)
    info = await stub.GetInfo(img2img.GetInfoRequest())
    assert info.model.loaded and info.model.HasField("last_load_duration")
    assert unloads(server) == 0
    events = await collect(stub.Generate(img2img_request()))
    assert LOAD not in stages(events)
    assert loads(server) == 1


async def test_no_unload_while_a_job_runs(start_server: StartServer) -> None:
    # keep_alive 0 with a job ten times longer: the model must stay until the job ends.
    server, channel = await start_server(runtime={"keep_alive": 0}, fake={"steps": 10, "step_delay_s": 0.05})
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    await wait_unloaded(server, stub)  # the startup load is followed by an immediate unload
    assert unloads(server) == 1

    call = stub.Generate(img2img_request())
    events: list[img2img.GenerateResponse] = []
    polls = 0
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
        progress = event.progress
        # After steps 1-9 the worker is inside the next 50 ms step; after step 10 it may be done.
        if event.WhichOneof("event") == "progress" and progress.stage == DENOISE and progress.step < 10:
            info = await stub.GetInfo(img2img.GetInfoRequest())
            assert info.model.loaded, "unloaded under a running job"
            assert unloads(server) == 1
            polls += 1
    assert polls == 9 and kinds(events)[-1] == "result"
    await wait_unloaded(server, stub)
    assert unloads(server) == 2 and loads(server) == 2


async def test_concurrent_jobs_share_one_load(start_server: StartServer) -> None:
    server, channel = await start_server(
        runtime={"load_on_startup": False, "max_concurrency": 3, "keep_alive": "1h"},
        fake={"load_delay_s": 0.5, "steps": 2},
    )
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    results = await asyncio.gather(*(collect(stub.Generate(img2img_request(seed=seed))) for seed in range(3)))
    for events in results:
        assert kinds(events)[-1] == "result"
        assert stages(events)[0] == LOAD
    assert loads(server) == 1
    assert server.runtime.admission.running == 0


async def test_a_client_leaving_during_the_load_does_not_stop_it(start_server: StartServer) -> None:
    server, channel = await start_server(
        runtime={"load_on_startup": False, "max_concurrency": 2}, fake={"load_delay_s": 0.6, "steps": 2}
    )
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    leaving = stub.Generate(img2img_request(on_disconnect=job_pb2.DISCONNECT_POLICY_CANCEL))
    while (event := await leaving.read()).WhichOneof("event") != "progress":
        pass
    assert event.progress.stage == LOAD
    staying = asyncio.ensure_future(collect(stub.Generate(img2img_request(seed=2))))
    leaving.cancel()
    events = await staying
    assert kinds(events)[-1] == "result"
    assert loads(server) == 1
    async with asyncio.timeout(5):
        while server.runtime.admission.running or server.runtime.manager.holds:
            await asyncio.sleep(0.02)  # the cancelled job's slot and hold are given back


async def test_mesh_reloads_in_the_stream(start_server: StartServer) -> None:
    server, channel = await start_server("mesh", runtime={"keep_alive": 0}, fake={"load_delay_s": 0.2, "steps": 2})
    stub = mesh_grpc.MeshProviderStub(channel)
    async with asyncio.timeout(10):
        while server.runtime.manager.state is not ModelState.UNLOADED:
            await asyncio.sleep(0.05)
    assert not (await stub.GetInfo(mesh.GetInfoRequest())).model.loaded
    request = mesh.GenerateRequest(image=png_bytes((64, 64)), output_format=mesh.MESH_FORMAT_GLB)
    events = [event async for event in stub.Generate(request)]
    seen = [e.progress.stage for e in events if e.WhichOneof("event") == "progress"]
    assert seen[0] == LOAD and job_pb2.STAGE_EXTRACT in seen
    assert events[-1].WhichOneof("event") == "result"
    assert loads(server) == 2


def test_the_python_stage_enum_mirrors_the_proto() -> None:
    values = job_pb2.Stage.DESCRIPTOR.values
    proto = {value.name.removeprefix("STAGE_") for value in values if value.number != 0}
    assert proto == {stage.name for stage in Stage}


class SlowCloseProvider(FakeImg2ImgProvider):
    """The fake model, recording its lifecycle, with a `close` that waits to be let go."""

    def __init__(self) -> None:
        super().__init__(FakeProviderSettings(load_delay_s=0.05))
        self.calls: list[str] = []
        self.closing = threading.Event()
        self.let_go = threading.Event()

    def load(self) -> None:
        self.calls.append("load")
        super().load()

    def close(self) -> None:
        self.calls.append("close")
        self.closing.set()
        assert self.let_go.wait(10)
        self.calls.append("closed")


async def test_a_job_arriving_during_an_unload_waits_for_it_then_loads() -> None:
    provider = SlowCloseProvider()
    manager = ModelManager(
        provider,
        health_servicer=health.aio.HealthServicer(),
        service_names=[SERVICE_NAME],
        metrics=ServiceMetrics("img2img"),
        keep_alive=0,
    )
    await manager.start()
    await manager.wait_loaded()
    assert await asyncio.to_thread(provider.closing.wait, 10)  # the idle unload has begun
    assert manager.state is ModelState.UNLOADING

    hold = manager.hold()
    load = manager.load_task()
    assert load is not None and manager.load_task() is load  # one load for every waiter
    await asyncio.sleep(0.2)
    assert not load.done() and provider.calls == ["load", "close"]  # never beside the unload
    provider.let_go.set()
    await asyncio.wait_for(load, 10)
    assert provider.calls == ["load", "close", "closed", "load"]
    assert manager.state is ModelState.LOADED and manager.load_task() is None

    provider.closing.clear()
    hold.release()
    hold.release()  # a second release changes nothing
    assert await asyncio.to_thread(provider.closing.wait, 10)  # idle again: unloaded again
    assert manager.holds == 0
    await manager.close()
