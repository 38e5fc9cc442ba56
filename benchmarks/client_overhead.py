"""What the typed client costs per job, against the raw generated stub in the same process.

Starts the img2img server with the fake provider (2 instant steps, a 4 KiB artifact, so the
per-call overhead dominates) as a separate process, then alternates whole Generate jobs through
the raw stub (iterate to the result, nothing checked) and through `Img2ImgClient.generate_image`
(typed result, in-band error check, SHA-256 verification); the same for the asyncio forms.
Prints medians, p90s and the client/raw ratio.

    python benchmarks/client_overhead.py [--jobs 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from gateway_overhead import png, start_server, wait_serving

from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_client import AsyncImg2ImgClient, Img2ImgClient

IMAGE = png()
REQUEST = pb.GenerateRequest(
    image=IMAGE, prompt="bench", scheduler=pb.SCHEDULER_EULER, output_format=pb.IMAGE_FORMAT_PNG
)


def _summary(name: str, samples: list[float]) -> float:
    median = statistics.median(samples)
    p90 = statistics.quantiles(samples, n=10)[-1]
    print(f"  {name:<28} median {median:6.2f} ms   p90 {p90:6.2f} ms")
    return median


def sync_pair(target: str, jobs: int) -> tuple[list[float], list[float]]:
    raw_samples, client_samples = [], []
    with grpc.insecure_channel(target) as channel, Img2ImgClient(target, timeout=30) as client:
        stub = pb_grpc.Img2ImgProviderStub(channel)
        for index in range(jobs + 20):
            started = time.perf_counter()
            for event in stub.Generate(REQUEST, timeout=30):
                if event.WhichOneof("event") == "result":
                    break
            raw = time.perf_counter() - started
            started = time.perf_counter()
            client.generate_image(IMAGE, prompt="bench")
            typed = time.perf_counter() - started
            if index >= 20:  # the first calls warm both channels
                raw_samples.append(raw * 1000)
                client_samples.append(typed * 1000)
    return raw_samples, client_samples


async def async_pair(target: str, jobs: int) -> tuple[list[float], list[float]]:
    raw_samples, client_samples = [], []
    async with grpc.aio.insecure_channel(target) as channel, AsyncImg2ImgClient(target, timeout=30) as client:
        stub = pb_grpc.Img2ImgProviderStub(channel)

        async def raw_job() -> None:
            async for event in stub.Generate(REQUEST, timeout=30):
                if event.WhichOneof("event") == "result":
                    break

        async def client_job() -> None:
            await client.generate_image(IMAGE, prompt="bench")

        async def timed(job: Callable[[], Awaitable[None]]) -> float:
            started = time.perf_counter()
            await job()
            return (time.perf_counter() - started) * 1000

        for index in range(jobs + 20):
            raw, typed = await timed(raw_job), await timed(client_job)
            if index >= 20:
                raw_samples.append(raw)
                client_samples.append(typed)
    return raw_samples, client_samples


async def main(jobs: int) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        process, port = await start_server(Path(data_dir))
        target = f"127.0.0.1:{port}"
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                await wait_serving(channel)
            sync_raw, sync_client = await asyncio.to_thread(sync_pair, target, jobs)
            async_raw, async_client = await async_pair(target, jobs)
        finally:
            process.terminate()
            await process.wait()
    print(f"whole Generate jobs (fake provider, 2 steps, 4 KiB PNG), {jobs} alternating pairs each")
    raw = _summary("raw stub, sync", sync_raw)
    typed = _summary("Img2ImgClient.generate_image", sync_client)
    print(f"  ratio client/raw (sync)      {typed / raw:.3f}x  ({typed - raw:+.2f} ms)")
    raw = _summary("raw stub, grpc.aio", async_raw)
    typed = _summary("AsyncImg2ImgClient", async_client)
    print(f"  ratio client/raw (asyncio)   {typed / raw:.3f}x  ({typed - raw:+.2f} ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300, help="alternating pairs per client kind")
    asyncio.run(main(parser.parse_args().jobs))
