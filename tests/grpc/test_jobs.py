"""Jobs apart from their streams, over gRPC against real servers: replay, cancel, lookup, idempotency.

The gateway's protocols (gRPC-Web, JSON/SSE) and two replicas are tested in tests/gateway.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kiln.artifacts.v1 import artifact_service_pb2 as artifacts
from kiln.artifacts.v1 import artifact_service_pb2_grpc as artifacts_grpc
from kiln.common.v1 import job_pb2
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln.mesh.v1 import mesh_service_pb2 as mesh
from kiln.mesh.v1 import mesh_service_pb2_grpc as mesh_grpc
from kiln_img2img.providers.fake import FakeImg2ImgProvider
from kiln_runtime.server import KilnServer
from kiln_runtime.storage import new_job_id
from tests.img2img.test_process_img2img import start as start_process
from tests.jobs_support import eventually
from tests.servers import StartServer
from tests.support import img2img_request as request
from tests.support import png_bytes

CANCELLED, SUCCEEDED, RUNNING = job_pb2.JOB_STATE_CANCELLED, job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_RUNNING


def stub_for(server: KilnServer) -> tuple[pb_grpc.Img2ImgProviderStub, grpc.aio.Channel]:
    """A stub on a connection of its own, as a client that reconnects would have."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    return pb_grpc.Img2ImgProviderStub(channel), channel


async def collect(call: Any) -> list[pb.GenerateResponse]:
    """The rest of a stream's events (read() works whether or not some were read already)."""
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


async def collect_until_status(call: Any) -> tuple[list[pb.GenerateResponse], grpc.aio.AioRpcError | None]:
    events: list[pb.GenerateResponse] = []
    try:
        while (event := await call.read()) is not grpc.aio.EOF:
            events.append(event)
    except grpc.aio.AioRpcError as err:
        return events, err
    return events, None


def reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


