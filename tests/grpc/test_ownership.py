"""Jobs and artifacts belong to the principal that submitted the job, over gRPC against real servers.

The callers name themselves with the `x-kiln-principal` header, as the gateway does for the
clients it authenticated; a call without it is the anonymous principal. Another principal's job
or artifact must look exactly like one that does not exist (same code, same message).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from kiln.artifacts.v1 import artifact_service_pb2 as artifacts
from kiln.artifacts.v1 import artifact_service_pb2_grpc as artifacts_grpc
from kiln.common.v1 import job_pb2
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_runtime.principal import ANONYMOUS, PRINCIPAL_HEADER
from kiln_runtime.storage import new_job_id
from tests.servers import StartServer
from tests.support import img2img_request as request

Metadata = tuple[tuple[str, str], ...]
ALICE: Metadata = ((PRINCIPAL_HEADER, "alice"),)
BOB: Metadata = ((PRINCIPAL_HEADER, "bob"),)
NOBODY: Metadata = ()


async def collect(call: Any) -> list[pb.GenerateResponse]:
    return [event async for event in call]


async def refusal(call: Any) -> grpc.aio.AioRpcError:
    """The error of a call (unary or streaming) that must fail."""
    finish = collect(call) if hasattr(call, "__aiter__") else call
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await finish
    return raised.value


def masked(error: grpc.aio.AioRpcError, job_id: str) -> tuple[grpc.StatusCode, str]:
    """Code and message with the job id taken out, to compare the answers for two ids."""
    return error.code(), (error.details() or "").replace(job_id, "<id>")


async def test_another_principals_job_is_not_found_like_a_missing_one(start_server: StartServer) -> None:
    _, channel = await start_server(fake={"steps": 200, "step_delay_s": 0.02})
    stub = pb_grpc.Img2ImgProviderStub(channel)
    call = stub.Generate(request(on_disconnect=job_pb2.DISCONNECT_POLICY_DETACH), metadata=ALICE)
    job_id = (await call.read()).accepted.job_id
    missing = new_job_id()

    for ask in (
        lambda job: stub.GetJob(pb.GetJobRequest(job_id=job), metadata=BOB),
        lambda job: stub.WatchJob(pb.WatchJobRequest(job_id=job), metadata=BOB),
        lambda job: stub.CancelJob(pb.CancelJobRequest(job_id=job), metadata=BOB),
        lambda job: stub.GetJob(pb.GetJobRequest(job_id=job), metadata=NOBODY),
    ):
        theirs, nothing = await refusal(ask(job_id)), await refusal(ask(missing))
        assert theirs.code() is grpc.StatusCode.NOT_FOUND
        assert masked(theirs, job_id) == masked(nothing, missing)

    mine = (await stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=ALICE)).job
    assert mine.status.owner == "alice" and mine.status.state != job_pb2.JOB_STATE_CANCELLED, "bob's cancel did nothing"
    cancelled = (await stub.CancelJob(pb.CancelJobRequest(job_id=job_id), metadata=ALICE)).job
    assert cancelled.status.state == job_pb2.JOB_STATE_CANCELLED
    call.cancel()


async def test_list_jobs_lists_only_the_callers_own(start_server: StartServer) -> None:
    _, channel = await start_server(fake={"steps": 1})
    stub = pb_grpc.Img2ImgProviderStub(channel)
    owned: dict[str, set[str]] = {"alice": set(), "bob": set(), ANONYMOUS: set()}
    for who, metadata in (("alice", ALICE), ("bob", BOB), ("alice", ALICE), (ANONYMOUS, NOBODY), ("alice", ALICE)):
        events = await collect(stub.Generate(request(), metadata=metadata))
        owned[who].add(events[0].accepted.job_id)
    # Pages of one: the tokens still walk the caller's jobs only, and all of them.
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListJobs(pb.ListJobsRequest(page_size=1, page_token=token), metadata=ALICE)
        seen += [job.status.job_id for job in page.jobs]
        assert all(job.status.owner == "alice" for job in page.jobs)
        if not (token := page.next_page_token):
            break
    assert sorted(seen) == sorted(owned["alice"]) and len(seen) == 3
    bobs = await stub.ListJobs(pb.ListJobsRequest(), metadata=BOB)
    assert {job.status.job_id for job in bobs.jobs} == owned["bob"]
    anonymous = await stub.ListJobs(pb.ListJobsRequest(), metadata=NOBODY)
    assert {job.status.job_id for job in anonymous.jobs} == owned[ANONYMOUS]
    assert [job.status.owner for job in anonymous.jobs] == [ANONYMOUS]


async def test_artifacts_belong_to_the_jobs_owner(start_server: StartServer) -> None:
    server, channel = await start_server(fake={"steps": 1})
    stub = pb_grpc.Img2ImgProviderStub(channel)
    files = artifacts_grpc.ArtifactProviderStub(channel)
    events = await collect(stub.Generate(request(), metadata=ALICE))
    (artifact,) = events[-1].result.artifacts
    assert artifact.uri == "", "no public_base_url: no URI at all, and never a server path"
    missing = f"{new_job_id()}/image.png"

    body = await files.GetArtifact(artifacts.GetArtifactRequest(artifact_id=artifact.id), metadata=ALICE)
    assert body.data == artifact.inline_data
    pieces = files.DownloadArtifact(artifacts.DownloadArtifactRequest(artifact_id=artifact.id), metadata=ALICE)
    assert b"".join([piece.data async for piece in pieces]) == artifact.inline_data

    for metadata in (BOB, NOBODY):
        for ask in (
            lambda name, md=metadata: files.GetArtifact(artifacts.GetArtifactRequest(artifact_id=name), metadata=md),
            lambda name, md=metadata: files.DownloadArtifact(
                artifacts.DownloadArtifactRequest(artifact_id=name), metadata=md
            ),
        ):
            theirs, nothing = await refusal(ask(artifact.id)), await refusal(ask(missing))
            assert theirs.code() is grpc.StatusCode.NOT_FOUND
            assert theirs.details().replace(artifact.id, "<id>") == nothing.details().replace(missing, "<id>")

    # A made-up signature is no way around ownership: 403, not the bytes.
    forged = artifacts.GetArtifactRequest(artifact_id=artifact.id, expires=2**40, signature="ab" * 32)
    denied = await refusal(files.GetArtifact(forged, metadata=BOB))
    assert denied.code() is grpc.StatusCode.PERMISSION_DENIED and "signature does not match" in denied.details()
    assert server.runtime.store.read(artifact.id) == artifact.inline_data  # it is there all the same


async def test_a_second_server_sharing_the_storage_checks_the_owner_too(
    start_server: StartServer, tmp_path: Path
) -> None:
    shared = {"storage": {"output_dir": tmp_path / "shared-outputs"}, "fake": {"steps": 1}}
    _, first = await start_server(**shared)
    events = await collect(pb_grpc.Img2ImgProviderStub(first).Generate(request(), metadata=ALICE))
    job_id, artifact_id = events[0].accepted.job_id, events[-1].result.artifacts[0].id
    _, second = await start_server(**shared)
    stub, files = pb_grpc.Img2ImgProviderStub(second), artifacts_grpc.ArtifactProviderStub(second)

    stored = (await stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=ALICE)).job
    assert stored.status.owner == "alice" and stored.status.state == job_pb2.JOB_STATE_SUCCEEDED
    missing = new_job_id()
    for ask in (
        lambda job: stub.GetJob(pb.GetJobRequest(job_id=job), metadata=BOB),
        lambda job: stub.WatchJob(pb.WatchJobRequest(job_id=job), metadata=BOB),
        lambda job: stub.CancelJob(pb.CancelJobRequest(job_id=job), metadata=BOB),
    ):
        theirs, nothing = await refusal(ask(job_id)), await refusal(ask(missing))
        assert masked(theirs, job_id) == masked(nothing, missing)
    assert (await stub.ListJobs(pb.ListJobsRequest(), metadata=BOB)).jobs == []
    assert [job.status.job_id for job in (await stub.ListJobs(pb.ListJobsRequest(), metadata=ALICE)).jobs] == [job_id]
    replay = await collect(stub.WatchJob(pb.WatchJobRequest(job_id=job_id), metadata=ALICE))
    assert [event.WhichOneof("event") for event in replay] == ["accepted", "result"]

    theirs = await refusal(files.GetArtifact(artifacts.GetArtifactRequest(artifact_id=artifact_id), metadata=BOB))
    assert theirs.code() is grpc.StatusCode.NOT_FOUND
    body = await files.GetArtifact(artifacts.GetArtifactRequest(artifact_id=artifact_id), metadata=ALICE)
    assert body.data == events[-1].result.artifacts[0].inline_data


async def test_client_request_ids_are_per_principal(start_server: StartServer) -> None:
    _, channel = await start_server(fake={"steps": 1})
    stub = pb_grpc.Img2ImgProviderStub(channel)
    alices = await collect(stub.Generate(request(client_request_id="order-1"), metadata=ALICE))
    again = await collect(stub.Generate(request(client_request_id="order-1"), metadata=ALICE))
    assert again[0].accepted.job_id == alices[0].accepted.job_id, "the same principal's retry attaches"
    # Bob's "order-1" is his own: a different request under the same id is not a conflict for him,
    # and the same request is a job of his own, not a view into alice's.
    bobs = await collect(stub.Generate(request(client_request_id="order-1", prompt="a grey wolf"), metadata=BOB))
    twin = await collect(stub.Generate(request(client_request_id="order-1"), metadata=NOBODY))
    ids = {alices[0].accepted.job_id, bobs[0].accepted.job_id, twin[0].accepted.job_id}
    assert len(ids) == 3 and bobs[-1].WhichOneof("event") == "result"
    owner = (await stub.GetJob(pb.GetJobRequest(job_id=bobs[0].accepted.job_id), metadata=BOB)).job.status.owner
    assert owner == "bob"


async def test_a_malformed_principal_header_is_refused(start_server: StartServer) -> None:
    _, channel = await start_server()
    stub = pb_grpc.Img2ImgProviderStub(channel)
    error = await refusal(stub.ListJobs(pb.ListJobsRequest(), metadata=((PRINCIPAL_HEADER, "x" * 300),)))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED and PRINCIPAL_HEADER in error.details()


async def test_the_access_log_names_the_principal_never_the_credential(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    _, channel = await start_server()
    stub = pb_grpc.Img2ImgProviderStub(channel)
    caplog.set_level(logging.INFO, logger="kiln.access")
    secret = "kiln-test-secret-e4d2a9"
    await stub.ListJobs(pb.ListJobsRequest(), metadata=(*ALICE, ("authorization", f"Bearer {secret}")))
    lines = [record for record in caplog.records if record.name == "kiln.access" and "ListJobs" in record.getMessage()]
    assert lines, "one access line per call"
    assert "principal=alice" in lines[-1].getMessage()
    assert lines[-1].kiln["principal"] == "alice"  # type: ignore[attr-defined]
    assert secret not in caplog.text
