"""Storage running out, on real servers with the fake provider: the budget and the free-space floor
refuse a job before it runs (RESOURCE_EXHAUSTED / STORAGE_FULL), a disk that fills mid-write fails
that job alone (a real size-limited tmpfs), and the retention sweep runs by itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln.mesh.v1 import mesh_service_pb2 as mesh
from kiln.mesh.v1 import mesh_service_pb2_grpc as mesh_grpc
from kiln_client import AsyncImg2ImgClient, ResourceExhaustedError
from kiln_runtime.server import KilnServer
from kiln_runtime.storage import ArtifactNotFound, new_job_id
from tests.grpc.test_generate_stream import collect, img2img_request, kinds, unpack
from tests.servers import StartServer
from tests.support import png_bytes
from tests.tools import missing

KiB = 1024
MiB = 1024 * KiB
SERVING = health_pb2.HealthCheckResponse.SERVING


async def wait_for(condition: Callable[[], bool], within: float = 30.0) -> None:
    """Poll until `condition` holds; generous, since the two shared cores may be busy."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


def sample(server: KilnServer, name: str, **labels: str) -> float:
    value = server.runtime.metrics.registry.get_sample_value(name, {"service": server.runtime.name, **labels})
    return value or 0.0


def scrape(server: KilnServer) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def assert_storage_full(error: grpc.aio.AioRpcError, *, limit: str) -> str:
    """The refusal is RESOURCE_EXHAUSTED with ErrorInfo STORAGE_FULL and no RetryInfo; returns its message."""
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info = unpack(status, error_details_pb2.ErrorInfo)
    assert info is not None and info.reason == "STORAGE_FULL"  # type: ignore[attr-defined]
    assert info.metadata["limit"] == limit  # type: ignore[attr-defined]
    # Not CAPACITY: waiting a few seconds would not help, so no retry delay is offered.
    assert unpack(status, error_details_pb2.RetryInfo) is None
    return str(status.message)


def job_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


