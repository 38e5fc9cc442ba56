"""`generate()` outlives its connection: a stream cut after `accepted` is resumed with WatchJob and
returns the same result, and a submit cut before `accepted` is sent again with the same
`client_request_id`; either way the model runs once.

The faults are real: a TCP proxy between client and server whose connections the test cuts
(`CuttableProxy`, a network fault injector, not a stand-in for any Kiln component), and a real
Envoy stopped and started again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.kiln_gateway import Envoy
from kiln.common.v1 import job_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln_client import RESUME_WINDOW_S, AsyncImg2ImgClient, Img2ImgClient, UnavailableError, _stream
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import envoy_running, kinds, session_replica
from tests.gateway.test_job_replicas import replicas
from tests.jobs_support import assert_consecutive, eventually, provider_runs
from tests.servers import StartServer
from tests.support import png_bytes

#: Seconds a condition the servers must reach gets (two busy cores): generous, never asserted.
PATIENCE_S = 30.0
#: A job long enough to be cut in the middle: 60 steps of 50 ms.
SLOW_JOB = {"steps": 60, "step_delay_s": 0.05}


@dataclass
class CuttableProxy:
    """A TCP proxy on a free loopback port in front of ``upstream``; the test cuts its connections.

    ``drop_responses`` swallows what the server sends (the request gets through, the answer is
    lost on the way), which makes a submit that reached the server look unanswered to the client.
    """

    upstream: int
    port: int = 0
    connections: int = 0
    drop_responses: bool = False
    _links: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = field(default_factory=list)
    _server: asyncio.Server | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _link(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        self.connections += 1
        self._links.append((client_writer, server_writer))
        await asyncio.gather(
            self._pump(client_reader, server_writer, lambda: False),
            self._pump(server_reader, client_writer, lambda: self.drop_responses),
            return_exceptions=True,
        )

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dropping: Callable[[], bool]) -> None:
        try:
            while data := await reader.read(65536):
                if not dropping():
                    writer.write(data)
                    await writer.drain()
        finally:
            writer.transport.abort()

    def cut(self) -> None:
        """Drop every open connection at once (both sides see a reset); new ones still get through."""
        links, self._links = self._links, []
        for client_side, server_side in links:
            client_side.transport.abort()
            server_side.transport.abort()

    async def close(self) -> None:
        """Stop accepting, and cut what is open."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.cut()


@contextlib.asynccontextmanager
async def cuttable_proxy(upstream: int) -> AsyncIterator[CuttableProxy]:
    proxy = CuttableProxy(upstream)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()


@dataclass
class Run:
    """One blocking ``generate()`` in a worker thread, its events recorded as they arrive."""

    events: list[img2img.GenerateResponse] = field(default_factory=list)
    client: Img2ImgClient | None = None
    resume_window_s: float = RESUME_WINDOW_S

    def progressed(self, steps: int) -> bool:
        return kinds(self.events).count("progress") >= steps

    def collect(self, target: str, **options: Any) -> _stream.Collected:
        with Img2ImgClient(target, timeout=PATIENCE_S * 4, resume_window_s=self.resume_window_s) as client:
            return self.follow(client, **options)

    def follow(self, client: Img2ImgClient, **options: Any) -> _stream.Collected:
        self.client = client
        collector = _stream.Collector()
        for event in client.generate(png_bytes(), prompt="a fox", seed=9, **options):
            self.events.append(event)
            if (collected := collector.add(event)) is not None:
                return collected
        raise AssertionError("no result")


async def stored_sha256(server: KilnServer, job_id: str) -> str:
    """What the server's job record says the result is (GetJob on a connection of its own)."""
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=PATIENCE_S) as client:
        job = await client.get_job(job_id)
    assert job.status.state == job_pb2.JOB_STATE_SUCCEEDED
    sha256: str = job.result.artifacts[0].sha256
    return sha256


def watch_calls(server: KilnServer) -> float:
    """WatchJob calls the server finished, whatever their status."""
    total = 0.0
    for family in server.runtime.metrics.registry.collect():
        for sample in family.samples:
            if sample.name == "kiln_requests_total" and sample.labels.get("method") == "WatchJob":
                total += sample.value
    return total


async def test_a_stream_cut_mid_job_resumes_without_gap_or_duplicate(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake=SLOW_JOB)
    run = Run()
    async with cuttable_proxy(server.port) as proxy:
        job = asyncio.create_task(asyncio.to_thread(run.collect, proxy.target, delivery="CHUNKED"))
        await eventually(lambda: run.progressed(3), PATIENCE_S)
        proxy.cut()
        collected = await job
    assert_consecutive(run.events)
    assert kinds(run.events)[0] == "accepted" and kinds(run.events)[-1] == "result"
    assert kinds(run.events).count("progress") == SLOW_JOB["steps"]
    assert collected.data is not None and collected.artifact.sha256 == await stored_sha256(server, collected.job_id)
    assert proxy.connections >= 2  # a new connection carried the rest
    await eventually(lambda: watch_calls(server) >= 1, PATIENCE_S)  # ... as WatchJob
    assert provider_runs(server) == 1


