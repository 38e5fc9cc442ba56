"""Two img2img replicas behind one real Envoy: the session header takes a job's calls to the
replica that runs it, a finished job is readable from either, a killed replica's job is reported.

The replicas of the job tests are server processes (`python -m kiln_img2img`, fake provider)
sharing one artifact folder, as replicas share a volume or a bucket in a deployment; being
processes, one can be SIGKILLed. Each test starts its own pair, with the step timings it needs.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from google.rpc import code_pb2

from gateway.kiln_gateway import Envoy
from gateway.kiln_gateway.render import SESSION_HEADER
from kiln.common.v1 import job_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import (
    channel_to,
    envoy_running,
    error_reason,
    img2img_request,
    kiln_server,
    kinds,
    read_rest,
    session_replica,
)
from tests.gateway.grpc_web import GrpcWebCall, collect
from tests.img2img.test_process_img2img import start, wait_ready

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVICE = "/kiln.img2img.v1.Img2ImgProvider"
#: What the fake provider reports as its model; a replica answering with it is ready.
MODEL_ID = "kiln/fake-img2img"
#: Seconds one call may take before it counts as a hang (two busy cores, two servers, Envoy).
CALL_TIMEOUT_S = 10.0
#: Seconds between rewrites of a running job's stored record: a small value makes a killed
#: replica's record stale (three heartbeats) within a couple of seconds.
HEARTBEAT_S = 0.5


def session_value(address: str) -> str:
    """The header value naming `address`, as Envoy writes it (base64 of host:port)."""
    return base64.b64encode(address.encode()).decode()


def get_info_calls(server: KilnServer) -> float:
    """GetInfo calls a server answered OK (health checks and other methods are counted apart)."""
    labels = {"service": "img2img", "method": "GetInfo", "code": "OK"}
    return server.runtime.metrics.registry.get_sample_value("kiln_requests_total", labels) or 0.0


async def test_session_header_pins_a_replica_on_every_protocol(tmp_path: Path) -> None:
    """GetInfo stands for any call: with the header it reaches the named replica on every protocol;
    without it, Envoy balances as before and both replicas answer."""
    async with (
        kiln_server("img2img", tmp_path / "a") as a,
        kiln_server("img2img", tmp_path / "b") as b,
        envoy_running([a.port, b.port]) as envoy,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}", timeout=CALL_TIMEOUT_S) as client,
        channel_to(envoy.port) as channel,
    ):
        stub = img2img_grpc.Img2ImgProviderStub(channel)

        async def get_info(protocol: str, session: str | None) -> str | None:
            """One GetInfo; the session header of its response (None when there is none)."""
            headers = {SESSION_HEADER: session} if session else {}
            if protocol == "grpc":
                call = stub.GetInfo(img2img.GetInfoRequest(), metadata=list(headers.items()), timeout=CALL_TIMEOUT_S)
                await call
                metadata: dict[str, str] = dict(await call.initial_metadata())
                return metadata.get(SESSION_HEADER)
            if protocol == "grpc-web":
                web = GrpcWebCall(
                    client, f"{SERVICE}/GetInfo", img2img.GetInfoRequest(), img2img.GetInfoResponse, metadata=headers
                )
                await collect(web)
                named: str | None = web.headers.get(SESSION_HEADER)
                return named
            response = await client.get("/v1/img2img/info", headers=headers)
            assert response.status_code == 200, response.text[:300]
            value: str | None = response.headers.get(SESSION_HEADER)
            return value

        for protocol in ("grpc", "grpc-web", "json"):
            for target, other in ((a, b), (b, a)):
                before = [get_info_calls(target), get_info_calls(other)]
                answers = [await get_info(protocol, session_value(f"127.0.0.1:{target.port}")) for _ in range(8)]
                # The named replica answered, so Envoy had no other replica to name in the response.
                assert answers == [None] * 8, (protocol, answers)
                assert await answered_since([target, other], before, 8) == [8, 0], protocol
            # Without the header: least-request over both, and every response names its replica
            # (all 20 random picks on one replica: about 2e-6).
            before = [get_info_calls(a), get_info_calls(b)]
            named = [await get_info(protocol, None) for _ in range(20)]
            spread = await answered_since([a, b], before, 20)
            assert sum(spread) == 20 and min(spread) >= 1, (protocol, spread)
            assert {session_replica(value or "") for value in named} == {f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"}


async def answered_since(servers: list[KilnServer], before: list[float], total: int) -> list[float]:
    """GetInfo calls each server answered since `before`, once they add up to `total` (a server
    counts a call after its answer is sent) or CALL_TIMEOUT_S has passed."""
    deadline = time.monotonic() + CALL_TIMEOUT_S
    while True:
        answered = [get_info_calls(server) - count for server, count in zip(servers, before, strict=True)]
        if sum(answered) >= total or time.monotonic() > deadline:
            return answered
        await asyncio.sleep(0.02)


@dataclass
class Replica:
    process: asyncio.subprocess.Process
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self, kill: bool = False) -> None:
        if self.process.returncode is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
        await self.process.wait()


@asynccontextmanager
async def replicas(tmp_path: Path, *, steps: int, step_delay_s: float) -> AsyncIterator[tuple[Replica, Replica, Envoy]]:
    """Two fake img2img server processes sharing one artifact folder, behind one Envoy."""
    shared = tmp_path / "shared-data"
    env = {
        "KILN_STORAGE__DATA_DIR": str(shared),
        "KILN_IMG2IMG__PROVIDER": "fake",
        "KILN_IMG2IMG__FAKE__STEPS": str(steps),
        "KILN_IMG2IMG__FAKE__STEP_DELAY_S": str(step_delay_s),
        "KILN_IMG2IMG__RUNTIME__MAX_CONCURRENCY": "4",
        "KILN_IMG2IMG__JOBS__HEARTBEAT_S": str(HEARTBEAT_S),
    }
    started: list[Replica] = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            process, port = await start(tmp_path / name, **env)
            started.append(Replica(process, port))
            async with channel_to(port) as channel:
                await wait_ready(img2img_grpc.Img2ImgProviderStub(channel), MODEL_ID)
        async with envoy_running([replica.port for replica in started]) as envoy:
            yield started[0], started[1], envoy
    finally:
        for replica in started:
            await replica.stop(kill=True)


async def submit(envoy: Envoy, **fields: object) -> tuple[str, str]:
    """Generate through Envoy, read `accepted`, drop the connection; the job id and its session."""
    async with channel_to(envoy.port) as channel:
        call = img2img_grpc.Img2ImgProviderStub(channel).Generate(img2img_request(**fields))
        accepted = await asyncio.wait_for(call.read(), CALL_TIMEOUT_S)
        assert isinstance(accepted, img2img.GenerateResponse) and accepted.WhichOneof("event") == "accepted"
        session = dict(await call.initial_metadata())[SESSION_HEADER]
    return accepted.accepted.job_id, session


async def get_job(envoy: Envoy, job_id: str, session: str) -> tuple[img2img.Job, str | None]:
    """GetJob through Envoy from a fresh connection; the job and the session header of the answer."""
    async with channel_to(envoy.port) as channel:
        call = img2img_grpc.Img2ImgProviderStub(channel).GetJob(
            img2img.GetJobRequest(job_id=job_id), metadata=[(SESSION_HEADER, session)], timeout=CALL_TIMEOUT_S
        )
        answer = await call
        named: str | None = dict(await call.initial_metadata()).get(SESSION_HEADER)
    return answer.job, named


async def watch_and_cancel(envoy: Envoy, job_id: str, session: str) -> list[img2img.GenerateResponse]:
    """WatchJob from a fresh connection until live progress, then CancelJob from another; all events."""
    metadata = [(SESSION_HEADER, session)]
    async with channel_to(envoy.port) as watching, channel_to(envoy.port) as cancelling:
        request = img2img.WatchJobRequest(job_id=job_id, after_sequence=1)
        watch = img2img_grpc.Img2ImgProviderStub(watching).WatchJob(request, metadata=metadata)
        events: list[img2img.GenerateResponse] = []
        while not events or events[-1].WhichOneof("event") != "progress":
            event = await asyncio.wait_for(watch.read(), CALL_TIMEOUT_S)
            assert isinstance(event, img2img.GenerateResponse), kinds(events)
            events.append(event)
        # The named replica answered the watch: Envoy names no other one.
        assert dict(await watch.initial_metadata()).get(SESSION_HEADER) is None
        cancel = img2img_grpc.Img2ImgProviderStub(cancelling).CancelJob(
            img2img.CancelJobRequest(job_id=job_id), metadata=metadata, timeout=CALL_TIMEOUT_S
        )
        cancelled = await cancel
        assert dict(await cancel.initial_metadata()).get(SESSION_HEADER) is None
        assert cancelled.job.status.state == job_pb2.JOB_STATE_CANCELLED, cancelled.job.status
        # The watch follows the job live to its end: the cancellation.
        events += await read_rest(watch)
        assert await watch.code() == grpc.StatusCode.CANCELLED
    return events


async def test_twenty_jobs_each_watched_and_cancelled_on_their_replica(tmp_path: Path) -> None:
    async with replicas(tmp_path, steps=200, step_delay_s=0.05) as (a, b, envoy):
        ran_on = []
        for index in range(20):
            job_id, session = await submit(envoy, seed=index)
            ran_on.append(session_replica(session))
            events = await watch_and_cancel(envoy, job_id, session)
            sequences = [event.sequence for event in events]
            assert sequences == list(range(2, 2 + len(events))), sequences
            assert kinds(events)[-1] == "error" and events[-1].error.code == code_pb2.CANCELLED
            assert error_reason(events[-1].error) == "CANCELLED"
    # Least-request spread the jobs; a job watched on the wrong replica would have seen no progress.
    assert set(ran_on) == {a.address, b.address}, ran_on


async def test_finished_job_is_readable_from_the_other_replica(tmp_path: Path) -> None:
    async with replicas(tmp_path, steps=3, step_delay_s=0.01) as (a, b, envoy):
        async with channel_to(envoy.port) as channel:
            call = img2img_grpc.Img2ImgProviderStub(channel).Generate(img2img_request())
            events = [event async for event in call]
            session = dict(await call.initial_metadata())[SESSION_HEADER]
        assert kinds(events)[-1] == "result"
        job_id = events[0].accepted.job_id
        ran, other = (a, b) if session_replica(session) == a.address else (b, a)
        # Forced to the replica that did not run it, it reads the job's stored record.
        read, named = await get_job(envoy, job_id, session_value(other.address))
        assert named is None  # `other` answered
        async with channel_to(other.port) as direct:  # and without the gateway
            stub = img2img_grpc.Img2ImgProviderStub(direct)
            direct_read = (await stub.GetJob(img2img.GetJobRequest(job_id=job_id), timeout=CALL_TIMEOUT_S)).job
            replay = [event async for event in stub.WatchJob(img2img.WatchJobRequest(job_id=job_id))]
        # With the replica that ran it gone, its session header leads to the other one.
        await ran.stop()
        after_stop, renamed = await get_job(envoy, job_id, session)
    for job in (read, direct_read, after_stop):
        assert job.status.state == job_pb2.JOB_STATE_SUCCEEDED, job.status
        assert job.status.last_sequence == events[-1].sequence
        assert [artifact.id for artifact in job.result.artifacts] == [
            artifact.id for artifact in events[-1].result.artifacts
        ]
    assert renamed is not None and session_replica(renamed) == other.address
    # The other replica replays the job from the store and ends with its result.
    assert kinds(replay)[-1] == "result" and replay[-1].sequence == events[-1].sequence
    assert replay[-1].result.artifacts[0].id == events[-1].result.artifacts[0].id


async def test_killed_replica_job_is_reported_promptly(tmp_path: Path) -> None:
    async with replicas(tmp_path, steps=400, step_delay_s=0.05) as (a, b, envoy):
        job_id, session = await submit(envoy, on_disconnect=job_pb2.DISCONNECT_POLICY_DETACH)
        victim, survivor = (a, b) if session_replica(session) == a.address else (b, a)
        running, _ = await get_job(envoy, job_id, session)
        deadline = time.monotonic() + CALL_TIMEOUT_S
        while running.status.state != job_pb2.JOB_STATE_RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            running, _ = await get_job(envoy, job_id, session)
        assert running.status.state == job_pb2.JOB_STATE_RUNNING, running.status
        await victim.stop(kill=True)
        killed = time.monotonic()
        # Each GetJob answers within CALL_TIMEOUT_S or fails the test; the record goes stale
        # after three heartbeats, then the survivor reports the job as lost.
        # Until the record is stale the survivor reports the state last stored, which may still be
        # QUEUED when the kill came before the record of the start was written.
        unfinished = (job_pb2.JOB_STATE_QUEUED, job_pb2.JOB_STATE_RUNNING)
        job, named = await get_job(envoy, job_id, session)
        while job.status.state in unfinished and time.monotonic() - killed < 3 * CALL_TIMEOUT_S:
            await asyncio.sleep(0.1)
            job, named = await get_job(envoy, job_id, session)
        reported_after = time.monotonic() - killed
    assert job.status.state == job_pb2.JOB_STATE_FAILED, (job.status, round(reported_after, 1))
    assert job.status.error.code == code_pb2.UNAVAILABLE
    assert error_reason(job.status.error) == "REPLICA_LOST"
    assert named is not None and session_replica(named) == survivor.address
