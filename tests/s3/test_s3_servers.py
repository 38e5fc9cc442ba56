"""Model servers on the S3 backend: shared artifacts across processes, presigned downloads, readiness."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.artifacts.v1 import artifact_service_pb2 as artifacts_pb
from kiln.artifacts.v1 import artifact_service_pb2_grpc as artifacts_grpc
from kiln.common.v1 import artifact_pb2, job_pb2, service_info_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln.mesh.v1 import mesh_service_pb2 as mesh
from kiln.mesh.v1 import mesh_service_pb2_grpc as mesh_grpc
from kiln_client import Img2ImgClient
from tests.s3.conftest import BUCKET, aws_environment
from tests.s3.seaweed import SeaweedFS, free_port, start_seaweedfs
from tests.servers import StartServer
from tests.support import png_bytes


def s3_storage(endpoint: str, prefix: str = "servers/") -> dict[str, Any]:
    return {"backend": "s3", "s3": {"endpoint_url": endpoint, "bucket": BUCKET, "prefix": prefix}}


def s3_env(weed: SeaweedFS, prefix: str = "servers/") -> dict[str, str]:
    return {
        **aws_environment(),
        "KILN_STORAGE__BACKEND": "s3",
        "KILN_STORAGE__S3__ENDPOINT_URL": weed.endpoint,
        "KILN_STORAGE__S3__BUCKET": BUCKET,
        "KILN_STORAGE__S3__PREFIX": prefix,
    }


async def start_process(module: str, tmp_path: Path, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, int]:
    """`python -m <module>` (fake provider, free ports); returns once it logs its port."""
    section = module.removeprefix("kiln_").upper()
    tmp_path.mkdir(parents=True, exist_ok=True)
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KILN_"))},
        "KILN_STORAGE__DATA_DIR": str(tmp_path),
        f"KILN_{section}__PROVIDER": "fake",
        f"KILN_{section}__SERVER__PORT": "0",
        f"KILN_{section}__SERVER__METRICS_PORT": "0",
        "KILN_TELEMETRY__LOG_FORMAT": "json",
        **env,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", module, env=environment, cwd=tmp_path, stderr=asyncio.subprocess.PIPE
    )
    assert process.stderr is not None
    async with asyncio.timeout(60):
        while True:
            line = await process.stderr.readline()
            if not line:
                raise AssertionError(f"{module} exited early with {await process.wait()}")
            record = json.loads(line)
            if "serving on" in record["message"]:
                return process, int(record["message"].split(":")[1].split()[0])


async def wait_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(60):
        while (await health.Check(health_pb2.HealthCheckRequest())).status != health_pb2.HealthCheckResponse.SERVING:
            await asyncio.sleep(0.1)


async def result_artifact(call: Any) -> artifact_pb2.Artifact:
    async for event in call:
        if event.WhichOneof("event") == "result":
            artifact: artifact_pb2.Artifact = event.result.artifacts[0]
            return artifact
    raise AssertionError("the stream ended without a result")


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[int]]]:
    started: list[asyncio.subprocess.Process] = []

    async def start(module: str, env: dict[str, str]) -> int:
        process, port = await start_process(module, tmp_path / f"{module}-{len(started)}", env)
        started.append(process)
        return port

    yield start
    for process in started:
        if process.returncode is None:
            process.kill()  # by pid, through the handle that started it
            await process.wait()


async def test_two_server_processes_serve_each_other_s_artifacts(
    seaweed: SeaweedFS, processes: Callable[..., Awaitable[int]], tmp_path: Path
) -> None:
    env = s3_env(seaweed)
    img2img_port = await processes("kiln_img2img", env)
    mesh_port = await processes("kiln_mesh", env)
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{img2img_port}") as img2img_channel,
        grpc.aio.insecure_channel(f"127.0.0.1:{mesh_port}") as mesh_channel,
    ):
        await wait_serving(img2img_channel)
        await wait_serving(mesh_channel)
        image = await result_artifact(
            img2img_grpc.Img2ImgProviderStub(img2img_channel).Generate(
                img2img.GenerateRequest(
                    image=png_bytes(),
                    prompt="shared",
                    scheduler=img2img.SCHEDULER_EULER,
                    output_format=img2img.IMAGE_FORMAT_PNG,
                    delivery=artifact_pb2.ARTIFACT_DELIVERY_REFERENCE,
                )
            )
        )
        model = await result_artifact(
            mesh_grpc.MeshProviderStub(mesh_channel).Generate(
                mesh.GenerateRequest(
                    image=png_bytes(),
                    output_format=mesh.MESH_FORMAT_GLB,
                    delivery=artifact_pb2.ARTIFACT_DELIVERY_REFERENCE,
                )
            )
        )
        # Each server reads the other's artifact from the bucket; neither wrote to its own disk.
        for artifact, other in ((image, mesh_channel), (model, img2img_channel)):
            body = await artifacts_grpc.ArtifactProviderStub(other).GetArtifact(
                artifacts_pb.GetArtifactRequest(artifact_id=artifact.id)
            )
            assert len(body.data) == artifact.size_bytes
            assert hashlib.sha256(body.data).hexdigest() == artifact.sha256
            assert artifact.uri.startswith(f"{seaweed.endpoint}/{BUCKET}/servers/{artifact.id}?")
    # Neither wrote to its own disk.
    assert [p for p in tmp_path.rglob("*") if p.is_file() and "outputs" in p.parts] == []


async def test_the_python_client_downloads_through_the_presigned_uri(
    seaweed: SeaweedFS, aws_env: dict[str, str], start_server: StartServer, tmp_path: Path
) -> None:
    # The writer is on the bucket; the client asks a server with only a local folder, which
    # answers NOT_FOUND, so the client takes the artifact's presigned URI straight to the store.
    _, writer = await start_server("img2img", storage=s3_storage(seaweed.endpoint))
    other, _ = await start_server("img2img")
    image = await result_artifact(
        img2img_grpc.Img2ImgProviderStub(writer).Generate(
            img2img.GenerateRequest(
                image=png_bytes(),
                prompt="presigned",
                scheduler=img2img.SCHEDULER_EULER,
                output_format=img2img.IMAGE_FORMAT_PNG,
                delivery=artifact_pb2.ARTIFACT_DELIVERY_REFERENCE,
            )
        )
    )
    assert "X-Amz-Signature=" in image.uri

    def download() -> bytes:
        with Img2ImgClient(f"127.0.0.1:{other.port}", timeout=30) as client:
            return client.download(image, tmp_path / "image.png").read_bytes()

    data = await asyncio.to_thread(download)
    assert len(data) == image.size_bytes
    assert hashlib.sha256(data).hexdigest() == image.sha256


async def _readiness(channel: grpc.aio.Channel, wanted: int) -> service_info_pb2.ModelInfo:
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    async with asyncio.timeout(30):
        while True:
            info: service_info_pb2.ModelInfo = (await stub.GetInfo(img2img.GetInfoRequest())).model
            if info.readiness == wanted:
                return info
            await asyncio.sleep(0.1)


async def _not_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kiln.img2img.v1.Img2ImgProvider"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_bad_credentials_at_startup_are_not_serving_with_the_reason(
    seaweed: SeaweedFS, aws_env: dict[str, str], start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    _, channel = await start_server("img2img", wait_ready=False, storage=s3_storage(seaweed.endpoint))
    info = await _readiness(channel, service_info_pb2.READINESS_FAILED)
    assert "credentials were refused" in info.readiness_reason
    assert "AWS_SECRET_ACCESS_KEY" in info.readiness_reason and "wrong-secret" not in info.readiness_reason
    await _not_serving(channel)
    # A job is refused with the same reason instead of failing after the model ran.
    call = img2img_grpc.Img2ImgProviderStub(channel).Generate(
        img2img.GenerateRequest(
            image=png_bytes(), prompt="x", scheduler=img2img.SCHEDULER_EULER, output_format=img2img.IMAGE_FORMAT_PNG
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "credentials were refused" in (refused.value.details() or "")


async def test_an_unreachable_store_is_not_serving_until_it_answers(
    aws_env: dict[str, str], start_server: StartServer, tmp_path: Path
) -> None:
    port = free_port()
    _, channel = await start_server(
        "img2img", wait_ready=False, storage=s3_storage(f"http://127.0.0.1:{port}", prefix="late/")
    )
    info = await _readiness(channel, service_info_pb2.READINESS_FAILED)
    assert "cannot reach" in info.readiness_reason and f"127.0.0.1:{port}" in info.readiness_reason
    assert "KILN_STORAGE__S3__ENDPOINT_URL" in info.readiness_reason
    await _not_serving(channel)
    # The store comes up (as it may after the servers in compose or Kubernetes): the next check passes.
    weed = await asyncio.to_thread(
        start_seaweedfs,
        tmp_path / "late",
        access_key=aws_env["AWS_ACCESS_KEY_ID"],
        secret_key=aws_env["AWS_SECRET_ACCESS_KEY"],
        bucket=BUCKET,
        s3_port=port,
    )
    try:
        info = await _readiness(channel, service_info_pb2.READINESS_READY)
        assert info.readiness_reason == ""
        await wait_serving(channel)
    finally:
        await asyncio.to_thread(weed.stop)


async def test_a_finished_job_is_readable_from_another_replica_through_the_bucket(
    seaweed: SeaweedFS, processes: Callable[..., Awaitable[int]]
) -> None:
    env = s3_env(seaweed, prefix=f"jobs-{uuid.uuid4().hex[:8]}/")
    ports = [await processes("kiln_img2img", env), await processes("kiln_img2img", env)]
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{ports[0]}") as first,
        grpc.aio.insecure_channel(f"127.0.0.1:{ports[1]}") as second,
    ):
        for channel in (first, second):
            await wait_serving(channel)
        request = img2img.GenerateRequest(
            image=png_bytes(),
            prompt="shared",
            scheduler=img2img.SCHEDULER_EULER,
            output_format=img2img.IMAGE_FORMAT_PNG,
        )
        events = [event async for event in img2img_grpc.Img2ImgProviderStub(first).Generate(request)]
        job_id = events[0].accepted.job_id
        other = img2img_grpc.Img2ImgProviderStub(second)
        job = (await other.GetJob(img2img.GetJobRequest(job_id=job_id))).job
        assert job.status.state == job_pb2.JOB_STATE_SUCCEEDED
        assert job.result.artifacts[0].sha256 == events[-1].result.artifacts[0].sha256
        listed = await other.ListJobs(img2img.ListJobsRequest())
        assert [j.status.job_id for j in listed.jobs] == [job_id]
