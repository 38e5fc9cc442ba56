"""Bytes in and out: upload and download throughput through the Envoy gateway against straight to the server.

Starts `python -m kiln_img2img` (fake provider) in its own process on a free loopback port and an
Envoy gateway in front of it (free ports), writes one random artifact (default 100 MB) into the
server's storage folder as a finished job would, then, alternating the variants in rounds so that
machine noise hits all of them alike, measures:

- download: `DownloadArtifact` over gRPC straight to the server, the same call through Envoy, and
  `GET /v1/artifacts/<id>` through Envoy (the transcoded HTTP download, read with httpx);
  each read to the end and checked against the artifact's SHA-256 once per variant;
- upload: a `Generate` request carrying a large `image` (default 16 MiB) over gRPC, straight and
  through Envoy, timed until the server's answer. The bytes are not an image, so the server
  refuses the request (INVALID_ARGUMENT) from the header, once all of it arrived: the time is
  the transport's, not a decoder's.

It prints each variant's median MB/s and its ratio to the direct path (1.00 = the gateway costs
nothing). Ratios, not absolute numbers, are what carries from one machine to another.

- presigned vs the gateway route: a second server on the S3 backend (a SeaweedFS `weed mini` on
  loopback, as the tests start it) and its own Envoy; the same artifact downloaded with
  `GET /v1/artifacts/<id>` through Envoy (the server reads the bucket) and with its presigned URL
  straight from the store (`--no-s3` skips this part).

    python benchmarks/artifact_io.py [--rounds 5] [--artifact-mb 100] [--upload-mib 16]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for gateway.kiln_gateway

import grpc
import httpx

from gateway.kiln_gateway import Envoy, GatewaySettings
from kiln.artifacts.v1 import artifact_service_pb2 as artifacts
from kiln.artifacts.v1 import artifact_service_pb2_grpc as artifacts_grpc
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_runtime.storage import LocalArtifactStore, StoredArtifact, new_job_id

MB = 1000 * 1000
MiB = 1 << 20
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * MiB), ("grpc.max_send_message_length", 64 * MiB)]

#: One measured transfer: returns the seconds it took.
Probe = Callable[[], Awaitable[float]]


@dataclass
class Variant:
    name: str
    probe: Probe
    seconds: list[float]


async def start_server(data_dir: Path, **extra_env: str) -> tuple[asyncio.subprocess.Process, int]:
    env = {
        **os.environ,
        "OMP_WAIT_POLICY": "PASSIVE",
        "KILN_STORAGE__DATA_DIR": str(data_dir),
        "KILN_STORAGE__OUTPUT_DIR": str(data_dir / "outputs"),
        "KILN_IMG2IMG__PROVIDER": "fake",
        "KILN_IMG2IMG__SERVER__PORT": "0",
        "KILN_IMG2IMG__SERVER__METRICS_ENABLED": "false",
        "KILN_TELEMETRY__LOG_LEVEL": "INFO",  # the "serving on" line is needed
        **extra_env,
    }
    # A log file, not a pipe: draining a pipe would put the server's log on this event loop.
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


def grpc_download(channel: grpc.aio.Channel, artifact: StoredArtifact, checked: set[str], name: str) -> Probe:
    stub = artifacts_grpc.ArtifactProviderStub(channel)
    request = artifacts.DownloadArtifactRequest(artifact_id=artifact.id)

    async def probe() -> float:
        digest = hashlib.sha256() if name not in checked else None
        started = time.perf_counter()
        async for body in stub.DownloadArtifact(request, timeout=300):
            if digest is not None:
                digest.update(body.data)
        elapsed = time.perf_counter() - started
        if digest is not None:
            if digest.hexdigest() != artifact.sha256:
                raise SystemExit(f"{name}: the downloaded bytes differ from the artifact")
            checked.add(name)
        return elapsed

    return probe


def http_download(client: httpx.AsyncClient, artifact: StoredArtifact, checked: set[str], name: str) -> Probe:
    async def probe() -> float:
        digest = hashlib.sha256() if name not in checked else None
        started = time.perf_counter()
        async with client.stream("GET", f"/v1/artifacts/{artifact.id}") as response:
            if response.status_code != 200 or response.headers.get("content-length") != str(artifact.size_bytes):
                raise SystemExit(f"{name}: HTTP {response.status_code}, headers {dict(response.headers)}")
            async for piece in response.aiter_raw():
                if digest is not None:
                    digest.update(piece)
        elapsed = time.perf_counter() - started
        if digest is not None:
            if digest.hexdigest() != artifact.sha256:
                raise SystemExit(f"{name}: the downloaded bytes differ from the artifact")
            checked.add(name)
        return elapsed

    return probe


def url_download(client: httpx.AsyncClient, url: str, artifact: StoredArtifact, checked: set[str], name: str) -> Probe:
    async def probe() -> float:
        digest = hashlib.sha256() if name not in checked else None
        started = time.perf_counter()
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise SystemExit(f"{name}: HTTP {response.status_code}")
            async for piece in response.aiter_raw():
                if digest is not None:
                    digest.update(piece)
        elapsed = time.perf_counter() - started
        if digest is not None:
            if digest.hexdigest() != artifact.sha256:
                raise SystemExit(f"{name}: the downloaded bytes differ from the artifact")
            checked.add(name)
        return elapsed

    return probe


async def presigned_against_gateway(data_dir: Path, payload: bytes, rounds: int) -> list[Variant]:
    """The S3 backend: the gateway route (the server reads the bucket) against the presigned URL."""
    from kiln_runtime.storage.s3 import S3ArtifactStore
    from tests.s3.seaweed import start_seaweedfs

    key, secret, bucket = "bench", "bench-secret-0123456789", "kiln-bench"
    credentials = {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    weed = await asyncio.to_thread(
        start_seaweedfs, data_dir / "seaweed", access_key=key, secret_key=secret, bucket=bucket
    )
    os.environ.update(credentials)  # this process's store reads the same standard chain
    store = S3ArtifactStore(bucket=bucket, prefix="bench/", endpoint_url=weed.endpoint)
    process = None
    try:
        artifact = await asyncio.to_thread(store.put, new_job_id(), "big.glb", payload, media_type="model/gltf-binary")
        (data_dir / "s3-server").mkdir()
        process, port = await start_server(
            data_dir / "s3-server",
            **credentials,
            KILN_STORAGE__BACKEND="s3",
            KILN_STORAGE__S3__ENDPOINT_URL=weed.endpoint,
            KILN_STORAGE__S3__BUCKET=bucket,
            KILN_STORAGE__S3__PREFIX="bench/",
        )
        settings = GatewaySettings(
            _env_file=None,
            port=0,
            admin_port=0,
            img2img_upstreams=[f"127.0.0.1:{port}"],
            mesh_upstreams=[f"127.0.0.1:{port}"],
            access_log=False,
        )
        with Envoy(settings) as envoy:
            checked: set[str] = set()
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}", timeout=300) as via_gateway,
                httpx.AsyncClient(timeout=300) as to_store,
            ):
                variants = [
                    Variant(
                        "HTTP GET /v1/artifacts, via Envoy", http_download(via_gateway, artifact, checked, "gw"), []
                    ),
                    Variant(
                        "HTTP GET presigned URL, the store",
                        url_download(to_store, artifact.uri, artifact, checked, "s3"),
                        [],
                    ),
                ]
                await measure(variants, rounds)
        return variants
    finally:
        if process is not None:
            process.terminate()
            await process.wait()
        store.close()
        await asyncio.to_thread(weed.stop)


def grpc_upload(channel: grpc.aio.Channel, payload: bytes) -> Probe:
    stub = pb_grpc.Img2ImgProviderStub(channel)
    request = pb.GenerateRequest(image=payload, prompt="bytes in", output_format=pb.IMAGE_FORMAT_PNG)

    async def probe() -> float:
        started = time.perf_counter()
        try:
            async for _ in stub.Generate(request, timeout=120):
                pass
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise SystemExit(f"upload: expected INVALID_ARGUMENT (not an image), got {error}") from None
        else:
            raise SystemExit("upload: the server accepted bytes that are not an image")
        return time.perf_counter() - started

    return probe


async def measure(variants: list[Variant], rounds: int) -> None:
    for variant in variants:  # warm every path once: connections, thread pools, page cache
        await variant.probe()
    for _ in range(rounds):
        for variant in variants:
            variant.seconds.append(await variant.probe())


def report(title: str, variants: list[Variant], size_bytes: int, baseline_name: str = "direct") -> None:
    print(title)
    baseline = statistics.median(variants[0].seconds)
    for variant in variants:
        median = statistics.median(variant.seconds)
        rate = size_bytes / median / MB
        print(f"  {variant.name:<34} {rate:8.1f} MB/s   ratio {baseline / median:5.2f} x of {baseline_name}")


async def main(rounds: int, artifact_mb: int, upload_mib: int, s3: bool) -> None:
    with tempfile.TemporaryDirectory() as temporary:
        data_dir = Path(temporary)
        process, port = await start_server(data_dir)
        settings = GatewaySettings(
            _env_file=None,
            port=0,
            admin_port=0,
            img2img_upstreams=[f"127.0.0.1:{port}"],
            mesh_upstreams=[f"127.0.0.1:{port}"],
            access_log=False,
        )
        try:
            store = LocalArtifactStore(data_dir / "outputs")
            artifact = store.put(new_job_id(), "big.glb", os.urandom(artifact_mb * MB), media_type="model/gltf-binary")
            payload = os.urandom(upload_mib * MiB)
            with Envoy(settings) as envoy:
                direct = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
                gateway = grpc.aio.insecure_channel(f"127.0.0.1:{envoy.port}", options=CHANNEL_OPTIONS)
                http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}", timeout=300)
                checked: set[str] = set()
                downloads = [
                    Variant("gRPC DownloadArtifact, direct", grpc_download(direct, artifact, checked, "direct"), []),
                    Variant("gRPC DownloadArtifact, via Envoy", grpc_download(gateway, artifact, checked, "envoy"), []),
                    Variant("HTTP GET /v1/artifacts, via Envoy", http_download(http, artifact, checked, "http"), []),
                ]
                uploads = [
                    Variant("gRPC Generate upload, direct", grpc_upload(direct, payload), []),
                    Variant("gRPC Generate upload, via Envoy", grpc_upload(gateway, payload), []),
                ]
                await measure(downloads, rounds)
                await measure(uploads, rounds)
                await http.aclose()
                await direct.close()
                await gateway.close()
        finally:
            process.terminate()
            await process.wait()
        presigned: list[Variant] = []
        if s3:
            presigned = await presigned_against_gateway(data_dir, store.read(artifact.id), rounds)
    print(f"artifact I/O, {rounds} rounds after one warm-up, server and Envoy on loopback")
    report(f"download of a {artifact_mb} MB artifact", downloads, artifact.size_bytes)
    report(f"upload of a {upload_mib} MiB image field (refused after arrival)", uploads, len(payload))
    if presigned:
        report(
            f"S3 backend: download of a {artifact_mb} MB artifact",
            presigned,
            artifact.size_bytes,
            "the gateway route",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured transfers per variant")
    parser.add_argument("--artifact-mb", type=int, default=100, help="size of the downloaded artifact in MB")
    parser.add_argument("--upload-mib", type=int, default=16, help="size of the uploaded image field in MiB")
    parser.add_argument("--no-s3", action="store_true", help="skip presigned URL vs the gateway route (SeaweedFS)")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.rounds, arguments.artifact_mb, arguments.upload_mib, not arguments.no_s3))
