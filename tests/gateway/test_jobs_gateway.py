"""Jobs through a real Envoy to a real img2img server (fake provider): GetJob, WatchJob, CancelJob
and ListJobs over JSON/SSE and gRPC-Web, and a Generate stream dropped mid-job on every protocol.

One server (STEPS x STEP_DELAY_S per job, so a job is still running when a test acts on it) behind
one Envoy for the whole module. Every test waits for its jobs to end, so the count of provider
runs (`provider_runs`) moves only with the test that reads it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format
from google.rpc import code_pb2
from grpc_status import rpc_status

from gateway.kiln_gateway import Envoy
from gateway.kiln_gateway.render import SESSION_HEADER
from kiln.common.v1 import job_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import (
    bad_request_violations,
    channel_to,
    envoy_running,
    error_reason,
    img2img_json,
    img2img_request,
    json_error_reason,
    kiln_server,
    kinds,
    read_rest,
    session_replica,
    sse_event,
)
from tests.gateway.grpc_web import GrpcWebCall, GrpcWebError, collect
from tests.jobs_support import assert_consecutive, provider_runs

pytestmark = pytest.mark.asyncio(loop_scope="module")

STEPS = 10
STEP_DELAY_S = 0.2
#: Every event of a job that ran to the end, in order.
ALL_KINDS = ["accepted"] + ["progress"] * STEPS + ["result"]
SERVICE = "/kiln.img2img.v1.Img2ImgProvider"
JOBS = "/v1/img2img/jobs"
#: A well-formed job id (26 characters, Crockford base32) that no server ever issued.
UNKNOWN_JOB = "01ARZ3NDEKTSV4RRFFQ69G5FAV"
#: Seconds any single wait of these tests may take on two busy cores before it counts as a hang.
PATIENCE_S = 30.0
#: A page origin the gateway allows (CORS).
ORIGIN = "http://127.0.0.1:8081"


@dataclass
class Stack:
    server: KilnServer
    envoy: Envoy

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.envoy.port}"

    @property
    def replica(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def client(self) -> httpx.AsyncClient:
        """A new HTTP/1.1 client: its own connection, apart from every other client's."""
        return httpx.AsyncClient(base_url=self.base_url, timeout=PATIENCE_S)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root: Path = tmp_path_factory.mktemp("jobs-gateway")
    fake = {"steps": STEPS, "step_delay_s": STEP_DELAY_S}
    # Room for the few jobs a test runs side by side, so none waits behind another.
    runtime = {"max_concurrency": 4, "max_queue": 8}
    async with (
        kiln_server("img2img", root, fake=fake, runtime=runtime) as server,
        envoy_running([server.port], cors_allowed_origins=[ORIGIN]) as envoy,
    ):
        yield Stack(server, envoy)


async def sse(response: httpx.Response) -> AsyncIterator[img2img.GenerateResponse]:
    """The events of a `text/event-stream` response as they arrive."""
    assert response.status_code == 200, (await response.aread())[:500]
    assert response.headers["content-type"].startswith("text/event-stream")
    async for line in response.aiter_lines():
        if (event := sse_event(line)) is not None:
            yield event


async def until_progress(
    events: AsyncIterator[img2img.GenerateResponse], into: list[img2img.GenerateResponse]
) -> img2img.GenerateResponse:
    """Read events into `into` up to the first progress event; it is returned."""
    async for event in events:
        into.append(event)
        if event.WhichOneof("event") == "progress":
            return event
    raise AssertionError(f"the stream ended before any progress: {kinds(into)}")


def parse(body: bytes, message: Any) -> Any:
    """A JSON answer parsed strictly into its message (an unknown field fails)."""
    return json_format.Parse(body, message)


async def get_job(client: httpx.AsyncClient, job_id: str, session: str) -> img2img.Job:
    response = await client.get(f"{JOBS}/{job_id}", headers={SESSION_HEADER: session})
    assert response.status_code == 200, response.text[:500]
    job: img2img.Job = parse(response.content, img2img.GetJobResponse()).job
    return job


