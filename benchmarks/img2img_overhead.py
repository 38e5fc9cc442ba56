"""What Kiln's img2img path costs on top of calling diffusers directly, in one process.

Runs the same job (tiny SD1.5-shaped model, 128x128, 8 steps, Euler, CFG on, PNG out)
alternately through the gRPC `Generate` stream of a real server on a loopback port and
through the same pipeline called directly, and prints the medians and their ratio
(goal <= 1.03x), then the cost of one latent preview against one denoising step (goal < 5%).

    python benchmarks/img2img_overhead.py [--runs 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import grpc
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image

from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img.config import DiffusersSettings, Img2ImgProviderSettings, Img2ImgSettings
from kiln_img2img.preprocess import prepare_image
from kiln_img2img.preview import latents_to_preview
from kiln_img2img.server import create_server
from kiln_img2img.testing.tiny_models import default_root, ensure_tiny_models
from kiln_runtime.settings import ModelSettings, ServerSettings, StorageSettings

SIDE, STEPS, STRENGTH, GUIDANCE, SEED = 128, 8, 0.75, 7.5, 42


def input_png() -> bytes:
    buffer = io.BytesIO()
    Image.radial_gradient("L").resize((SIDE, SIDE)).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def direct_run(pipe: Any, image: Image.Image) -> bytes:
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.inference_mode():
        out = pipe(
            prompt="a lighthouse at dusk",
            negative_prompt="blurry",
            image=image,
            strength=STRENGTH,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images[0]
    buffer = io.BytesIO()
    out.save(buffer, format="PNG")
    return buffer.getvalue()


async def grpc_run(stub: pb_grpc.Img2ImgProviderStub, request: pb.GenerateRequest) -> bytes:
    data = b""
    async for event in stub.Generate(request):
        if event.WhichOneof("event") == "result":
            data = event.result.artifacts[0].inline_data
    return data


async def main(runs: int, threads: int) -> None:
    torch.set_num_threads(threads)
    tiny = ensure_tiny_models(default_root())
    png = input_png()
    image = prepare_image(Image.open(io.BytesIO(png))).image
    pipe: Any = StableDiffusionImg2ImgPipeline.from_pretrained(
        str(tiny.diffusers_dir),
        local_files_only=True,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Img2ImgSettings(
            _env_file=None,
            offline=True,
            storage=StorageSettings(data_dir=Path(data_dir)),
            img2img=Img2ImgProviderSettings(
                provider="local",
                model=ModelSettings(id=str(tiny.diffusers_dir)),
                diffusers=DiffusersSettings(),
                server=ServerSettings(port=0, metrics_enabled=False),
            ),
        )
        server = create_server(settings)
        port = await server.start()
        await server.runtime.manager.wait_loaded()
        request = pb.GenerateRequest(
            image=png,
            prompt="a lighthouse at dusk",
            negative_prompt="blurry",
            seed=SEED,
            strength=STRENGTH,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            scheduler=pb.SCHEDULER_EULER,
            output_format=pb.IMAGE_FORMAT_PNG,
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.Img2ImgProviderStub(channel)
            same = await grpc_run(stub, request) == await asyncio.to_thread(direct_run, pipe, image)  # warm both
            direct, via_grpc = [], []
            for _ in range(runs):  # alternate, so that machine noise hits both alike
                started = time.perf_counter()
                await asyncio.to_thread(direct_run, pipe, image)
                direct.append(time.perf_counter() - started)
                started = time.perf_counter()
                await grpc_run(stub, request)
                via_grpc.append(time.perf_counter() - started)
        await server.stop(grace=0)

    latents = torch.randn(1, 4, SIDE // 8, SIDE // 8)
    preview_costs = []
    for _ in range(200):
        started = time.perf_counter()
        latents_to_preview(latents)
        preview_costs.append(time.perf_counter() - started)

    direct_s, grpc_s = statistics.median(direct), statistics.median(via_grpc)
    steps_run = int(STEPS * STRENGTH)
    step_s = direct_s / steps_run
    preview_s = statistics.median(preview_costs)
    print(
        f"img2img tiny SD1.5, {SIDE}x{SIDE}, {STEPS} steps x strength {STRENGTH}, {runs} runs each, {threads} threads"
    )
    print(f"  identical PNG bytes (gRPC vs direct): {same}")
    print(f"  direct diffusers   median {direct_s * 1000:8.1f} ms")
    print(f"  gRPC Generate      median {grpc_s * 1000:8.1f} ms")
    print(f"  ratio gRPC/direct         {grpc_s / direct_s:8.3f} x   (goal <= 1.03 x)")
    print(f"  preview per step          {preview_s * 1000:8.2f} ms = {preview_s / step_s:.1%} of a step (goal < 5%)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=12, help="calls per path (at least 10)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for both paths")
    arguments = parser.parse_args()
    asyncio.run(main(max(arguments.runs, 10), arguments.threads))