async def test_the_asyncio_client_resumes_too(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake=SLOW_JOB)
    events: list[img2img.GenerateResponse] = []
    async with cuttable_proxy(server.port) as proxy, AsyncImg2ImgClient(proxy.target, timeout=PATIENCE_S * 2) as client:
        collector = _stream.Collector()
        async for event in client.generate(png_bytes(), prompt="a fox", seed=9):
            events.append(event)
            if kinds(events).count("progress") == 3:
                proxy.cut()
            collector.add(event)
    assert_consecutive(events)
    assert kinds(events)[-1] == "result" and kinds(events).count("progress") == SLOW_JOB["steps"]
    assert collector.collected is not None
    assert collector.collected.artifact.sha256 == await stored_sha256(server, collector.collected.job_id)
    assert proxy.connections >= 2
    assert provider_runs(server) == 1


async def test_a_submit_cut_before_accepted_is_sent_again_and_runs_once(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake=SLOW_JOB)
    run = Run()
    async with cuttable_proxy(server.port) as proxy:
        with Img2ImgClient(proxy.target, timeout=PATIENCE_S * 2) as client:
            # The connection is up before the answers start to vanish (HTTP/2 needs both ways).
            await asyncio.to_thread(client.get_info)
            proxy.drop_responses = True
            job = asyncio.create_task(asyncio.to_thread(run.follow, client, retries=5))
            await eventually(lambda: server.runtime.admission.running == 1, PATIENCE_S)  # the job runs
            assert run.events == []  # ... and the client has not heard of it
            proxy.drop_responses = False
            proxy.cut()
            collected = await job
    (held,) = list(server.runtime.jobs.newest_first())
    assert collected.job_id == held.id  # attached to the job the first try created
    assert_consecutive(run.events)
    assert provider_runs(server) == 1


async def test_a_lost_stream_is_given_up_after_the_window_and_the_job_waits(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake=SLOW_JOB)
    events: list[img2img.GenerateResponse] = []
    async with cuttable_proxy(server.port) as proxy:
        async with AsyncImg2ImgClient(proxy.target, timeout=PATIENCE_S, resume_window_s=1.0) as client:

            async def follow() -> None:
                async for event in client.generate(png_bytes(), prompt="a fox"):
                    events.append(event)
                    if len(events) == 2:
                        await proxy.close()  # gone for good: nothing answers any more

            with pytest.raises(UnavailableError):
                await follow()
        job_id = events[0].accepted.job_id
        # The job runs on, waiting for a watcher (the server's grace period): reattach by hand.
        async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=PATIENCE_S) as direct:
            rest = [event async for event in direct.watch_job(job_id, after=events[-1].sequence)]
            job = await direct.get_job(job_id)
    assert_consecutive(events + rest)
    assert job.status.state == job_pb2.JOB_STATE_SUCCEEDED
    assert provider_runs(server) == 1


async def test_restarting_envoy_mid_stream_the_client_resumes_with_the_same_result(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake=SLOW_JOB)
    run = Run()
    async with envoy_running([server.port]) as envoy:
        port = envoy.port
        job = asyncio.create_task(asyncio.to_thread(run.collect, f"127.0.0.1:{port}"))
        await eventually(lambda: run.progressed(3), PATIENCE_S)
        await asyncio.to_thread(envoy.stop)
        restarted = Envoy(envoy.settings.model_copy(update={"port": port}))
        await asyncio.to_thread(restarted.start)
        try:
            collected = await job
        finally:
            await asyncio.to_thread(restarted.stop)
    assert_consecutive(run.events)
    assert kinds(run.events)[-1] == "result" and kinds(run.events).count("progress") == SLOW_JOB["steps"]
    assert collected.data is not None and collected.artifact.sha256 == await stored_sha256(server, collected.job_id)
    assert provider_runs(server) == 1


async def test_a_replica_killed_mid_stream_is_reported_lost_through_the_other(tmp_path: Path) -> None:
    # Resuming after the kill, the session names a replica that is gone: the gateway takes the
    # WatchJob to the other one, which follows the job's stored record until its heartbeat is
    # stale, and the stream ends with the job's outcome instead of hanging.
    run = Run(resume_window_s=PATIENCE_S * 4)  # so a client that kept trying would outlast the test
    async with replicas(tmp_path, steps=400, step_delay_s=0.05) as (a, b, envoy):
        job = asyncio.create_task(asyncio.to_thread(run.collect, f"127.0.0.1:{envoy.port}"))
        await eventually(lambda: run.progressed(2), PATIENCE_S)
        assert run.client is not None
        session = run.client.sessions.get(run.events[0].accepted.job_id)
        assert session is not None
        owner = a if session_replica(session) == a.address else b
        await owner.stop(kill=True)
        with pytest.raises(UnavailableError) as caught:
            async with asyncio.timeout(PATIENCE_S):
                await job
    assert caught.value.reason == "REPLICA_LOST"
    assert_consecutive(run.events)