def violated_fields(error: grpc.aio.AioRpcError) -> set[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            return {violation.field for violation in bad.field_violations}
    return set()


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Job ids the fake img2img model ran, one entry per run."""
    calls: list[str] = []
    original = FakeImg2ImgProvider.run

    def counting(self: FakeImg2ImgProvider, inputs: Any, ctx: Any) -> Any:
        calls.append(ctx.job_id)
        return original(self, inputs, ctx)

    monkeypatch.setattr(FakeImg2ImgProvider, "run", counting)
    return calls


async def job_state(stub: pb_grpc.Img2ImgProviderStub, job_id: str) -> int:
    return int((await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job.status.state)


async def test_sequences_count_from_accepted_without_gaps(start_server: StartServer) -> None:
    _, channel = await start_server(fake={"steps": 4})
    events = await collect(pb_grpc.Img2ImgProviderStub(channel).Generate(request(preview_every_n_steps=1)))
    assert events[0].WhichOneof("event") == "accepted" and events[-1].WhichOneof("event") == "result"
    assert [event.sequence for event in events] == list(range(1, len(events) + 1))


async def test_a_dropped_stream_keeps_running_and_a_new_connection_resumes_from_its_cursor(
    start_server: StartServer, runs: list[str]
) -> None:
    server, channel = await start_server(fake={"steps": 30, "step_delay_s": 0.03})
    call = pb_grpc.Img2ImgProviderStub(channel).Generate(request(preview_every_n_steps=5))
    seen = [await call.read() for _ in range(4)]  # accepted and the first progress events
    call.cancel()  # the connection's stream is gone; the job is not
    job_id = seen[0].accepted.job_id
    stub, other = stub_for(server)
    try:
        rest = await collect(stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_sequence=seen[-1].sequence)))
        sequences = [event.sequence for event in seen + rest]
        assert sequences == list(range(1, len(sequences) + 1)), "a gap or a duplicate"
        assert rest[-1].WhichOneof("event") == "result"
        assert runs == [job_id]
        # A watcher from the start sees the very same events, byte for byte.
        replay = await collect(stub.WatchJob(pb.WatchJobRequest(job_id=job_id)))
        assert [e.SerializeToString() for e in replay] == [e.SerializeToString() for e in seen + rest]
    finally:
        await other.close()


async def test_nobody_watching_cancels_the_job_after_the_grace_period(
    start_server: StartServer, runs: list[str]
) -> None:
    server, channel = await start_server(fake={"steps": 400, "step_delay_s": 0.05}, jobs={"disconnect_grace_s": 0.5})
    stub = pb_grpc.Img2ImgProviderStub(channel)
    call = stub.Generate(request())
    job_id = (await call.read()).accepted.job_id
    await call.read()
    call.cancel()
    await eventually(lambda: server.runtime.admission.running == 0)
    job = (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert job.status.state == CANCELLED
    assert "nobody watched" in job.status.error.message
    assert not (server.runtime.store.root / job_id).exists(), "an abandoned job stores nothing"
    abandoned = server.runtime.metrics.registry.get_sample_value("kiln_jobs_abandoned_total", {"service": "img2img"})
    assert abandoned == 1
    server.runtime.admission.check_at_rest()


async def test_a_watcher_within_the_grace_period_keeps_the_job(start_server: StartServer) -> None:
    server, channel = await start_server(fake={"steps": 20, "step_delay_s": 0.05}, jobs={"disconnect_grace_s": 1.0})
    call = pb_grpc.Img2ImgProviderStub(channel).Generate(request())
    job_id = (await call.read()).accepted.job_id
    call.cancel()
    stub, other = stub_for(server)
    try:
        events = await collect(stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_sequence=1)))
        assert events[-1].WhichOneof("event") == "result"
        assert await job_state(stub, job_id) == SUCCEEDED
    finally:
        await other.close()


async def test_detach_runs_to_the_end_with_nobody_watching(start_server: StartServer) -> None:
    _, channel = await start_server(fake={"steps": 10, "step_delay_s": 0.05}, jobs={"disconnect_grace_s": 0.1})
    stub = pb_grpc.Img2ImgProviderStub(channel)
    call = stub.Generate(request(on_disconnect=job_pb2.DISCONNECT_POLICY_DETACH))
    job_id = (await call.read()).accepted.job_id
    call.cancel()
    await eventually(lambda: _is(stub, job_id, SUCCEEDED))
    job = (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert job.status.disconnect_policy == job_pb2.DISCONNECT_POLICY_DETACH
    assert job.result.artifacts[0].id and not job.result.artifacts[0].inline_data


async def _ready(stub: pb_grpc.Img2ImgProviderStub) -> bool:
    info = await stub.GetInfo(pb.GetInfoRequest())
    return bool(info.model.readiness == 2)  # READY


async def _is(stub: pb_grpc.Img2ImgProviderStub, job_id: str, state: int) -> bool:
    return await job_state(stub, job_id) == state


async def test_the_same_client_request_id_runs_the_model_once(start_server: StartServer, runs: list[str]) -> None:
    _, channel = await start_server(fake={"steps": 10, "step_delay_s": 0.02})
    stub = pb_grpc.Img2ImgProviderStub(channel)
    twin = request(client_request_id="order-42")
    first, second = await asyncio.gather(collect(stub.Generate(twin)), collect(stub.Generate(twin)))
    later = await collect(stub.Generate(request(client_request_id="order-42", on_disconnect=2)))
    job_id = first[0].accepted.job_id
    assert runs == [job_id]
    for events in (second, later):  # each caller gets every event from the start, and the result
        assert [e.SerializeToString() for e in events] == [e.SerializeToString() for e in first]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(stub.Generate(request(client_request_id="order-42", prompt="a grey wolf")))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert violated_fields(raised.value) == {"client_request_id"}
    assert job_id in (raised.value.details() or "")
    assert runs == [job_id]


async def test_cancel_job_stops_a_queued_and_a_running_job_from_another_connection(
    start_server: StartServer, runs: list[str]
) -> None:
    # 3 s a job: long enough to cancel it mid-run, short enough to finish one afterwards.
    server, channel = await start_server(fake={"steps": 60, "step_delay_s": 0.05})
    submit = pb_grpc.Img2ImgProviderStub(channel)
    running = submit.Generate(request(seed=1))
    running_id = (await running.read()).accepted.job_id
    while (await running.read()).WhichOneof("event") != "progress":
        pass  # the model is running
    queued = submit.Generate(request(seed=2))
    accepted = (await queued.read()).accepted
    assert accepted.queue_position == 1
    stub, other = stub_for(server)
    try:
        for call, job_id in ((queued, accepted.job_id), (running, running_id)):
            job = (await stub.CancelJob(pb.CancelJobRequest(job_id=job_id))).job
            assert job.status.state == CANCELLED and job.status.error.message == "cancelled by CancelJob"
            events, error = await collect_until_status(call)
            assert events[-1].error.message == "cancelled by CancelJob"
            assert error is not None and error.code() is grpc.StatusCode.CANCELLED
        await eventually(lambda: server.runtime.admission.running == server.runtime.admission.queued == 0)
        assert runs == [running_id], "the queued job never ran"
        # Cancelling again, or cancelling a finished job, changes nothing.
        again = (await stub.CancelJob(pb.CancelJobRequest(job_id=running_id))).job
        assert again.status.state == CANCELLED
        done = await collect(submit.Generate(request(seed=3)))
        finished_id = done[0].accepted.job_id
        before = (await stub.GetJob(pb.GetJobRequest(job_id=finished_id))).job
        after = (await stub.CancelJob(pb.CancelJobRequest(job_id=finished_id))).job
        assert after.status.state == SUCCEEDED and after == before
    finally:
        await other.close()


async def test_get_job_shows_the_request_progress_and_result(start_server: StartServer) -> None:
    server, channel = await start_server(fake={"steps": 40, "step_delay_s": 0.05})
    stub = pb_grpc.Img2ImgProviderStub(channel)
    call = stub.Generate(request(client_request_id="look-at-me"))
    job_id = (await call.read()).accepted.job_id
    while (await call.read()).WhichOneof("event") != "progress":
        pass
    live = (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert live.status.state == RUNNING and live.status.watchers == 1
    assert live.status.progress.total_steps == 40 and live.status.last_sequence >= 2
    assert live.request.prompt == "a red fox in snow" and live.request.image == b"", "never the image bytes"
    assert live.status.client_request_id == "look-at-me"
    assert live.status.HasField("create_time") and live.status.HasField("start_time")
    assert not live.status.HasField("end_time") and not live.HasField("result")
    events = await collect(call)
    done = (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert done.status.state == SUCCEEDED and done.status.last_sequence == events[-1].sequence
    artifact = done.result.artifacts[0]
    assert artifact.id == events[-1].result.artifacts[0].id and not artifact.inline_data
    assert artifact.uri == "", "no public_base_url and no local_path_uris: clients fetch by id, no server path"
    retention = server.runtime.settings.jobs.retention_s
    lifetime = done.status.expire_time.ToNanoseconds() - done.status.end_time.ToNanoseconds()
    assert lifetime == pytest.approx(retention * 1e9, abs=1e6)


async def test_list_jobs_pages_newest_first_and_filters_by_state(start_server: StartServer) -> None:
    _, channel = await start_server(fake={"steps": 2})
    stub = pb_grpc.Img2ImgProviderStub(channel)
    finished = [(await collect(stub.Generate(request(seed=seed))))[0].accepted.job_id for seed in range(5)]
    slow = stub.Generate(request(seed=99, on_disconnect=job_pb2.DISCONNECT_POLICY_DETACH))
    cancelled = (await slow.read()).accepted.job_id
    await stub.CancelJob(pb.CancelJobRequest(job_id=cancelled))
    listed: list[str] = []
    token = ""
    while True:
        page = await stub.ListJobs(pb.ListJobsRequest(page_size=2, page_token=token))
        assert len(page.jobs) <= 2
        listed += [job.status.job_id for job in page.jobs]
        if not (token := page.next_page_token):
            break
    assert listed == sorted([*finished, cancelled], reverse=True)
    succeeded = await stub.ListJobs(pb.ListJobsRequest(states=[SUCCEEDED]))
    assert [job.status.job_id for job in succeeded.jobs] == sorted(finished, reverse=True)
    only_cancelled = await stub.ListJobs(pb.ListJobsRequest(states=[CANCELLED]))
    assert [job.status.job_id for job in only_cancelled.jobs] == [cancelled]
    first = await stub.ListJobs(pb.ListJobsRequest(page_size=1, states=[SUCCEEDED]))
    bad_requests = [
        (pb.ListJobsRequest(page_size=1, page_token=first.next_page_token), "page_token"),  # other filter
        (pb.ListJobsRequest(page_token="not-a-token"), "page_token"),
        (pb.ListJobsRequest(page_size=101), "page_size"),
        (pb.ListJobsRequest(states=[job_pb2.JOB_STATE_UNSPECIFIED]), "states"),
    ]
    for bad, field in bad_requests:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ListJobs(bad)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT and violated_fields(raised.value) == {field}


async def test_unknown_malformed_and_expired_job_ids(start_server: StartServer) -> None:
    # Long enough to read the job once on a loaded machine, short enough to wait for.
    _, channel = await start_server(fake={"steps": 2}, jobs={"retention_s": 3.0})
    stub = pb_grpc.Img2ImgProviderStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetJob(pb.GetJobRequest(job_id="not-a-job"))
    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT and violated_fields(raised.value) == {"job_id"}
    unknown = new_job_id()
    for call in (
        stub.GetJob(pb.GetJobRequest(job_id=unknown)),
        stub.CancelJob(pb.CancelJobRequest(job_id=unknown)),
        collect(stub.WatchJob(pb.WatchJobRequest(job_id=unknown))),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await call
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND and reason(raised.value) == "NOT_FOUND"
    job_id = (await collect(stub.Generate(request())))[0].accepted.job_id
    assert await job_state(stub, job_id) == SUCCEEDED

    async def expired() -> bool:
        try:
            await stub.GetJob(pb.GetJobRequest(job_id=job_id))
        except grpc.aio.AioRpcError as err:
            return err.code() is grpc.StatusCode.NOT_FOUND
        return False

    await eventually(expired, within=20)  # from memory and from the stored record alike
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await collect(stub.WatchJob(pb.WatchJobRequest(job_id=job_id)))
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


async def test_finished_jobs_stay_readable_after_a_restart(start_server: StartServer, tmp_path: Path) -> None:
    shared = {"output_dir": tmp_path / "shared-outputs"}
    first, channel = await start_server(fake={"steps": 3, "fail_when_prompt_contains": "boom"}, storage=shared)
    stub = pb_grpc.Img2ImgProviderStub(channel)
    succeeded = await collect(stub.Generate(request()))
    failed, error = await collect_until_status(stub.Generate(request(prompt="boom")))
    assert error is not None and failed[-1].WhichOneof("event") == "error"
    await first.stop(grace=0)
    _, channel = await start_server(fake={"steps": 3}, storage=shared)
    stub = pb_grpc.Img2ImgProviderStub(channel)
    job = (await stub.GetJob(pb.GetJobRequest(job_id=succeeded[0].accepted.job_id))).job
    assert job.status.state == SUCCEEDED and job.result.artifacts[0].sha256 == succeeded[-1].result.artifacts[0].sha256
    replay = await collect(stub.WatchJob(pb.WatchJobRequest(job_id=job.status.job_id)))
    assert [e.WhichOneof("event") for e in replay] == ["accepted", "result"]
    assert [e.sequence for e in replay] == [1, succeeded[-1].sequence]
    lost_events, watch_error = await collect_until_status(
        stub.WatchJob(pb.WatchJobRequest(job_id=failed[0].accepted.job_id, after_sequence=1))
    )
    assert [e.sequence for e in lost_events] == [failed[-1].sequence]
    assert lost_events[0].error == failed[-1].error
    assert watch_error is not None and watch_error.code() == error.code()
    listed = await stub.ListJobs(pb.ListJobsRequest())
    assert {j.status.job_id for j in listed.jobs} == {succeeded[0].accepted.job_id, failed[0].accepted.job_id}


async def test_the_job_of_a_killed_server_is_reported_lost_by_another(
    start_server: StartServer, tmp_path: Path
) -> None:
    outputs = tmp_path / "shared-outputs"
    process, port = await start_process(
        tmp_path,
        KILN_STORAGE__OUTPUT_DIR=str(outputs),
        KILN_IMG2IMG__PROVIDER="fake",
        KILN_IMG2IMG__FAKE__STEPS="400",
        KILN_IMG2IMG__FAKE__STEP_DELAY_S="0.05",
        KILN_IMG2IMG__JOBS__HEARTBEAT_S="0.3",
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            doomed = pb_grpc.Img2ImgProviderStub(channel)
            await eventually(lambda: _ready(doomed))
            call = doomed.Generate(request())
            job_id = (await call.read()).accepted.job_id
            await call.read()
            _, survivor = await start_server(storage={"output_dir": outputs}, jobs={"heartbeat_s": 0.3})
            stub = pb_grpc.Img2ImgProviderStub(survivor)
            assert await job_state(stub, job_id) == RUNNING, "alive elsewhere: its record says so"
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
            await eventually(lambda: _is(stub, job_id, job_pb2.JOB_STATE_FAILED), within=5)
            job = (await stub.GetJob(pb.GetJobRequest(job_id=job_id))).job
            assert job.status.error.code == grpc.StatusCode.UNAVAILABLE.value[0]
            assert "stopped before the job ended" in job.status.error.message
            events, error = await collect_until_status(stub.WatchJob(pb.WatchJobRequest(job_id=job_id)))
            assert events[-1].WhichOneof("event") == "error" and error is not None and reason(error) == "REPLICA_LOST"
            # A watcher that saw more of the job live than its record holds still gets the error event.
            late = pb.WatchJobRequest(job_id=job_id, after_sequence=50)
            events, error = await collect_until_status(stub.WatchJob(late))
            assert error is not None and [e.sequence for e in events] == [51]
            assert events[0].error.code == error.code().value[0]
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_job_records_are_not_artifacts(start_server: StartServer) -> None:
    server, channel = await start_server(fake={"steps": 2})
    job_id = (await collect(pb_grpc.Img2ImgProviderStub(channel).Generate(request())))[0].accepted.job_id
    assert (server.runtime.store.root / job_id / "job.json").is_file()
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await artifacts_grpc.ArtifactProviderStub(channel).GetArtifact(
            artifacts.GetArtifactRequest(artifact_id=f"{job_id}/job.json")
        )
    assert raised.value.code() is grpc.StatusCode.NOT_FOUND


async def test_shutdown_lets_a_detached_job_finish(start_server: StartServer) -> None:
    server, channel = await start_server(fake={"steps": 10, "step_delay_s": 0.05})
    call = pb_grpc.Img2ImgProviderStub(channel).Generate(request(on_disconnect=job_pb2.DISCONNECT_POLICY_DETACH))
    job_id = (await call.read()).accepted.job_id
    call.cancel()
    await server.stop(grace=10)
    job = server.runtime.jobs.get(job_id)
    assert job is not None and job.state.value == "succeeded"


async def test_mesh_has_the_same_job_methods(start_server: StartServer) -> None:
    _, channel = await start_server("mesh", fake={"steps": 3})
    stub = mesh_grpc.MeshProviderStub(channel)
    events = await collect(stub.Generate(mesh.GenerateRequest(image=png_bytes(), output_format=mesh.MESH_FORMAT_GLB)))
    job_id = events[0].accepted.job_id
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    replay = await collect(stub.WatchJob(mesh.WatchJobRequest(job_id=job_id, after_sequence=len(events) - 1)))
    assert replay == events[-1:]
    job = (await stub.GetJob(mesh.GetJobRequest(job_id=job_id))).job
    assert job.status.state == SUCCEEDED and job.request.output_format == mesh.MESH_FORMAT_GLB
    assert [j.status.job_id for j in (await stub.ListJobs(mesh.ListJobsRequest())).jobs] == [job_id]


async def test_cancel_job_on_another_replica_is_passed_on_through_the_store(
    start_server: StartServer, tmp_path: Path
) -> None:
    shared = {"storage": {"output_dir": tmp_path / "shared-outputs"}, "jobs": {"heartbeat_s": 0.2}}
    owner, owner_channel = await start_server(fake={"steps": 400, "step_delay_s": 0.05}, **shared)
    _, other_channel = await start_server(**shared)
    runs_it = pb_grpc.Img2ImgProviderStub(owner_channel)
    call = runs_it.Generate(request())
    job_id = (await call.read()).accepted.job_id
    while (await call.read()).WhichOneof("event") != "progress":
        pass
    answer = (await pb_grpc.Img2ImgProviderStub(other_channel).CancelJob(pb.CancelJobRequest(job_id=job_id))).job
    assert answer.status.state == RUNNING, "not held there: the owner acts on it at its next heartbeat"
    events, error = await collect_until_status(call)
    assert error is not None and error.code() is grpc.StatusCode.CANCELLED
    assert "passed on by another replica" in events[-1].error.message
    await eventually(lambda: owner.runtime.admission.running == 0)
    assert not (owner.runtime.store.root / job_id).exists()
