"""Time to first result from an idle-unloaded model against a loaded one (keep_alive), in one process.

Two servers per model on loopback ports run the same tiny model on the CPU: one keeps it loaded
(keep_alive unset), the other unloads it after every job (keep_alive 0), so each of its jobs
starts with a load in the stream (STAGE_LOAD_MODEL). The script alternates jobs between them and
prints, for img2img (tiny SD1.5, 64x64, 4 steps) and mesh (tiny TripoSR + tiny u2net), the median
time from sending Generate to the result event on each, their ratio, and the median load time
GetInfo reports. Tiny models load in a fraction of a second; with real weights the load is
seconds to minutes, and the ratio grows accordingly.

    python benchmarks/cold_start.py [--runs 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import grpc
import torch
from PIL import Image, ImageDraw

from kiln.img2img.v1 import img2img_service_pb2 as img2img_pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln.mesh.v1 import mesh_service_pb2 as mesh_pb
from kiln.mesh.v1 import mesh_service_pb2_grpc as mesh_grpc
from kiln_img2img.config import Img2ImgProviderSettings, Img2ImgSettings
from kiln_img2img.server import create_server as create_img2img_server
from kiln_img2img.testing.tiny_models import default_root, ensure_tiny_models
from kiln_mesh.config import MeshProviderSettings, MeshServerSettings, MeshSettings, TripoSRSettings
from kiln_mesh.server import create_server as create_mesh_server
from kiln_mesh.testing.assets import ensure_tiny_mesh_models
from kiln_runtime.model_manager import ModelState
from kiln_runtime.server import KilnServer
from kiln_runtime.settings import ModelSettings, RuntimeSettings, ServerSettings, StorageSettings


def object_png(side: int) -> bytes:
    image = Image.new("RGB", (side, side), (10, 10, 10))
    ImageDraw.Draw(image).ellipse((side // 5, side // 6, side - side // 5, side - side // 8), fill=(230, 120, 40))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def img2img_server(data_dir: Path, keep_alive: float | None) -> KilnServer:
    tiny = ensure_tiny_models(default_root())
    return create_img2img_server(
        Img2ImgSettings(
            _env_file=None,
            offline=True,
            storage=StorageSettings(data_dir=data_dir),
            img2img=Img2ImgProviderSettings(
                provider="local",
                model=ModelSettings(id=str(tiny.diffusers_dir)),
                server=ServerSettings(port=0, metrics_enabled=False),
                runtime=RuntimeSettings(device="cpu", keep_alive=keep_alive),
            ),
        )
    )


def mesh_server(data_dir: Path, keep_alive: float | None) -> KilnServer:
    tiny = ensure_tiny_mesh_models()
    return create_mesh_server(
        MeshSettings(
            _env_file=None,
            offline=True,
            storage=StorageSettings(data_dir=data_dir),
            mesh=MeshProviderSettings(
                provider="local",
                model=ModelSettings(id=str(tiny.triposr_dir)),
                triposr=TripoSRSettings(rembg_model_path=tiny.u2net_path),
                server=MeshServerSettings(port=0, metrics_enabled=False),
                runtime=RuntimeSettings(device="cpu", keep_alive=keep_alive),
            ),
        )
    )


async def first_result(call: Any) -> float:
    started = time.perf_counter()
    async for event in call:
        if event.WhichOneof("event") == "result":
            return time.perf_counter() - started
    raise RuntimeError("the stream ended without a result")


async def wait_unloaded(server: KilnServer) -> None:
    for _ in range(6000):  # polled: the manager has no event for "unloaded"; 60 s at most
        if server.runtime.manager.state is ModelState.UNLOADED:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the keep_alive=0 server did not unload within 60 s")


async def compare(
    name: str,
    build: Callable[[Path, float | None], KilnServer],
    generate: Callable[[grpc.aio.Channel], Awaitable[float]],
    runs: int,
) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        warm, cold = build(Path(data_dir) / "warm", None), build(Path(data_dir) / "cold", 0.0)
        ports = [await server.start() for server in (warm, cold)]
        for server in (warm, cold):
            await server.runtime.manager.wait_loaded()
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as warm_channel,
            grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as cold_channel,
        ):
            await generate(warm_channel)  # first-run costs (kernels, allocator) off the measurements
            await generate(cold_channel)
            loaded, unloaded = [], []
            for _ in range(runs):  # alternate, so that machine noise hits both alike
                loaded.append(await generate(warm_channel))
                await wait_unloaded(cold)
                unloaded.append(await generate(cold_channel))
        load_s = cold.runtime.manager.last_load_s or 0.0
        loads = cold.runtime.metrics.registry.get_sample_value(
            "kiln_model_loads_total", {"service": cold.runtime.name, "result": "ok"}
        )
        for server in (warm, cold):
            await server.stop(grace=0)
    loaded_s, unloaded_s = statistics.median(loaded), statistics.median(unloaded)
    print(f"{name}: {runs} jobs each, loads on the keep_alive=0 server: {loads:.0f}")
    print(f"  loaded (keep_alive unset)  median {loaded_s * 1000:8.1f} ms to the result")
    print(f"  unloaded (keep_alive 0)    median {unloaded_s * 1000:8.1f} ms to the result")
    print(f"  ratio unloaded/loaded             {unloaded_s / loaded_s:8.2f} x   (last load {load_s * 1000:.0f} ms)")


async def img2img_job(channel: grpc.aio.Channel) -> float:
    request = img2img_pb.GenerateRequest(
        image=object_png(64),
        prompt="a lighthouse",
        seed=3,
        num_inference_steps=4,
        scheduler=img2img_pb.SCHEDULER_EULER,
        output_format=img2img_pb.IMAGE_FORMAT_PNG,
    )
    return await first_result(img2img_grpc.Img2ImgProviderStub(channel).Generate(request))


async def mesh_job(channel: grpc.aio.Channel) -> float:
    request = mesh_pb.GenerateRequest(image=object_png(96), output_format=mesh_pb.MESH_FORMAT_GLB, mc_resolution=48)
    return await first_result(mesh_grpc.MeshProviderStub(channel).Generate(request))


async def main(runs: int, threads: int) -> None:
    torch.set_num_threads(threads)
    print(f"cold start on the CPU, tiny models, {threads} torch threads")
    await compare("img2img tiny SD1.5, 64x64, 4 steps", img2img_server, img2img_job, runs)
    await compare("mesh tiny TripoSR + u2net, resolution 48", mesh_server, mesh_job, runs)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=8, help="jobs per server")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.runs, arguments.threads))
