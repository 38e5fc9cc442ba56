"""Dynamic batching, on vs off: images/s and p50/p95 latency at 1, 4 and 16 concurrent clients.

Each setting starts a real img2img server in this process (local provider, gRPC on a loopback
port) and every client sends same-shape requests one after another (closed loop, own seeds):

- off: today's default serving, `max_concurrency` 1 and no batching (jobs queue and run alone);
- on:  `max_concurrency` = `max_batch_size` = the most clients, `max_batch_delay_ms` from the flag.

The ratio column is images/s on / off at the same client count. CPU, tiny SD1.5-shaped model:

    python benchmarks/img2img_batching.py [--side 128] [--steps 8] [--threads 2]

On a CUDA machine with the full-size SD1.5 architecture (random weights written to a temporary
folder by benchmarks/gpu/random_models.py, nothing downloaded):

    python benchmarks/img2img_batching.py --full-size --side 512 --steps 50

`run_device(...)` is the entry point benchmarks/gpu/device_check.py calls with its own model folder.
Settings not set here (compilation, dtype) come from the environment like in production.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import grpc
import torch
from PIL import Image

from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img.config import Img2ImgSettings
from kiln_img2img.server import create_server
from kiln_img2img.testing.tiny_models import default_root, ensure_tiny_models

CLIENTS: tuple[int, ...] = (1, 4, 16)
STRENGTH, GUIDANCE = 0.75, 7.5


class Level(NamedTuple):
    """One measurement: a batching setting at one client count.

    (Not a dataclass: device_check.py loads this file without registering it in sys.modules,
    where dataclasses cannot resolve postponed annotations.)
    """

    batching: bool
    clients: int
    images: int
    wall_s: float
    latencies_s: list[float]

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Server settings for one run; a variable the caller already set wins (e.g. compile options)."""
    added = {key: value for key, value in values.items() if key not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def input_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.radial_gradient("L").resize((side, side)).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


async def generate(stub: pb_grpc.Img2ImgProviderStub, request: pb.GenerateRequest) -> None:
    async for event in stub.Generate(request):
        if event.WhichOneof("event") == "result":
            return
    raise RuntimeError("the stream ended without a result")


async def measure(
    folder: Path,
    device: str,
    data_dir: Path,
    *,
    batching: bool,
    side: int,
    steps: int,
    clients: Sequence[int],
    requests_per_level: int,
    delay_ms: float,
) -> list[Level]:
    most = max(clients)
    settings_env = {
        "KILN_OFFLINE": "true",
        "KILN_STORAGE__DATA_DIR": str(data_dir),
        "KILN_IMG2IMG__PROVIDER": "local",
        "KILN_IMG2IMG__MODEL__ID": str(folder),
        "KILN_IMG2IMG__SERVER__PORT": "0",
        "KILN_IMG2IMG__SERVER__METRICS_ENABLED": "false",
        "KILN_IMG2IMG__RUNTIME__DEVICE": device,
        "KILN_IMG2IMG__RUNTIME__MAX_CONCURRENCY": str(most if batching else 1),
        "KILN_IMG2IMG__RUNTIME__MAX_QUEUE": str(2 * most),
        "KILN_IMG2IMG__BATCHING__MAX_BATCH_SIZE": str(most if batching else 1),
        "KILN_IMG2IMG__BATCHING__MAX_BATCH_DELAY_MS": str(delay_ms),
    }
    with environment(settings_env):
        settings = Img2ImgSettings(_env_file=None)
    server = create_server(settings)
    port = await server.start()
    await server.runtime.manager.wait_loaded()
    png = input_png(side)

    def request(seed: int) -> pb.GenerateRequest:
        return pb.GenerateRequest(
            image=png,
            prompt="a lighthouse at dusk",
            negative_prompt="blurry",
            seed=seed,
            strength=STRENGTH,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            scheduler=pb.SCHEDULER_EULER,
            output_format=pb.IMAGE_FORMAT_PNG,
        )

    levels: list[Level] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.Img2ImgProviderStub(channel)
            await asyncio.gather(*(generate(stub, request(seed)) for seed in range(most)))  # warm every batch size
            for count in clients:
                per_client = max(1, -(-max(requests_per_level, 2 * count) // count))
                latencies: list[float] = []

                async def client(index: int, per_client: int = per_client, latencies: list[float] = latencies) -> None:
                    for n in range(per_client):
                        started = time.perf_counter()
                        await generate(stub, request(1000 * index + n))
                        latencies.append(time.perf_counter() - started)

                started = time.perf_counter()
                await asyncio.gather(*(client(i) for i in range(count)))
                wall = time.perf_counter() - started
                levels.append(Level(batching, count, count * per_client, wall, latencies))
    finally:
        await server.stop(grace=0)
    return levels


def run(
    folder: Path,
    device: str,
    *,
    side: int,
    steps: int,
    clients: Sequence[int] = CLIENTS,
    requests_per_level: int = 16,
    delay_ms: float = 10.0,
) -> list[Level]:
    """Batching off, then on, in this process; returns every level of both."""
    with tempfile.TemporaryDirectory() as scratch:
        levels: list[Level] = []
        for batching in (False, True):
            levels += asyncio.run(
                measure(
                    folder,
                    device,
                    Path(scratch) / ("on" if batching else "off"),
                    batching=batching,
                    side=side,
                    steps=steps,
                    clients=clients,
                    requests_per_level=requests_per_level,
                    delay_ms=delay_ms,
                )
            )
        return levels


def table(levels: Sequence[Level]) -> list[str]:
    off = {level.clients: level for level in levels if not level.batching}
    lines = [f"{'batching':>8} {'clients':>7} {'images':>6} {'images/s':>9} {'p50 s':>8} {'p95 s':>8} {'on/off':>7}"]
    for level in levels:
        ratio = f"{level.images_per_s / off[level.clients].images_per_s:6.2f}x" if level.batching else ""
        lines.append(
            f"{'on' if level.batching else 'off':>8} {level.clients:>7} {level.images:>6} "
            f"{level.images_per_s:>9.2f} {level.percentile(0.5):>8.3f} {level.percentile(0.95):>8.3f} {ratio:>7}"
        )
    return lines


def run_device(
    folder: Path, device: str, dtype: torch.dtype, side: int, steps: int, strength: float, guidance: float
) -> list[tuple[str, float | None, str]]:
    """benchmarks/gpu/device_check.py's entry point: rows of (measurement, seconds, value).

    Called from inside that script's event loop, so the servers run in a thread of their own.
    `dtype` and `strength`/`guidance` are the device check's (the server's dtype comes from its
    settings; this benchmark's workload uses the same strength 0.75 and CFG 7.5).
    """
    del dtype, strength, guidance
    clients = CLIENTS if device == "cuda" else (1, 2)  # the CPU dry run only checks that it works
    requests = 8 if device == "cuda" else 2  # on CUDA: 8, 8 and 32 images a setting, within the check's budget
    with ThreadPoolExecutor(1) as pool:
        levels = pool.submit(
            run, folder, device, side=side, steps=steps, clients=clients, requests_per_level=requests
        ).result()
    off = {level.clients: level for level in levels if not level.batching}
    rows: list[tuple[str, float | None, str]] = []
    for level in levels:
        name = f"batching {'on ' if level.batching else 'off'} {level.clients:>2} clients"
        value = f"{level.images_per_s:.2f} images/s, p95 {level.percentile(0.95):.3f} s"
        if level.batching:
            value += f", {level.images_per_s / off[level.clients].images_per_s:.2f}x off"
        rows.append((name, level.percentile(0.5), value))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--side", type=int, default=128, help="input and output side in pixels")
    parser.add_argument("--steps", type=int, default=8, help="num_inference_steps (x strength 0.75 run)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--requests", type=int, default=16, help="requests per client count (at least 2 a client)")
    parser.add_argument("--delay-ms", type=float, default=10.0, help="max_batch_delay_ms with batching on")
    parser.add_argument(
        "--full-size",
        action="store_true",
        help="SD1.5's full-size architecture with random weights on CUDA (needs benchmarks/gpu/random_models.py)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.full_size:
            if not torch.cuda.is_available():
                print("--full-size needs a CUDA device", file=sys.stderr)
                return 2
            sys.path.insert(0, str(Path(__file__).parent / "gpu"))
            import random_models

            folder = random_models.write_sd15(Path(scratch) / "sd15", full=True, device="cuda", dtype=torch.float16)
            device, label = "cuda", f"SD1.5 full-size architecture, random weights, {torch.cuda.get_device_name()}"
        else:
            folder = ensure_tiny_models(default_root()).diffusers_dir
            device, label = "cpu", f"tiny SD1.5-shaped model, CPU, {args.threads} torch threads"
        began = time.perf_counter()
        levels = run(
            folder,
            device,
            side=args.side,
            steps=args.steps,
            requests_per_level=args.requests,
            delay_ms=args.delay_ms,
        )
    print(
        f"img2img batching: {label}; {args.side}x{args.side}, {args.steps} steps x strength {STRENGTH}, CFG {GUIDANCE}"
    )
    print("off: max_concurrency 1, no batching; on: max_concurrency = max_batch_size = 16")
    for line in table(levels):
        print("  " + line)
    print(f"  (wall time {time.perf_counter() - began:.0f} s; latencies per request, end to end over gRPC)")
    print(f"  median of all on/off ratios: {statistics.median(on_off(levels)):.2f}x")
    return 0


def on_off(levels: Sequence[Level]) -> list[float]:
    off = {level.clients: level for level in levels if not level.batching}
    return [level.images_per_s / off[level.clients].images_per_s for level in levels if level.batching]


if __name__ == "__main__":
    raise SystemExit(main())
