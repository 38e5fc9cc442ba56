"""Keep-alive with the tiny SD model on real servers: reload in the stream gives the same model back,
a failed reload is a clear job error that leaks nothing, and an unload returns the weights' memory."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.common.v1 import job_pb2, service_info_pb2
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img import SERVICE_NAME
from kiln_img2img.testing.tiny_models import UNET_CONFIG, TinyModels
from kiln_runtime.model_manager import ModelState
from kiln_runtime.server import KilnServer
from tests.img2img.test_process_img2img import start
from tests.servers import StartServer
from tests.support import png_bytes

MiB = 1 << 20
# A UNet of the tiny model's topology at 4x its widths: 38 M float32 parameters, 146 MiB, so that
# the weights stand far above the noise of a Python process's RSS.
BIG_UNET_WIDTHS = (128, 128, 256, 256)


def request(seed: int = 5) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        image=png_bytes((64, 64)),
        prompt="a lighthouse",
        seed=seed,
        num_inference_steps=2,
        scheduler=pb.SCHEDULER_EULER,
        output_format=pb.IMAGE_FORMAT_PNG,
    )


async def events_of(call: Any, into: list[pb.GenerateResponse] | None = None) -> list[pb.GenerateResponse]:
    events = [] if into is None else into
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


def stages(events: list[pb.GenerateResponse]) -> list[int]:
    return [e.progress.stage for e in events if e.WhichOneof("event") == "progress"]


def sample(server: KilnServer, name: str, **labels: str) -> float:
    value = server.runtime.metrics.registry.get_sample_value(name, {"service": "img2img", **labels})
    return value or 0.0


async def wait_state(server: KilnServer, state: ModelState) -> None:
    async with asyncio.timeout(30):
        while server.runtime.manager.state is not state:
            await asyncio.sleep(0.05)


async def test_reload_on_demand_gives_the_same_model_back(start_server: StartServer, tiny: TinyModels) -> None:
    server, channel = await start_server(
        provider="local", model={"id": str(tiny.diffusers_dir)}, runtime={"keep_alive": 0}
    )
    stub = pb_grpc.Img2ImgProviderStub(channel)
    await wait_state(server, ModelState.UNLOADED)  # loaded and checked at startup, then released
    provider: Any = server.runtime.manager.provider
    assert provider._base is None  # the pipeline and its modules are dropped

    first = await events_of(stub.Generate(request()))
    second = await events_of(stub.Generate(request()))
    for events in (first, second):
        assert events[-1].WhichOneof("event") == "result"
        seen = stages(events)
        assert seen[0] == job_pb2.STAGE_LOAD_MODEL
        assert seen.index(job_pb2.STAGE_DENOISE) > max(i for i, s in enumerate(seen) if s == job_pb2.STAGE_LOAD_MODEL)
        load = next(e.progress for e in events if e.progress.stage == job_pb2.STAGE_LOAD_MODEL)
        assert load.HasField("eta")  # the startup load's duration is known
    # Reloaded in place from the same files: the same seed gives the same bytes.
    assert first[-1].result.artifacts[0].sha256 == second[-1].result.artifacts[0].sha256
    await wait_state(server, ModelState.UNLOADED)
    assert sample(server, "kiln_model_loads_total", result="ok") == 3
    assert sample(server, "kiln_model_unloads_total") == 3
    assert sample(server, "kiln_model_loaded") == 0


async def test_a_failed_reload_is_a_clear_job_error(
    start_server: StartServer, tiny: TinyModels, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(tiny.diffusers_dir, folder)
    server, channel = await start_server(provider="local", model={"id": str(folder)}, runtime={"keep_alive": 0})
    stub = pb_grpc.Img2ImgProviderStub(channel)
    await wait_state(server, ModelState.UNLOADED)
    folder.rename(tmp_path / "moved")  # the model goes away while unloaded

    events: list[pb.GenerateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await events_of(stub.Generate(request()), events)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    details = raised.value.details() or ""
    assert "could not be loaded" in details and "KILN_IMG2IMG__MODEL__ID" in details
    assert [e.WhichOneof("event") for e in events][-1] == "error"
    assert stages(events) == [job_pb2.STAGE_LOAD_MODEL]
    # Nothing leaked, the server still takes work, and the next job tries the load again.
    assert server.runtime.admission.running == 0 and server.runtime.manager.holds == 0
    health = health_pb2_grpc.HealthStub(channel)
    check = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert sample(server, "kiln_model_loads_total", result="failed") == 1
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert info.model.readiness == service_info_pb2.READINESS_READY
    assert info.model.readiness_reason.startswith("the last load of the model failed: ")
    assert "KILN_IMG2IMG__MODEL__ID" in info.model.readiness_reason

    (tmp_path / "moved").rename(folder)
    events = await events_of(stub.Generate(request()))
    assert events[-1].WhichOneof("event") == "result"
    assert sample(server, "kiln_model_loads_total", result="ok") == 2
    assert (await stub.GetInfo(pb.GetInfoRequest())).model.readiness_reason == ""


async def test_sighup_reload_while_unloaded(
    start_server: StartServer, tiny: TinyModels, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, channel = await start_server(
        provider="local", model={"id": str(tiny.diffusers_dir)}, runtime={"keep_alive": "1h", "load_on_startup": False}
    )
    stub = pb_grpc.Img2ImgProviderStub(channel)
    assert server.runtime.manager.state is ModelState.UNLOADED
    # What SIGHUP does: read the environment again and load that model beside the (absent) one.
    monkeypatch.setenv("KILN_IMG2IMG__PROVIDER", "local")
    monkeypatch.setenv("KILN_IMG2IMG__MODEL__ID", str(tiny.diffusers_dir))
    monkeypatch.setenv("KILN_OFFLINE", "1")
    assert await server.reload()
    info = await stub.GetInfo(pb.GetInfoRequest())
    assert info.model.loaded and info.model.keep_alive.seconds == 3600
    events = await events_of(stub.Generate(request()))
    assert job_pb2.STAGE_LOAD_MODEL not in stages(events)
    assert events[-1].WhichOneof("event") == "result"
    assert sample(server, "kiln_model_loads_total", result="ok") == 1


# -- memory ------------------------------------------------------------------------------------


@dataclass
class Running:
    process: asyncio.subprocess.Process
    stub: pb_grpc.Img2ImgProviderStub

    def rss(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")


@pytest.fixture(scope="module")
def big_model(tiny: TinyModels, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its UNet widened to 146 MiB of random float32 weights."""
    from diffusers import UNet2DConditionModel

    folder = tmp_path_factory.mktemp("big") / "model"
    shutil.copytree(tiny.diffusers_dir, folder)
    shutil.rmtree(folder / "unet")
    unet = UNet2DConditionModel(**{**UNET_CONFIG, "block_out_channels": BIG_UNET_WIDTHS})
    unet.save_pretrained(folder / "unet")
    return folder


