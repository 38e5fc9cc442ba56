"""Fair admission and the per-principal job quota on a real model server (fake provider).

The test client names its principal with the `x-kiln-principal` header, as the gateway does
after authenticating a caller; the servers trust it (only the gateway reaches them).
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_runtime.errors import RETRIABLE_HEADER
from kiln_runtime.principal import PRINCIPAL_HEADER
from tests.jobs_support import eventually
from tests.servers import StartServer
from tests.support import img2img_request as request


def as_principal(name: str) -> tuple[tuple[str, str], ...]:
    return ((PRINCIPAL_HEADER, name),)


async def read_to_end(call: Any) -> list[pb.GenerateResponse]:
    events = []
    while (event := await call.read()) is not grpc.aio.EOF:
        events.append(event)
    return events


def details(error: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo | None]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    found_retry = None
    for detail in status.details:
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
        elif detail.Is(retry.DESCRIPTOR):
            detail.Unpack(retry)
            found_retry = retry
    return info, found_retry


async def test_a_flood_from_one_principal_delays_another_by_at_most_one_job_per_slot(
    start_server: StartServer,
) -> None:
    concurrency = 2
    server, channel = await start_server(
        runtime={"max_concurrency": concurrency, "max_queue": 30},
        # About 0.25 s a job: Alice's backlog outlasts her 20 submissions by seconds.
        fake={"steps": 3, "step_delay_s": 0.08},
    )
    stub = pb_grpc.Img2ImgProviderStub(channel)
    flood = []
    for seed in range(20):
        call = stub.Generate(request(seed=seed), metadata=as_principal("alice"))
        flood.append((call, (await call.read()).accepted.job_id))
    # Alice's backlog really is queued when Bob arrives, or the test would prove nothing.
    assert server.runtime.admission.queued >= concurrency
    bob_call = stub.Generate(request(seed=99), metadata=as_principal("bob"))
    bob_accepted = (await bob_call.read()).accepted
    # Bob joins the rotation behind Alice's current turn: one of her jobs, then his.
    assert bob_accepted.queue_position == 2

    results = await asyncio.gather(read_to_end(bob_call), *(read_to_end(call) for call, _ in flood))
    assert all(events[-1].WhichOneof("event") == "result" for events in results)

    async def started(job_id: str, principal: str) -> tuple[float, float]:
        reply = await stub.GetJob(pb.GetJobRequest(job_id=job_id), metadata=as_principal(principal))
        status = reply.job.status
        return status.create_time.ToNanoseconds() / 1e9, status.start_time.ToNanoseconds() / 1e9

    bob_created, bob_started = await started(bob_accepted.job_id, "bob")
    alice_starts = [(await started(job_id, "alice"))[1] for _, job_id in flood]
    overtaking = [start for start in alice_starts if bob_created < start < bob_started]
    assert len(overtaking) <= concurrency, (len(overtaking), sorted(alice_starts), bob_started)
    # And he did not simply wait for her backlog: most of her jobs started after his.
    assert sum(start > bob_started for start in alice_starts) >= len(flood) // 2
    await eventually(lambda: server.runtime.admission.running == server.runtime.admission.queued == 0)
    server.runtime.admission.check_at_rest()


async def test_a_principal_over_its_quota_gets_quota_with_retry_info_while_others_get_in(
    start_server: StartServer,
) -> None:
    server, channel = await start_server(
        runtime={"max_concurrency": 1, "max_queue": 10},
        jobs={"max_jobs_per_principal": 2},
        fake={"steps": 4, "step_delay_s": 0.1},
    )
    stub = pb_grpc.Img2ImgProviderStub(channel)
    alice = [stub.Generate(request(seed=seed), metadata=as_principal("alice")) for seed in (1, 2)]
    for call in alice:
        assert (await call.read()).WhichOneof("event") == "accepted"

    refused = stub.Generate(request(seed=3), metadata=as_principal("alice"))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await refused.read()
    error = raised.value
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "you already have 2 jobs queued or running here (the limit is 2)" in (error.details() or "")
    info, retry = details(error)
    assert info.reason == "QUOTA"
    assert info.metadata["principal"] == "alice"
    assert int(info.metadata["running"]) + int(info.metadata["queued"]) == 2
    assert info.metadata["limit"] == "2"
    assert retry is not None and retry.retry_delay.ToNanoseconds() > 0
    # Not for Envoy to retry on another replica: the limit is the caller's.
    assert RETRIABLE_HEADER not in dict(error.trailing_metadata() or ())

    bob = stub.Generate(request(seed=4), metadata=as_principal("bob"))
    assert (await bob.read()).WhichOneof("event") == "accepted"

    for call in (*alice, bob):
        assert (await read_to_end(call))[-1].WhichOneof("event") == "result"
    # Her jobs ended, so her quota has room again.
    again = await read_to_end(stub.Generate(request(seed=5), metadata=as_principal("alice")))
    assert again[-1].WhichOneof("event") == "result"
    await eventually(lambda: server.runtime.admission.running == server.runtime.admission.queued == 0)
    server.runtime.admission.check_at_rest()
