"""What the Envoy gateway adds to a call, against the same call made to the server directly.

Starts `python -m kiln_img2img` (fake provider: 2 steps, no delay, a small result) in its own
process on a free loopback port, so this client's event loop does not share a core with the
server's, and an Envoy gateway in front of it (`gateway.kiln_gateway.Envoy`, free ports). Then,
interleaving the variants in rounds so that machine noise hits all of them alike, measures:

- unary `GetInfo`: the same grpc.aio client code on two channels, direct and through Envoy;
  median and p99 of each, and the median latency Envoy adds (goal <= 0.3 ms);
- time to the first event of a `Generate` stream: gRPC direct, gRPC via Envoy, binary
  gRPC-Web via Envoy (httpx, until the first data frame is complete) and JSON/SSE via Envoy
  (httpx, until the first `data:` line); medians and their ratios against gRPC direct. Each
  stream is read to its end before the next starts. The httpx variants include httpx's own
  cost, which is larger than grpcio's.

    python benchmarks/gateway_overhead.py [--calls 1000]

`--calls` is the number of unary calls per variant; streams get a fifth of it (at least 20).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for gateway.kiln_gateway

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from gateway.kiln_gateway import Envoy, GatewaySettings
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc

SERVICE = "kiln.img2img.v1.Img2ImgProvider"
ROUNDS = 10
GOAL_ADDED_MS = 0.3

Probe = Callable[[], Awaitable[float]]


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 20, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


async def start_server(data_dir: Path) -> tuple[asyncio.subprocess.Process, int]:
    env = {
        **os.environ,
        "OMP_WAIT_POLICY": "PASSIVE",
        "KILN_STORAGE__DATA_DIR": str(data_dir),
        "KILN_IMG2IMG__PROVIDER": "fake",
        "KILN_IMG2IMG__SERVER__PORT": "0",
        "KILN_IMG2IMG__SERVER__METRICS_ENABLED": "false",
        "KILN_IMG2IMG__FAKE__STEPS": "2",
        "KILN_IMG2IMG__FAKE__STEP_DELAY_S": "0",
        "KILN_IMG2IMG__FAKE__OUTPUT_BYTES": "4096",
        # INFO: the "serving on" line is needed; access logs cost the same on every path.
        "KILN_TELEMETRY__LOG_LEVEL": "INFO",
    }
    # The log goes to a file, not a pipe: draining a pipe would put the server's log lines
    # on this client's event loop, inside the timings.
    log_path = data_dir / "server.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "kiln_img2img", env=env, stderr=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in log_path.read_text().split("\n")[:-1]:  # whole lines only
            message = json.loads(line)["message"]
            if "serving on" in message:
                return process, int(message.split(":")[1].split()[0])
        if process.returncode is not None:
            break
        await asyncio.sleep(0.05)
    process.terminate()
    raise SystemExit(f"server did not listen:\n{log_path.read_text()[-4000:]}")


async def wait_serving(channel: grpc.aio.Channel) -> None:
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE))
    while (await watch.read()).status != health_pb2.HealthCheckResponse.SERVING:
        pass
    watch.cancel()


def unary_probe(stub: pb_grpc.Img2ImgProviderStub) -> Probe:
    request = pb.GetInfoRequest()

    async def probe() -> float:
        started = time.perf_counter()
        await stub.GetInfo(request, timeout=5)
        return time.perf_counter() - started

    return probe


def grpc_stream_probe(stub: pb_grpc.Img2ImgProviderStub, request: pb.GenerateRequest) -> Probe:
    async def probe() -> float:
        started = time.perf_counter()
        call = stub.Generate(request, timeout=10)
        await call.read()
        first = time.perf_counter() - started
        while await call.read() is not grpc.aio.EOF:
            pass
        return first

    return probe


def grpc_web_probe(client: httpx.AsyncClient, request: pb.GenerateRequest) -> Probe:
    message = request.SerializeToString()
    body = b"\x00" + struct.pack(">I", len(message)) + message
    headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1", "te": "trailers"}

    async def probe() -> float:
        started = time.perf_counter()
        first = 0.0
        received = b""
        async with client.stream("POST", f"/{SERVICE}/Generate", content=body, headers=headers) as response:
            async for chunk in response.aiter_raw():
                if not first:
                    received += chunk
                    if len(received) >= 5 and len(received) >= 5 + struct.unpack(">I", received[1:5])[0]:
                        first = time.perf_counter() - started
                        if received[0] != 0:
                            raise SystemExit(f"gRPC-Web: the first frame is not data: {received[:80]!r}")
        if not first:
            raise SystemExit(f"gRPC-Web: no data frame ({response.status_code}, {received[:200]!r})")
        return first

    return probe


def sse_probe(client: httpx.AsyncClient, image: bytes) -> Probe:
    body = {
        "image": base64.b64encode(image).decode(),
        "prompt": "gateway",
        "scheduler": "SCHEDULER_EULER",
        "outputFormat": "IMAGE_FORMAT_PNG",
    }

    async def probe() -> float:
        started = time.perf_counter()
        first = 0.0
        async with client.stream("POST", "/v1/img2img:generate", json=body) as response:
            async for line in response.aiter_lines():
                if not first and line.startswith("data:"):
                    first = time.perf_counter() - started
        if not first:
            raise SystemExit(f"JSON/SSE: no data line ({response.status_code})")
        return first

    return probe


async def interleaved(probes: dict[str, Probe], calls: int, warmup: int) -> dict[str, list[float]]:
    """Run every probe `calls` times in ROUNDS rounds, variant after variant; samples in ms."""
    for probe in probes.values():
        for _ in range(warmup):
            await probe()
    samples: dict[str, list[float]] = {name: [] for name in probes}
    per_round = -(-calls // ROUNDS)
    for _ in range(ROUNDS):
        for name, probe in probes.items():
            for _ in range(per_round):
                samples[name].append(await probe() * 1000)
    return samples


def percentile(samples: list[float], q: int) -> float:
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def print_ratios(results: dict[str, list[float]], baseline_name: str, width: int) -> None:
    """One line per variant: median, p99, and the median as a ratio of (and difference to) the baseline's."""
    baseline = statistics.median(results[baseline_name])
    for name, samples in results.items():
        median = statistics.median(samples)
        print(
            f"  {name:<{width}} median {median:6.3f} ms   p99 {percentile(samples, 99):6.3f} ms"
            f"   {median / baseline:5.2f} x   ({median - baseline:+6.3f} ms)"
        )


