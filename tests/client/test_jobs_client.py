"""The clients' job calls against real servers (fake provider): get, watch, cancel, list, sync
and asyncio; the idempotency key; the gateway session taking a job's calls to its replica.

The blocking client runs in a worker thread (`asyncio.to_thread`) so the in-process servers on
the test's event loop keep answering.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from kiln.common.v1 import job_pb2
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.mesh.v1 import mesh_service_pb2 as mesh
from kiln_client import (
    AsyncImg2ImgClient,
    Img2ImgClient,
    Img2ImgResult,
    InvalidArgumentError,
    JobPage,
    MeshClient,
    MeshResult,
    NotFoundError,
)
from kiln_client import CancelledError as JobCancelledError
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import envoy_running, kiln_server, kinds, session_replica
from tests.jobs_support import assert_consecutive, eventually, provider_runs
from tests.servers import StartServer
from tests.support import png_bytes

#: Seconds a condition the servers must reach gets (two busy cores): generous, never asserted.
PATIENCE_S = 30.0
#: A well-formed job id no server has issued.
UNKNOWN_JOB = "01ARZ3NDEKTSV4RRFFQ69G5FAV"


def slots(server: KilnServer) -> tuple[int, int]:
    return server.runtime.admission.running, server.runtime.admission.queued


async def test_a_finished_job_is_read_replayed_and_listed_by_id(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake={"steps": 3})

    def scenario() -> tuple[
        Img2ImgResult,
        Img2ImgResult,
        img2img.Job,
        list[img2img.GenerateResponse],
        list[img2img.GenerateResponse],
        img2img.Job,
        list[str],
        JobPage[img2img.Job],
        JobPage[img2img.Job],
    ]:
        with Img2ImgClient(f"127.0.0.1:{server.port}", timeout=PATIENCE_S) as client:
            first = client.generate_image(png_bytes(), prompt="a fox", seed=5, preview_every=1)
            second = client.generate_image(png_bytes(), prompt="a fox", seed=5)  # a new key: a new job
            job = client.get_job(first.job_id)
            replay = list(client.watch_job(first.job_id))
            tail = list(client.watch_job(first.job_id, after=replay[-2].sequence))
            unchanged = client.cancel_job(first.job_id)
            newest_first = [job.status.job_id for job in client.list_jobs(page_size=1)]
            succeeded = client.list_jobs_page(states=["succeeded"], page_size=1)
            running = client.list_jobs_page(states=["JOB_STATE_RUNNING"])
            return first, second, job, replay, tail, unchanged, newest_first, succeeded, running

    first, second, job, replay, tail, unchanged, newest_first, succeeded, running = await asyncio.to_thread(scenario)
    assert first.job_id and second.job_id != first.job_id
    assert first.image == second.image  # same seed, and still two runs: nothing was attached
    status = job.status
    assert (status.job_id, status.state) == (first.job_id, job_pb2.JOB_STATE_SUCCEEDED)
    assert str(uuid.UUID(status.client_request_id, version=4)) == status.client_request_id  # the client's key
    assert job.request.prompt == "a fox" and job.request.seed == 5 and job.request.image == b""
    (artifact,) = job.result.artifacts
    assert artifact.sha256 == first.artifact.sha256 and artifact.inline_data == b""
    assert_consecutive(replay)
    assert kinds(replay)[0] == "accepted" and kinds(replay)[-1] == "result"
    assert kinds(replay).count("progress") == 3
    assert replay[-1].result.artifacts[0].sha256 == first.artifact.sha256
    assert tail == replay[-1:]
    assert unchanged.status.state == job_pb2.JOB_STATE_SUCCEEDED and unchanged.status.end_time == status.end_time
    assert newest_first == [second.job_id, first.job_id]  # two pages of one
    assert [job.status.job_id for job in succeeded.jobs] == [second.job_id] and succeeded.next_page_token
    assert running.jobs == [] and running.next_page_token == ""
    assert provider_runs(server) == 2


async def test_cancel_job_from_another_client_ends_the_running_job(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake={"steps": 400, "step_delay_s": 0.05})
    target = f"127.0.0.1:{server.port}"
    async with (
        AsyncImg2ImgClient(target, timeout=PATIENCE_S) as runner,
        AsyncImg2ImgClient(target, timeout=PATIENCE_S) as other,
    ):
        events = runner.generate(png_bytes(), prompt="x")
        job_id = (await anext(events)).accepted.job_id

        async def running() -> bool:
            return (await other.get_job(job_id)).status.state == job_pb2.JOB_STATE_RUNNING

        await eventually(running, PATIENCE_S)
        listed = [job.status.job_id async for job in other.list_jobs(states=["running", "queued"])]
        cancelled = await other.cancel_job(job_id)
        with pytest.raises(JobCancelledError) as caught:
            async for _ in events:
                pass
        again = await other.cancel_job(job_id)
    assert listed == [job_id]
    assert cancelled.status.state == job_pb2.JOB_STATE_CANCELLED
    assert again.status.state == job_pb2.JOB_STATE_CANCELLED and again.status.end_time == cancelled.status.end_time
    assert caught.value.reason == "CANCELLED"
    await eventually(lambda: slots(server) == (0, 0), PATIENCE_S)
    assert job_id not in server.runtime.store.job_ids()  # a cancelled job leaves nothing


async def test_leaving_a_stream_cancels_its_job_unless_it_was_detached(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake={"steps": 40, "step_delay_s": 0.05})
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=PATIENCE_S) as client:
        left = client.generate(png_bytes(), prompt="left")
        left_id = (await anext(left)).accepted.job_id
        await left.aclose()  # the client sends CancelJob: the server's grace period is not waited
        detached = client.generate(png_bytes(), prompt="detached", on_disconnect="DETACH")
        detached_id = (await anext(detached)).accepted.job_id
        await detached.aclose()
        assert (await client.get_job(left_id)).status.state == job_pb2.JOB_STATE_CANCELLED

        async def detached_finished() -> bool:
            return (await client.get_job(detached_id)).status.state == job_pb2.JOB_STATE_SUCCEEDED

        await eventually(detached_finished, PATIENCE_S)  # it ran to its end unwatched
        job = await client.get_job(detached_id)
    assert job.status.disconnect_policy == job_pb2.DISCONNECT_POLICY_DETACH
    assert job.status.watchers == 0


async def test_unknown_and_malformed_job_ids(start_server: StartServer) -> None:
    server, _ = await start_server("img2img")
    async with AsyncImg2ImgClient(f"127.0.0.1:{server.port}", timeout=PATIENCE_S) as client:
        with pytest.raises(NotFoundError) as unknown:
            await client.get_job(UNKNOWN_JOB)
        with pytest.raises(NotFoundError):
            async for _ in client.watch_job(UNKNOWN_JOB):
                pass
        with pytest.raises(InvalidArgumentError) as malformed:
            await client.cancel_job("not a job id")
    assert unknown.value.reason == "NOT_FOUND"
    assert [field for field, _ in malformed.value.field_violations] == ["job_id"]


async def test_the_same_client_request_id_runs_the_model_once(start_server: StartServer) -> None:
    server, _ = await start_server("img2img", fake={"steps": 20, "step_delay_s": 0.02})
    target, key = f"127.0.0.1:{server.port}", str(uuid.uuid4())
    async with AsyncImg2ImgClient(target, timeout=PATIENCE_S) as one, AsyncImg2ImgClient(target) as two:
        first, second = await asyncio.gather(
            one.generate_image(png_bytes(), prompt="a fox", seed=3, client_request_id=key),
            two.generate_image(png_bytes(), prompt="a fox", seed=3, client_request_id=key),
        )

        def later() -> Img2ImgResult:
            with Img2ImgClient(target, timeout=PATIENCE_S) as client:
                return client.generate_image(png_bytes(), prompt="a fox", seed=3, client_request_id=key)

        third = await asyncio.to_thread(later)
        with pytest.raises(InvalidArgumentError) as caught:
            await one.generate_image(png_bytes(), prompt="another fox", seed=3, client_request_id=key)
    assert first.job_id == second.job_id == third.job_id
    assert first.image == second.image == third.image and first.image is not None
    assert provider_runs(server) == 1
    assert [field for field, _ in caught.value.field_violations] == ["client_request_id"]


async def test_mesh_jobs_by_id(start_server: StartServer) -> None:
    server, _ = await start_server("mesh", fake={"steps": 2})

    def scenario() -> tuple[MeshResult, mesh.Job, list[mesh.GenerateResponse], list[str]]:
        with MeshClient(f"127.0.0.1:{server.port}", timeout=PATIENCE_S) as client:
            result = client.generate_mesh(png_bytes(), output_format="OBJ")
            job = client.get_job(result.job_id)
            replay = list(client.watch_job(result.job_id))
            listed = [job.status.job_id for job in client.list_jobs()]
            return result, job, replay, listed

    result, job, replay, listed = await asyncio.to_thread(scenario)
    assert job.status.state == job_pb2.JOB_STATE_SUCCEEDED
    assert job.result.artifacts[0].sha256 == result.artifact.sha256
    assert_consecutive(replay)  # type: ignore[arg-type]
    assert kinds(replay)[-1] == "result"
    assert listed == [result.job_id]


async def test_through_the_gateway_a_jobs_calls_reach_the_replica_that_runs_it(tmp_path: Path) -> None:
    # Two replicas sharing one store; each job's session names the replica that holds it, and
    # CancelJob can stop a running job only there (another replica sees just its stored record).
    fake = {"steps": 400, "step_delay_s": 0.05}
    async with (
        kiln_server("img2img", tmp_path, fake=fake) as one,
        kiln_server("img2img", tmp_path, fake=fake) as two,
        envoy_running([one.port, two.port]) as envoy,
    ):
        replicas = {f"127.0.0.1:{server.port}": server for server in (one, two)}

        def scenario() -> tuple[dict[str, str], dict[str, img2img.GenerateResponse], dict[str, int]]:
            with Img2ImgClient(f"127.0.0.1:{envoy.port}", timeout=PATIENCE_S) as client:
                streams = [client.generate(png_bytes(), prompt=f"job {n}") for n in range(6)]
                ids = [next(events).accepted.job_id for events in streams]  # open at once: both get some
                sessions = {job_id: client.sessions.get(job_id) or "" for job_id in ids}
                # Live events after `accepted` come only from the replica that runs the job (another
                # one has its stored record: `accepted`, then nothing until the outcome).
                progress = {job_id: next(client.watch_job(job_id, after=1, timeout=10)) for job_id in ids}
                states = {job_id: int(client.cancel_job(job_id).status.state) for job_id in ids}
                for events in streams:
                    with pytest.raises(JobCancelledError):
                        list(events)
                return sessions, progress, states

        sessions, progress, states = await asyncio.to_thread(scenario)
        owners = {job_id: replicas[session_replica(value)] for job_id, value in sessions.items()}
    assert all(owner.runtime.jobs.get(job_id) is not None for job_id, owner in owners.items())
    assert {event.sequence for event in progress.values()} == {2}
    assert set(kinds(list(progress.values()))) <= {"queued", "progress"}
    assert set(states.values()) == {job_pb2.JOB_STATE_CANCELLED}