@pytest.fixture
async def big_server(big_model: Path, tmp_path: Path) -> AsyncIterator[Running]:
    process, port = await start(
        tmp_path,
        KILN_IMG2IMG__MODEL__ID=str(big_model),
        KILN_IMG2IMG__RUNTIME__DEVICE="cpu",
        KILN_IMG2IMG__RUNTIME__LOAD_ON_STARTUP="false",
        KILN_IMG2IMG__RUNTIME__KEEP_ALIVE="1s",
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield Running(process, pb_grpc.Img2ImgProviderStub(channel))
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def wait_loaded(stub: pb_grpc.Img2ImgProviderStub, loaded: bool) -> None:
    async with asyncio.timeout(30):
        while (await stub.GetInfo(pb.GetInfoRequest())).model.loaded is not loaded:
            await asyncio.sleep(0.05)


async def test_unload_returns_the_weights_memory(big_server: Running, big_model: Path) -> None:
    """RSS after an unload is back within 96 MiB of the RSS before the first load, every cycle.

    "Before the first load" is the server SERVING with torch, diffusers and transformers already
    imported (the provider imports them when it is built): the process without the model, not
    without its libraries. The margin is what a first load and a first inference leave behind that
    is not the model and does not grow: library caches filled on the first `from_pretrained` and
    torch/oneDNN kernel state from the first run (measured here: about 34 MiB after a load alone,
    about 55 MiB after a load with the warm-up run, 64-66 MiB in this server; the same on the
    second cycle; up to 81 MiB with other test runs loading both cores, hence 96). The weights
    are 147 MiB, so the test also asserts that the loaded RSS stood
    at least 75% of them above the baseline and that each unload gave at least that much back,
    and that the second cycle ends where the first did.
    """
    weights = sum(path.stat().st_size for path in big_model.rglob("*.safetensors"))
    stub = big_server.stub
    await wait_loaded(stub, False)
    before = big_server.rss()
    samples: list[tuple[int, int]] = []
    for _ in range(2):  # a second cycle shows that nothing accumulates
        events = await events_of(stub.Generate(request()))
        assert events[-1].WhichOneof("event") == "result"
        loaded = big_server.rss()
        await wait_loaded(stub, False)
        samples.append((loaded, await settled_rss(big_server)))
    report = ", ".join(f"loaded {a / MiB:.0f} MiB, unloaded {b / MiB:.0f} MiB" for a, b in samples)
    print(f"\nweights {weights / MiB:.0f} MiB; before load {before / MiB:.0f} MiB; {report}")
    for loaded, unloaded in samples:
        assert loaded - before > 0.75 * weights, "the model did not show in RSS"
        assert loaded - unloaded > 0.75 * weights, "the unload did not give the weights' memory back"
        assert unloaded - before < 96 * MiB, "more than the one-time margin stayed after the unload"
    assert abs(samples[1][1] - samples[0][1]) < 24 * MiB, "memory accumulates over load/unload cycles"


async def settled_rss(server: Running) -> int:
    """RSS once the unload has finished giving memory back: GetInfo says "unloaded" as soon as the
    unload starts, and on busy cores the release (gc, malloc_trim) can take a while longer."""
    previous = server.rss()
    for _ in range(100):  # 20 s at most
        await asyncio.sleep(0.2)
        current = server.rss()
        if abs(current - previous) < MiB:
            return current
        previous = current
    return previous
