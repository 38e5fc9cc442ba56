"""What the gateway's edge security adds to a call: API-key auth, and TLS on top of it.

Starts `python -m kiln_img2img` (fake provider: 2 steps, no delay, a small result) in its own
process, as `gateway_overhead.py` does, and three Envoy gateways in front of that one server:

- plain: plaintext listener, auth mode none (the baseline);
- key: plaintext listener, auth mode api_key (every call carries `authorization: Bearer <key>`);
- TLS+key: HTTPS listener (development CA, ALPN h2) and auth mode api_key.

Interleaving the variants in rounds so that machine noise hits all of them alike, it measures the
unary `GetInfo` round trip and the time to the first event of a `Generate` stream over gRPC,
and prints medians, p99 and the ratio of each variant against plain. Channels are opened once,
so the TLS figures are the cost per call on an open connection (record encryption, no
handshake). The gateway talks plaintext to the server in every variant: upstream TLS is not
measured here.

    python benchmarks/edge_overhead.py [--calls 1000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root (gateway, deploy)

import grpc

# The sibling script (this folder is on sys.path when a script in it runs): the same server
# process, readiness wait and interleaved timing as the gateway's own overhead benchmark.
from gateway_overhead import ROUNDS, Probe, interleaved, png, print_ratios, start_server, wait_serving

from deploy.dev_ca import issue, make_ca
from gateway.kiln_gateway import Envoy, GatewaySettings
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc

API_KEY = "bench-key-0123456789abcdef"
#: Seconds the server may take to report SERVING; a hung start fails instead of waiting forever.
READY_TIMEOUT_S = 60
Metadata = tuple[tuple[str, str], ...]


def unary_probe(stub: pb_grpc.Img2ImgProviderStub, metadata: Metadata) -> Probe:
    request = pb.GetInfoRequest()

    async def probe() -> float:
        started = time.perf_counter()
        await stub.GetInfo(request, timeout=5, metadata=metadata)
        return time.perf_counter() - started

    return probe


def stream_probe(stub: pb_grpc.Img2ImgProviderStub, request: pb.GenerateRequest, metadata: Metadata) -> Probe:
    async def probe() -> float:
        started = time.perf_counter()
        call = stub.Generate(request, timeout=10, metadata=metadata)
        await call.read()
        first = time.perf_counter() - started
        while await call.read() is not grpc.aio.EOF:
            pass
        return first

    return probe


@asynccontextmanager
async def gateway(upstream: str, **fields: Any) -> AsyncIterator[Envoy]:
    """An Envoy in front of `upstream`, started in a thread (the loop stays free)."""
    settings = GatewaySettings(
        _env_file=None, port=0, admin_port=0, img2img_upstreams=[upstream], mesh_upstreams=[upstream], **fields
    )
    envoy = Envoy(settings)
    await asyncio.to_thread(envoy.start)
    try:
        yield envoy
    finally:
        await asyncio.to_thread(envoy.stop)


async def main(calls: int) -> None:
    stream_calls = max(calls // 5, 20)
    request = pb.GenerateRequest(
        image=png(), prompt="edge", scheduler=pb.SCHEDULER_EULER, output_format=pb.IMAGE_FORMAT_PNG
    )
    bearer: Metadata = (("authorization", f"Bearer {API_KEY}"),)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        ca = make_ca(root / "pki")
        cert = issue(ca, root / "pki", "gateway")
        keys = root / "api_keys"
        keys.write_text(f"bench {API_KEY}\n")
        auth = {"mode": "api_key", "api_keys_file": keys}
        process, port = await start_server(root)
        upstream = f"127.0.0.1:{port}"
        try:
            async with AsyncExitStack() as stack:
                plain = await stack.enter_async_context(gateway(upstream))
                keyed = await stack.enter_async_context(gateway(upstream, auth=auth))
                tls = await stack.enter_async_context(
                    gateway(upstream, auth=auth, tls={"cert_file": cert.cert, "key_file": cert.key})
                )
                credentials = grpc.ssl_channel_credentials(ca.cert.read_bytes())
                channels = {
                    "plain": await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{plain.port}")),
                    "key": await stack.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{keyed.port}")),
                    "TLS+key": await stack.enter_async_context(
                        grpc.aio.secure_channel(f"localhost:{tls.port}", credentials)
                    ),
                }
                direct = await stack.enter_async_context(grpc.aio.insecure_channel(upstream))
                await asyncio.wait_for(wait_serving(direct), READY_TIMEOUT_S)
                metadata: dict[str, Metadata] = {"plain": (), "key": bearer, "TLS+key": bearer}
                stubs = {name: pb_grpc.Img2ImgProviderStub(channel) for name, channel in channels.items()}
                unary = await interleaved(
                    {name: unary_probe(stub, metadata[name]) for name, stub in stubs.items()}, calls, warmup=50
                )
                streams = await interleaved(
                    {name: stream_probe(stub, request, metadata[name]) for name, stub in stubs.items()},
                    stream_calls,
                    warmup=10,
                )
        finally:
            process.terminate()
            await process.wait()

    for title, results in (
        (f"unary GetInfo, {len(unary['plain'])} calls each, interleaved in {ROUNDS} rounds", unary),
        (f"time to the first Generate event, {len(streams['plain'])} streams each (fake, 2 steps)", streams),
    ):
        print(title)
        print_ratios(results, "plain", 8)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="unary calls per variant; streams get a fifth")
    parser.add_argument("--quick", action="store_true", help="a short run (100 calls) to check it works")
    options = parser.parse_args()
    asyncio.run(main(100 if options.quick else max(options.calls, 100)))