async def wait_unwatched(client: httpx.AsyncClient, job_id: str, session: str) -> img2img.Job:
    """GetJob until the job has no watcher: the server has seen its stream go."""
    deadline = time.monotonic() + PATIENCE_S
    while (job := await get_job(client, job_id, session)).status.watchers and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert job.status.watchers == 0, job.status
    return job


async def json_generate(client: httpx.AsyncClient, **fields: Any) -> tuple[list[img2img.GenerateResponse], str]:
    """A whole JSON Generate: its events and the session header of its response."""
    async with client.stream("POST", "/v1/img2img:generate", json=img2img_json(**fields)) as response:
        events = [event async for event in sse(response)]
        return events, response.headers[SESSION_HEADER]


async def test_json_get_and_watch_a_finished_job(stack: Stack) -> None:
    async with stack.client() as client:
        events, session = await json_generate(client, prompt="a heron at dusk")
        # Envoy names the replica that ran the job; the client sends it back with the job.
        assert session_replica(session) == stack.replica
        assert kinds(events) == ALL_KINDS
        assert_consecutive(events)
        job_id = events[0].accepted.job_id
        job = await get_job(client, job_id, session)
        replay = await client.get(
            f"{JOBS}/{job_id}:watch", params={"afterSequence": 3}, headers={SESSION_HEADER: session}
        )
        replayed = [event for line in replay.text.splitlines() if (event := sse_event(line)) is not None]
    assert job.status.job_id == job_id
    assert job.status.state == job_pb2.JOB_STATE_SUCCEEDED
    assert job.status.last_sequence == events[-1].sequence
    assert job.request.prompt == "a heron at dusk" and job.request.image == b""
    (artifact,) = job.result.artifacts
    assert artifact.id == events[-1].result.artifacts[0].id and not artifact.inline_data
    # A finished job replays from the cursor and ends: the same events as the Generate stream.
    assert replay.status_code == 200
    assert replayed == events[3:]


async def test_pages_may_send_and_read_the_session_header(stack: Stack) -> None:
    asked = {"origin": ORIGIN, "access-control-request-method": "POST"}
    async with stack.client() as client:
        preflights = [
            await client.options(
                f"{JOBS}/{UNKNOWN_JOB}:cancel",
                headers={**asked, "access-control-request-headers": f"content-type,{SESSION_HEADER}"},
            ),
            await client.options(
                f"{SERVICE}/WatchJob",
                headers={**asked, "access-control-request-headers": f"content-type,x-grpc-web,{SESSION_HEADER}"},
            ),
        ]
        answer = await client.get("/v1/img2img/info", headers={"origin": ORIGIN})
    for preflight in preflights:
        assert preflight.status_code == 200, preflight.request.url
        assert preflight.headers.get("access-control-allow-origin") == ORIGIN, preflight.request.url
        assert SESSION_HEADER in preflight.headers["access-control-allow-headers"].split(",")
    # A page's script can read the header only when it is exposed.
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert SESSION_HEADER in answer.headers["access-control-expose-headers"].split(",")
    assert session_replica(answer.headers[SESSION_HEADER]) == stack.replica


async def test_json_unknown_and_malformed_job_ids(stack: Stack) -> None:
    async with stack.client() as client:
        answers = [
            await client.get(f"{JOBS}/{UNKNOWN_JOB}"),
            await client.get(f"{JOBS}/{UNKNOWN_JOB}:watch"),
            await client.post(f"{JOBS}/{UNKNOWN_JOB}:cancel", json={}),
        ]
        malformed = await client.get(f"{JOBS}/not-a-job")
    for answer in answers:
        # An error before any event is an HTTP status with the google.rpc.Status body.
        assert answer.status_code == 404, answer.text[:500]
        assert answer.json()["code"] == code_pb2.NOT_FOUND
        assert json_error_reason(answer.json()) == "NOT_FOUND"
    assert malformed.status_code == 400, malformed.text[:500]
    assert [v["field"] for v in bad_request_violations(malformed.json())] == ["job_id"]


