"""Two img2img replicas behind one real Envoy: load spread, retry on a full replica, a dead replica.

Each test starts its own pair of in-process servers (fake provider) and its own Envoy, because
each needs different admission limits and step timings on the two replicas.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import grpc
import pytest

from gateway.kiln_gateway import Envoy
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import channel_to, envoy_running, img2img_request, kiln_server, kinds

pytestmark = pytest.mark.asyncio(loop_scope="module")


def generate_ok(server: KilnServer) -> float:
    """Generate calls the server finished with OK."""
    value = server.runtime.metrics.registry.get_sample_value(
        "kiln_requests_total", {"service": "img2img", "method": "Generate", "code": "OK"}
    )
    return value or 0.0


def generate_count(server: KilnServer, code: str) -> float:
    value = server.runtime.metrics.registry.get_sample_value(
        "kiln_requests_total", {"service": "img2img", "method": "Generate", "code": code}
    )
    return value or 0.0


def envoy_counter(envoy: Envoy, name: str) -> int:
    """One counter from Envoy's admin /stats (0 when Envoy has not created it yet)."""
    for line in envoy.admin(f"/stats?filter=^{re.escape(name)}$").splitlines():
        stat, _, value = line.partition(": ")
        if stat == name:
            return int(value)
    return 0


def health_flags(envoy: Envoy, cluster: str, port: int) -> str:
    """The health_flags of one host of a cluster from the admin /clusters text output."""
    prefix = f"{cluster}::127.0.0.1:{port}::health_flags::"
    for line in envoy.admin("/clusters").splitlines():
        if line.startswith(prefix):
            return line.removeprefix(prefix)
    raise AssertionError(f"no {prefix} in /clusters")


async def wait_for_flags(envoy: Envoy, port: int, wanted: str, within_s: float) -> str:
    """Poll an img2img host's health_flags until they contain `wanted`; the last flags seen."""
    deadline = time.monotonic() + within_s
    flags = health_flags(envoy, "img2img", port)
    while wanted not in flags and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        flags = health_flags(envoy, "img2img", port)
    return flags


async def generate(port: int) -> list[img2img.GenerateResponse]:
    async with channel_to(port) as channel:
        return [event async for event in img2img_grpc.Img2ImgProviderStub(channel).Generate(img2img_request())]


async def test_concurrent_requests_spread_over_both_replicas(tmp_path: Path) -> None:
    fake = {"steps": 4, "step_delay_s": 0.25}
    runtime = {"max_concurrency": 1, "max_queue": 8}
    async with (
        kiln_server("img2img", tmp_path / "a", fake=fake, runtime=runtime) as a,
        kiln_server("img2img", tmp_path / "b", fake=fake, runtime=runtime) as b,
        envoy_running([a.port, b.port]) as envoy,
    ):

        async def staggered(index: int) -> list[img2img.GenerateResponse]:
            # Envoy counts a host's active requests once a stream is attached to a connection;
            # requests that arrive together before that all see 0 and pick at random.
            await asyncio.sleep(0.1 * index)
            return await generate(envoy.port)

        results = await asyncio.gather(*(staggered(index) for index in range(6)))
    assert all(kinds(events)[-1] == "result" for events in results)
    served = (generate_ok(a), generate_ok(b))
    assert sum(served) == 6
    # LEAST_REQUEST (power of two choices) sends new streams to the replica with fewer open ones;
    # 6-0 has a probability of about 1e-3 even though two random picks can be the same host.
    assert min(served) >= 1, served


async def test_full_replica_is_retried_on_the_other(tmp_path: Path) -> None:
    runtime = {"max_concurrency": 1, "max_queue": 0}
    async with (
        kiln_server("img2img", tmp_path / "a", fake={"steps": 60, "step_delay_s": 0.25}, runtime=runtime) as a,
        kiln_server("img2img", tmp_path / "b", fake={"steps": 2, "step_delay_s": 0.02}, runtime=runtime) as b,
        channel_to(a.port) as direct,
        envoy_running([a.port, b.port]) as envoy,
    ):
        # Keep A's only slot busy with a long request that bypasses Envoy (Envoy does not see it).
        busy = img2img_grpc.Img2ImgProviderStub(direct).Generate(img2img_request())
        assert (await busy.read()).WhichOneof("event") == "accepted"
        try:
            done = 0
            # Envoy picks A about half the time; go on until it has retried a few times.
            while done < 40 and (done < 6 or envoy_counter(envoy, "cluster.img2img.upstream_rq_retry") < 2):
                events = await generate(envoy.port)
                assert kinds(events)[-1] == "result", kinds(events)
                done += 1
            retries = envoy_counter(envoy, "cluster.img2img.upstream_rq_retry")
        finally:
            busy.cancel()
    assert retries >= 2, (done, retries)
    # Every request ended on B; each one that landed on A first was refused there.
    assert generate_ok(b) == done
    assert generate_count(a, "RESOURCE_EXHAUSTED") == retries
    assert generate_ok(a) == 0


@pytest.mark.slow
async def test_killed_replica_is_avoided_and_marked_unhealthy(tmp_path: Path) -> None:
    fake = {"steps": 2, "step_delay_s": 0.02}
    async with (
        kiln_server("img2img", tmp_path / "a", fake=fake) as a,
        kiln_server("img2img", tmp_path / "b", fake=fake) as b,
        envoy_running([a.port, b.port]) as envoy,
    ):
        for _ in range(4):  # both replicas have traffic and open upstream connections
            assert kinds(await generate(envoy.port))[-1] == "result"
        assert await wait_for_flags(envoy, a.port, "healthy", within_s=10) == "healthy"
        await a.stop(grace=0)
        killed = time.monotonic()
        b_before = generate_ok(b)
        for _ in range(6):
            events = await generate(envoy.port)
            assert kinds(events)[-1] == "result", kinds(events)
        assert generate_ok(b) - b_before == 6
        flags = await wait_for_flags(envoy, a.port, "failed_active_hc", within_s=20 - (time.monotonic() - killed))
        marked_after = time.monotonic() - killed
        assert "failed_active_hc" in flags, (round(marked_after, 1), flags)
        assert health_flags(envoy, "img2img", b.port) == "healthy"
        # Still served once A is out of the rotation.
        assert kinds(await generate(envoy.port))[-1] == "result"
    assert marked_after < 15, marked_after


async def test_direct_request_to_busy_replica_is_refused_before_any_event(tmp_path: Path) -> None:
    """What the retry relies on: a full replica answers RESOURCE_EXHAUSTED before any event."""
    runtime = {"max_concurrency": 1, "max_queue": 0}
    async with (
        kiln_server("img2img", tmp_path / "a", fake={"steps": 40, "step_delay_s": 0.25}, runtime=runtime) as a,
        channel_to(a.port) as channel,
    ):
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        busy = stub.Generate(img2img_request())
        assert (await busy.read()).WhichOneof("event") == "accepted"
        events = []
        with pytest.raises(grpc.aio.AioRpcError) as refused:  # noqa: PT012 - no event may come first
            async for event in stub.Generate(img2img_request()):
                events.append(event)
        busy.cancel()
    assert events == []
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
