"""CPU a request refused for capacity costs the server, by image size, in one process.

Starts a real img2img server (fake provider) on a loopback port with one slot and no queue,
keeps the slot busy with a long job, then sends Generate requests that must be refused
(RESOURCE_EXHAUSTED / CAPACITY) and measures the process CPU time (`time.process_time`, every
thread: grpc's, the event loop's and the decode pool's) per refused request. The baseline is
a refused request with a tiny PNG; the figure that matters is a refused ~20 MiB JPEG against it.
Decoding the image before admission made that ratio large; checking only the header keeps it
near the cost of receiving the bytes.

    python benchmarks/refused_upload_cpu.py [--runs 10]
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import grpc
import numpy as np
from PIL import Image

from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img.config import Img2ImgProviderSettings, Img2ImgSettings
from kiln_img2img.server import create_server
from kiln_runtime.images import decode_image
from kiln_runtime.settings import FakeProviderSettings, ModelSettings, RuntimeSettings, ServerSettings, StorageSettings

MiB = 1 << 20


def photo_jpeg(target_bytes: int) -> bytes:
    """A JPEG of noise (no shortcuts for the decoder) just under `target_bytes`."""
    rng = np.random.default_rng(0)
    side = 1024
    while True:
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=100)
        data = buffer.getvalue()
        if len(data) > target_bytes:
            side = int(side * (target_bytes / len(data)) ** 0.5) - 8
            continue
        if len(data) > target_bytes * 0.95:
            return data
        side = int(side * (target_bytes / len(data)) ** 0.5)


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def request(image: bytes, prompt: str = "a fox") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        image=image, prompt=prompt, scheduler=pb.SCHEDULER_EULER, output_format=pb.IMAGE_FORMAT_PNG
    )


async def refused_cpu(stub: pb_grpc.Img2ImgProviderStub, body: pb.GenerateRequest, runs: int) -> float:
    """Median process CPU seconds per refused call."""
    samples = []
    for _ in range(runs):
        cpu = time.process_time()
        try:
            async for _event in stub.Generate(body):
                raise AssertionError("the request was admitted; the slot should be busy")
        except grpc.aio.AioRpcError as err:
            if err.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
        samples.append(time.process_time() - cpu)
    return statistics.median(samples)


async def main(runs: int) -> None:
    big = photo_jpeg(20 * MiB - 64 * 1024)
    with tempfile.TemporaryDirectory() as tmp:
        settings = Img2ImgSettings(
            _env_file=None,
            offline=True,
            storage=StorageSettings(data_dir=Path(tmp)),
            img2img=Img2ImgProviderSettings(
                provider="fake",
                model=ModelSettings(id="unused"),
                server=ServerSettings(host="127.0.0.1", port=0, metrics_port=0),
                runtime=RuntimeSettings(max_concurrency=1, max_queue=0),
                fake=FakeProviderSettings(steps=1000, step_delay_s=0.1),
            ),
        )
        server = create_server(settings)
        port = await server.start()
        await server.runtime.manager.wait_loaded()
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            stub = pb_grpc.Img2ImgProviderStub(channel)
            busy = stub.Generate(request(tiny_png(), "hold the slot"))
            await busy.read()  # accepted: the one slot is taken for the rest of the run
            tiny_body, big_body = request(tiny_png()), request(big)
            await refused_cpu(stub, big_body, 2)  # warm-up
            tiny_s = await refused_cpu(stub, tiny_body, runs)
            big_s = await refused_cpu(stub, big_body, runs)
            busy.cancel()
        await server.stop(grace=0)
    print(f"refused request, tiny PNG ({len(tiny_png())} B): {tiny_s * 1e3:.2f} ms CPU (median of {runs})")
    print(f"refused request, JPEG of {len(big) / MiB:.1f} MiB: {big_s * 1e3:.2f} ms CPU")
    print(f"ratio big / tiny: {big_s / tiny_s:.1f}x")
    decode = time.process_time()
    decode_image(big, max_bytes=len(big), max_pixels=1 << 30)
    decode_s = time.process_time() - decode
    # What deciding after a full decode (the order before admission came first) adds per refusal.
    print(f"a full decode of that JPEG, skipped by the refusal: {decode_s * 1e3:.2f} ms CPU")
    print(f"refusal cost with the decode first / header only: {(big_s + decode_s) / big_s:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    asyncio.run(main(parser.parse_args().runs))