async def test_json_cancel_a_running_job_from_another_connection(stack: Stack) -> None:
    async with stack.client() as submitter, stack.client() as other:
        async with submitter.stream("POST", "/v1/img2img:generate", json=img2img_json()) as response:
            session = response.headers[SESSION_HEADER]
            stream = sse(response)
            events: list[img2img.GenerateResponse] = []
            await until_progress(stream, events)
            job_id = events[0].accepted.job_id
            cancelled = await other.post(f"{JOBS}/{job_id}:cancel", json={}, headers={SESSION_HEADER: session})
            events += [event async for event in stream]
        again = await other.post(f"{JOBS}/{job_id}:cancel", json={}, headers={SESSION_HEADER: session})
    assert cancelled.status_code == 200, cancelled.text[:500]
    job = parse(cancelled.content, img2img.CancelJobResponse()).job
    assert job.status.state == job_pb2.JOB_STATE_CANCELLED
    assert error_reason(job.status.error) == "CANCELLED"
    # The submitter's stream saw the cancellation as its last event, in sequence.
    assert kinds(events)[-1] == "error" and events[-1].error.code == code_pb2.CANCELLED
    assert_consecutive(events)
    assert job.status.last_sequence == events[-1].sequence
    # Idempotent: a second cancel returns the same cancelled job (only its watchers went).
    assert again.status_code == 200, again.text[:500]
    second = parse(again.content, img2img.CancelJobResponse()).job
    second.status.watchers = job.status.watchers
    assert second == job


async def test_json_cancel_of_a_finished_job_changes_nothing(stack: Stack) -> None:
    async with stack.client() as client:
        events, session = await json_generate(client)
        job_id = events[0].accepted.job_id
        before = await get_job(client, job_id, session)
        answer = await client.post(f"{JOBS}/{job_id}:cancel", json={}, headers={SESSION_HEADER: session})
        after = await get_job(client, job_id, session)
    assert answer.status_code == 200, answer.text[:500]
    assert before.status.state == job_pb2.JOB_STATE_SUCCEEDED
    assert parse(answer.content, img2img.CancelJobResponse()).job == before == after


async def test_json_list_jobs_pages_newest_first(stack: Stack) -> None:
    async with channel_to(stack.envoy.port) as channel:
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        calls = []
        submitted = []
        for index in range(3):  # accepted one after the other, so their order is known
            calls.append(stub.Generate(img2img_request(seed=100 + index)))
            submitted.append((await calls[-1].read()).accepted.job_id)
        finished = [await read_rest(call) for call in calls]
    assert all(kinds(events)[-1] == "result" for events in finished)
    async with stack.client() as client:
        everything, last = await list_page(client, {"pageSize": 100})  # every job of this module
        pages = await list_pages(client, {"pageSize": 2})
        succeeded, token = await list_page(client, {"pageSize": 100, "states": "JOB_STATE_SUCCEEDED"})
        _, first_token = await list_page(client, {"pageSize": 1, "states": "JOB_STATE_SUCCEEDED"})
        switched = await client.get(
            JOBS, params={"pageSize": 1, "pageToken": first_token, "states": "JOB_STATE_CANCELLED"}
        )
    listed = [job for page in pages for job in page]
    ids = [job.status.job_id for job in listed]
    assert last == ""
    assert len(pages[0]) == 2 and len(pages) >= 2
    assert len(ids) == len(set(ids)), "a job on two pages"
    # Pages of 2 list the same jobs as one large page, in the same order: newest first.
    assert ids == [job.status.job_id for job in everything]
    created = [job.status.create_time.ToNanoseconds() for job in listed]
    assert created == sorted(created, reverse=True)
    assert [job_id for job_id in ids if job_id in submitted] == submitted[::-1]
    assert {job.status.state for job in succeeded} == {job_pb2.JOB_STATE_SUCCEEDED}
    assert set(submitted) <= {job.status.job_id for job in succeeded}
    assert token == ""
    # A token belongs to its filter.
    assert switched.status_code == 400, switched.text[:500]
    assert [v["field"] for v in bad_request_violations(switched.json())] == ["page_token"]