async def main(calls: int) -> None:
    stream_calls = max(calls // 5, 20)
    image = png()
    request = pb.GenerateRequest(
        image=image, prompt="gateway", scheduler=pb.SCHEDULER_EULER, output_format=pb.IMAGE_FORMAT_PNG
    )
    with tempfile.TemporaryDirectory() as data_dir:
        process, port = await start_server(Path(data_dir))
        upstream = f"127.0.0.1:{port}"
        # The mesh cluster points at the same server: it must render, and nothing here calls it.
        settings = GatewaySettings(
            _env_file=None,
            port=0,
            admin_port=0,
            img2img_upstreams=[upstream],
            mesh_upstreams=[upstream],
        )
        try:
            with Envoy(settings) as envoy:
                gateway = f"127.0.0.1:{envoy.port}"
                async with (
                    grpc.aio.insecure_channel(upstream) as direct_channel,
                    grpc.aio.insecure_channel(gateway) as envoy_channel,
                    httpx.AsyncClient(base_url=f"http://{gateway}", timeout=10) as http,
                ):
                    await wait_serving(direct_channel)
                    direct = pb_grpc.Img2ImgProviderStub(direct_channel)
                    via_envoy = pb_grpc.Img2ImgProviderStub(envoy_channel)
                    unary = await interleaved(
                        {"direct": unary_probe(direct), "envoy": unary_probe(via_envoy)}, calls, warmup=100
                    )
                    streams = await interleaved(
                        {
                            "gRPC direct": grpc_stream_probe(direct, request),
                            "gRPC via Envoy": grpc_stream_probe(via_envoy, request),
                            "gRPC-Web via Envoy": grpc_web_probe(http, request),
                            "JSON/SSE via Envoy": sse_probe(http, image),
                        },
                        stream_calls,
                        warmup=20,
                    )
        finally:
            process.terminate()
            await process.wait()

    print(f"unary GetInfo, {len(unary['direct'])} calls each, interleaved in {ROUNDS} rounds")
    for name, samples in unary.items():
        print(f"  {name:<8} median {statistics.median(samples):6.3f} ms   p99 {percentile(samples, 99):6.3f} ms")
    added = statistics.median(unary["envoy"]) - statistics.median(unary["direct"])
    ratio = statistics.median(unary["envoy"]) / statistics.median(unary["direct"])
    verdict = "met" if added <= GOAL_ADDED_MS else "NOT met"
    print(f"  Envoy adds (median) {added:6.3f} ms = {ratio:.2f} x   (goal <= {GOAL_ADDED_MS} ms: {verdict})")

    print(f"time to the first Generate event, {stream_calls} streams each (fake, 2 steps, no delay)")
    print_ratios(streams, "gRPC direct", 19)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="unary calls per variant; streams get a fifth")
    asyncio.run(main(max(parser.parse_args().calls, 100)))