async def test_budget_refuses_a_job_before_it_runs_until_space_is_freed(start_server: StartServer) -> None:
    server, channel = await start_server(
        fake={"output_bytes": 200 * KiB},
        storage={"budget_bytes": 300 * KiB, "min_free_bytes": 0, "expected_job_bytes": 1, "usage_interval_s": 0.1},
    )
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    root = server.runtime.store.root  # type: ignore[attr-defined]
    info = await stub.GetInfo(img2img.GetInfoRequest())
    assert info.model.readiness_reason == ""

    first = await collect(stub.Generate(img2img_request()))
    assert kinds(first)[-1] == "result"
    first_job = first[0].accepted.job_id

    # ~200 KiB held, and the next job is expected to store as much again: over the 300 KiB budget.
    events: list[img2img.GenerateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(stub.Generate(img2img_request()), events)
    assert events == []  # refused before it was accepted: nothing was admitted or run
    message = assert_storage_full(refused.value, limit="budget_bytes")
    assert "KILN_STORAGE__BUDGET_BYTES" in message and "not started" in message
    assert job_folders(root) == [first_job]
    assert server.runtime.admission.running == 0 and server.runtime.admission.queued == 0
    assert sample(server, "kiln_storage_full_total", when="admission") == 1

    # GetInfo says why; the model itself is fine, and health stays SERVING (downloads still work).
    info = await stub.GetInfo(img2img.GetInfoRequest())
    assert "KILN_STORAGE__BUDGET_BYTES" in info.model.readiness_reason
    assert info.model.readiness == 2  # READINESS_READY
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == SERVING

    # The metric endpoint shows the bytes used (at least the artifact) and the disk's free bytes.
    body = await asyncio.to_thread(scrape, server)
    exposed = dict(line.rsplit(" ", 1) for line in body.splitlines() if line.startswith("kiln_storage_"))
    assert float(exposed['kiln_storage_used_bytes{service="img2img"}']) >= first[-1].result.artifacts[0].size_bytes
    assert float(exposed['kiln_storage_free_bytes{service="img2img"}']) > 0

    # Space comes back (the job is deleted); the periodic recount sees it and jobs run again.
    server.runtime.store.delete_job(first_job)
    await wait_for(lambda: sample(server, "kiln_storage_used_bytes") == 0)
    info = await stub.GetInfo(img2img.GetInfoRequest())
    assert info.model.readiness_reason == ""
    again = await collect(stub.Generate(img2img_request()))
    assert kinds(again)[-1] == "result"


@pytest.mark.parametrize("kind", ["img2img", "mesh"])
async def test_free_space_floor_refuses_on_both_services(start_server: StartServer, kind: str) -> None:
    # A floor no disk can keep: every job would take the disk below it.
    server, channel = await start_server(kind, storage={"min_free_bytes": "1PiB"})
    if kind == "img2img":
        img_stub = img2img_grpc.Img2ImgProviderStub(channel)
        call = img_stub.Generate(img2img_request())
        reason = (await img_stub.GetInfo(img2img.GetInfoRequest())).model.readiness_reason
    else:
        mesh_stub = mesh_grpc.MeshProviderStub(channel)
        call = mesh_stub.Generate(mesh.GenerateRequest(image=png_bytes(), output_format=mesh.MESH_FORMAT_GLB))
        reason = (await mesh_stub.GetInfo(mesh.GetInfoRequest())).model.readiness_reason
    events: list[object] = []
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(call, events)  # type: ignore[arg-type]
    assert events == []  # refused before it was accepted
    message = assert_storage_full(refused.value, limit="min_free_bytes")
    assert "KILN_STORAGE__MIN_FREE_BYTES" in message
    assert "KILN_STORAGE__MIN_FREE_BYTES" in reason
    assert job_folders(server.runtime.store.root) == []  # type: ignore[attr-defined]


@contextlib.contextmanager
def size_limited_disk(path: Path, size_bytes: int) -> Iterator[Path]:
    """A real tmpfs of `size_bytes` mounted at `path` (Linux, as root: how CI runs), unmounted after."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs a size-limited tmpfs, which only Linux mounts this way")
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a size-limited tmpfs (CI runs as root): sudo, or run it in CI")
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        missing(f"could not mount a tmpfs as root: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
        if os.path.ismount(path):  # something still holds it open: detach it anyway
            subprocess.run(["umount", "--lazy", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with size_limited_disk(tmp_path / "small-disk", 8 * MiB) as path:
        yield path


async def test_disk_full_mid_write_fails_that_job_alone(small_disk: Path, start_server: StartServer) -> None:
    # Fake output: seeded noise, 3 MiB as PNG and about 1.2 MiB as JPEG. No floor and a tiny
    # initial estimate, so the first PNG gets past admission and meets the disk itself.
    server, channel = await start_server(
        fake={"output_bytes": 3 * MiB, "steps": 4, "step_delay_s": 0.05},
        runtime={"max_concurrency": 1, "max_queue": 4},
        storage={"output_dir": small_disk / "outputs", "min_free_bytes": 0, "expected_job_bytes": 1},
    )
    stub = img2img_grpc.Img2ImgProviderStub(channel)
    store, root = server.runtime.store, small_disk / "outputs"
    filler = small_disk / "filler"
    filler.write_bytes(os.urandom(5 * MiB + 512 * KiB))  # leaves ~2.5 MiB: no room for 3 MiB

    big = stub.Generate(img2img_request(seed=1))
    big_events: list[img2img.GenerateResponse] = [await big.read()]  # accepted: it holds the one slot
    small = stub.Generate(img2img_request(seed=2, output_format=img2img.IMAGE_FORMAT_JPEG))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await collect(big, big_events)
    small_events = await collect(small)

    # The big job was accepted and ran, then failed in-band with the same status as the call.
    assert kinds(big_events)[0] == "accepted" and kinds(big_events)[-1] == "error"
    error = big_events[-1].error
    assert error.code == code_pb2.RESOURCE_EXHAUSTED and "ran out of storage space" in error.message
    assert assert_storage_full(failed.value, limit="disk") == error.message
    big_job = big_events[0].accepted.job_id
    # Nothing of it is visible, not even a temp file; only its job record (GetJob) says why it failed.
    with pytest.raises(ArtifactNotFound):
        store.get(f"{big_job}/image.png")
    assert sorted(path.name for path in (root / big_job).iterdir()) == ["job.json", "job.json.meta.json"]
    assert [p.name for p in root.rglob("*") if p.name.endswith(".tmp")] == []
    assert kinds(small_events)[-1] == "result"
    small_artifact = small_events[-1].result.artifacts[0]
    assert store.read(small_artifact.id)[:3] == b"\xff\xd8\xff"  # a whole JPEG
    await wait_for(lambda: server.runtime.admission.running == 0)
    assert sample(server, "kiln_storage_full_total", when="write") == 1

    # The failed write taught the estimate: another PNG is refused before it runs.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await collect(stub.Generate(img2img_request(seed=3)))
    assert "not started" in assert_storage_full(refused.value, limit="min_free_bytes")

    # Space comes back: the same request now works, and the server never stopped serving.
    filler.unlink()
    again = await collect(stub.Generate(img2img_request(seed=3)))
    assert kinds(again)[-1] == "result"
    assert store.get(again[-1].result.artifacts[0].id).size_bytes > 3 * MiB - 64 * KiB
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == SERVING


async def test_retention_sweep_runs_on_its_own_schedule(start_server: StartServer) -> None:
    server, _ = await start_server(storage={"retention_hours": 1.0, "cleanup_interval_s": 0.2})
    store = server.runtime.store
    root: Path = store.root  # type: ignore[attr-defined]
    # Wait for the sweep at start, so that what follows can only be removed by a later one.
    await wait_for(lambda: sample(server, "kiln_storage_cleanups_total") >= 1)

    old_job, new_job = new_job_id(), new_job_id()
    for job in (old_job, new_job):
        store.put(job, "image.png", b"\x89PNG" + bytes(100), media_type="image/png")
    two_hours_ago = time.time() - 2 * 3600
    for path in [*(root / old_job).iterdir(), root / old_job]:
        os.utime(path, (two_hours_ago, two_hours_ago))
    sweeps = sample(server, "kiln_storage_cleanups_total")

    # Nobody calls cleanup: the server's own loop removes the old folder and keeps the new one.
    await wait_for(lambda: not (root / old_job).exists())
    assert (root / new_job).exists()
    assert sample(server, "kiln_storage_cleanups_total") > sweeps
    assert sample(server, "kiln_storage_cleanup_removed_jobs_total") == 1
    # It keeps going after a sweep that removed something.
    swept = sample(server, "kiln_storage_cleanups_total")
    await wait_for(lambda: sample(server, "kiln_storage_cleanups_total") >= swept + 2)


async def test_the_python_client_surfaces_storage_full_and_does_not_retry_it(start_server: StartServer) -> None:
    server, _ = await start_server(storage={"min_free_bytes": "1PiB"})
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        with pytest.raises(ResourceExhaustedError) as caught:
            await client.generate_image(png_bytes(), prompt="a fox", retries=3)
    assert caught.value.reason == "STORAGE_FULL" and caught.value.retry_delay_s is None
    assert "KILN_STORAGE__MIN_FREE_BYTES" in caught.value.message
    # One request reached the server: retrying cannot make room, so the client did not. The
    # interceptor counts a call after its status has gone out, so wait for the count to settle.
    refused = {"method": "Generate", "code": "RESOURCE_EXHAUSTED"}
    await wait_for(lambda: sample(server, "kiln_requests_total", **refused) >= 1)
    await asyncio.sleep(0.2)
    assert sample(server, "kiln_requests_total", **refused) == 1