async def list_page(client: httpx.AsyncClient, params: dict[str, Any]) -> tuple[list[img2img.Job], str]:
    answer = await client.get(JOBS, params=params)
    assert answer.status_code == 200, answer.text[:500]
    page = parse(answer.content, img2img.ListJobsResponse())
    return list(page.jobs), page.next_page_token


async def list_pages(client: httpx.AsyncClient, params: dict[str, Any]) -> list[list[img2img.Job]]:
    """Every page of ListJobs, following next_page_token."""
    pages = []
    token = ""
    while True:
        jobs, token = await list_page(client, {**params, **({"pageToken": token} if token else {})})
        pages.append(jobs)
        if not token:
            return pages
        assert len(pages) < 100, "ListJobs never ends"


async def test_grpc_web_watch_and_cancel(stack: Stack) -> None:
    async with stack.client() as submitter, stack.client() as watcher, stack.client() as canceller:
        submit = GrpcWebCall(submitter, f"{SERVICE}/Generate", img2img_request(), img2img.GenerateResponse)
        submitted: list[img2img.GenerateResponse] = []
        generate = submit.__aiter__()
        await until_progress(generate, submitted)
        session = submit.headers[SESSION_HEADER]
        assert session_replica(session) == stack.replica
        job_id = submitted[0].accepted.job_id
        metadata = {SESSION_HEADER: session}
        request = img2img.WatchJobRequest(job_id=job_id)
        watch = GrpcWebCall(watcher, f"{SERVICE}/WatchJob", request, img2img.GenerateResponse, metadata=metadata)
        watched: list[img2img.GenerateResponse] = []
        stream = watch.__aiter__()
        await until_progress(stream, watched)  # replayed from `accepted`, then live
        cancel = GrpcWebCall(
            canceller,
            f"{SERVICE}/CancelJob",
            img2img.CancelJobRequest(job_id=job_id),
            img2img.CancelJobResponse,
            metadata=metadata,
        )
        (cancelled,) = await collect(cancel)
        watch_end = await failure_after(stream, watched)
        generate_end = await failure_after(generate, submitted)
    assert cancelled.job.status.state == job_pb2.JOB_STATE_CANCELLED
    for events, end in ((watched, watch_end), (submitted, generate_end)):
        assert_consecutive(events)
        assert kinds(events)[-1] == "error" and events[-1].error.code == code_pb2.CANCELLED
        assert end.code == code_pb2.CANCELLED
    assert watched == submitted  # both watchers saw the same events


async def failure_after(
    events: AsyncIterator[img2img.GenerateResponse], into: list[img2img.GenerateResponse]
) -> GrpcWebError:
    """Read the rest of a gRPC-Web stream into `into`; the error it ends with."""
    try:
        async for event in events:
            into.append(event)
    except GrpcWebError as error:
        return error
    raise AssertionError(f"the stream ended OK after {kinds(into)}")


async def drop(events: AsyncIterator[Any]) -> None:
    """Close a stream that has not ended: the connection under it goes with it."""
    assert isinstance(events, AsyncGenerator)
    await events.aclose()


async def dropped_json(stack: Stack) -> tuple[list[img2img.GenerateResponse], str, list[img2img.GenerateResponse]]:
    async with (
        stack.client() as client,
        client.stream("POST", "/v1/img2img:generate", json=img2img_json()) as response,
    ):
        session = response.headers[SESSION_HEADER]
        before: list[img2img.GenerateResponse] = []
        stream = sse(response)
        await until_progress(stream, before)
        await drop(stream)
    # httpx closes a response read only in part with its connection, so Envoy resets the stream.
    job_id, cursor = before[0].accepted.job_id, before[-1].sequence
    async with stack.client() as client:
        await wait_unwatched(client, job_id, session)
        path = f"{JOBS}/{job_id}:watch"
        async with client.stream(
            "GET", path, params={"afterSequence": cursor}, headers={SESSION_HEADER: session}
        ) as response:
            after = [event async for event in sse(response)]
    return before, session, after


async def dropped_grpc_web(
    stack: Stack,
) -> tuple[list[img2img.GenerateResponse], str, list[img2img.GenerateResponse]]:
    async with stack.client() as client:
        call = GrpcWebCall(client, f"{SERVICE}/Generate", img2img_request(), img2img.GenerateResponse)
        before: list[img2img.GenerateResponse] = []
        stream = call.__aiter__()
        await until_progress(stream, before)
        session = call.headers[SESSION_HEADER]
        await drop(stream)
    job_id, cursor = before[0].accepted.job_id, before[-1].sequence
    async with stack.client() as client:
        await wait_unwatched(client, job_id, session)
        request = img2img.WatchJobRequest(job_id=job_id, after_sequence=cursor)
        watch = GrpcWebCall(
            client, f"{SERVICE}/WatchJob", request, img2img.GenerateResponse, metadata={SESSION_HEADER: session}
        )
        after = await collect(watch)
    return before, session, after


async def dropped_grpc(stack: Stack) -> tuple[list[img2img.GenerateResponse], str, list[img2img.GenerateResponse]]:
    before: list[img2img.GenerateResponse] = []
    channel = channel_to(stack.envoy.port)
    call = img2img_grpc.Img2ImgProviderStub(channel).Generate(img2img_request())
    session = dict(await call.initial_metadata())[SESSION_HEADER]
    while (event := await call.read()).WhichOneof("event") != "progress":
        before.append(event)
    before.append(event)
    await channel.close(grace=None)  # the connection goes, not just the call
    job_id, cursor = before[0].accepted.job_id, before[-1].sequence
    async with stack.client() as client:
        await wait_unwatched(client, job_id, session)
    async with channel_to(stack.envoy.port) as fresh:
        request = img2img.WatchJobRequest(job_id=job_id, after_sequence=cursor)
        watch = img2img_grpc.Img2ImgProviderStub(fresh).WatchJob(request, metadata=[(SESSION_HEADER, session)])
        after = [event async for event in watch]
        assert await watch.code() == grpc.StatusCode.OK
    return before, session, after


DROPS = {"json": dropped_json, "grpc-web": dropped_grpc_web, "grpc": dropped_grpc}


@pytest.mark.parametrize("protocol", list(DROPS))
async def test_dropped_stream_job_finishes_and_replays_from_the_cursor(stack: Stack, protocol: str) -> None:
    runs = provider_runs(stack.server)
    before, session, after = await DROPS[protocol](stack)
    assert session_replica(session) == stack.replica
    assert_consecutive(before)
    # The new stream starts right after the cursor and ends with the result: no gap, no duplicate.
    assert_consecutive(after, after=before[-1].sequence)
    assert kinds(before + after) == ALL_KINDS
    async with stack.client() as client:
        job = await get_job(client, before[0].accepted.job_id, session)
    assert job.status.state == job_pb2.JOB_STATE_SUCCEEDED
    assert job.status.last_sequence == after[-1].sequence
    # The model ran once for the job, though two streams watched it.
    assert provider_runs(stack.server) - runs == 1


async def test_grpc_watch_of_an_unknown_job_is_not_found(stack: Stack) -> None:
    async with channel_to(stack.envoy.port) as channel:
        watch = img2img_grpc.Img2ImgProviderStub(channel).WatchJob(img2img.WatchJobRequest(job_id=UNKNOWN_JOB))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await watch.read()
    assert failure.value.code() == grpc.StatusCode.NOT_FOUND
    status = rpc_status.from_call(failure.value)
    assert status is not None and error_reason(status) == "NOT_FOUND"
