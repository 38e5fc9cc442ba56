"""The job table without servers: compaction, retention bounds, policies, records of lost replicas."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kiln.common.v1 import job_pb2
from kiln_img2img import convert
from kiln_runtime.errors import Cancelled, ProviderFailed
from kiln_runtime.job_api import StoredJob, StoreRecorder
from kiln_runtime.job_table import EVENT_OVERHEAD_BYTES, DisconnectPolicy, JobState, JobTable, Submission
from kiln_runtime.jobs import (
    AcceptedEvent,
    ChunkEvent,
    DeliveredArtifact,
    ErrorEvent,
    ProgressEvent,
    ResultEvent,
    RunnerEvent,
    StartedEvent,
)
from kiln_runtime.provider import PreviewImage, ProgressUpdate, Stage
from kiln_runtime.settings import JobsSettings
from kiln_runtime.storage import LocalArtifactStore, StoredArtifact, new_job_id


def progress(step: int, preview: bool = False) -> ProgressEvent:
    image = PreviewImage(media_type="image/webp", data=b"p" * 1000, width=8, height=8) if preview else None
    return ProgressEvent(ProgressUpdate(Stage.DENOISE, step, 4, step / 4, image), eta_s=None)


def result(job_id: str) -> ResultEvent[Any]:
    stored = StoredArtifact.describe(f"{job_id}/image.png", b"x" * 5000, media_type="image/png", uri="file:///x")
    return ResultEvent(job_id=job_id, payload=None, artifacts=[DeliveredArtifact(stored, inline_data=b"x" * 5000)])


async def scripted(events: list[RunnerEvent], gate: asyncio.Event | None = None) -> AsyncIterator[RunnerEvent]:
    for index, event in enumerate(events):
        if gate is not None and index == 2:
            await gate.wait()  # the job "runs" until the test opens the gate
        yield event


def submission(policy: DisconnectPolicy = DisconnectPolicy.WAIT_FOR_WATCHER, key: str = "") -> Submission:
    return Submission(request=None, client_request_id=key, fingerprint="f", policy=policy)


def full_run(job_id: str) -> list[RunnerEvent]:
    chunks = [ChunkEvent(f"{job_id}/image.png", offset, b"c" * 100, offset == 200) for offset in (0, 100, 200)]
    return [
        AcceptedEvent(job_id, 0),
        StartedEvent(),
        progress(1, preview=True),
        progress(2, preview=True),
        progress(3),
        *chunks,
        result(job_id),
    ]


async def finished_job(table: JobTable) -> str:
    job_id = new_job_id()
    job = await table.submit(scripted(full_run(job_id)), submission())
    await job._finished.wait()
    return job_id


async def test_compaction_keeps_sequences_the_latest_preview_and_references_only() -> None:
    table = JobTable(JobsSettings(disconnect_grace_s=10))
    job_id = await finished_job(table)
    job = table.get(job_id)
    assert job is not None and job.state is JobState.SUCCEEDED
    before = [sequence for sequence, _ in job.events]
    assert before == list(range(1, 9)), "StartedEvent is not an event clients see"
    table.sweep(now=time.time() + 5)
    assert not job.compacted, "inside the grace period a reconnecting client gets everything"
    table.sweep(now=time.time() + 11)
    assert job.compacted
    kept = {sequence: event for sequence, event in job.events}
    assert sorted(kept) == [1, 2, 3, 4, 8], "chunks dropped, the other sequence numbers unchanged"
    previews = [s for s, e in kept.items() if isinstance(e, ProgressEvent) and e.update.preview is not None]
    assert previews == [3], "only the latest preview"
    final = kept[8]
    assert isinstance(final, ResultEvent) and final.artifacts[0].inline_data == b""
    assert job.retained_bytes == 5 * EVENT_OVERHEAD_BYTES + 1000, "five events and one preview"
    assert [s for s, _ in job.events_after(3)] == [4, 8]


async def test_retention_bounds_forget_the_oldest_finished_jobs_first() -> None:
    table = JobTable(JobsSettings(max_retained_jobs=2))
    ids = [await finished_job(table) for _ in range(3)]
    assert [table.get(job_id) is not None for job_id in ids] == [False, True, True]
    by_bytes = JobTable(JobsSettings(max_retained_bytes=12_000))
    ids = [await finished_job(by_bytes) for _ in range(3)]
    assert [by_bytes.get(job_id) is not None for job_id in ids] == [False, False, True]


async def test_expired_jobs_are_forgotten() -> None:
    table = JobTable(JobsSettings(retention_s=60))
    job_id = await finished_job(table)
    table.sweep(now=time.time() + 61)
    assert table.get(job_id) is None


@pytest.mark.parametrize(
    ("policy", "cancelled"),
    [(DisconnectPolicy.CANCEL, True), (DisconnectPolicy.WAIT_FOR_WATCHER, True), (DisconnectPolicy.DETACH, False)],
)
async def test_the_last_watcher_leaving_applies_the_policy(policy: DisconnectPolicy, cancelled: bool) -> None:
    table = JobTable(JobsSettings(disconnect_grace_s=0.2))
    gate = asyncio.Event()
    job_id = new_job_id()
    job = await table.submit(scripted(full_run(job_id), gate), submission(policy))
    watcher = table.watch(job)
    assert (await anext(watcher))[0] == 1
    await watcher.aclose()  # the stream is dropped
    await asyncio.sleep(0.5)
    assert job.state.terminal is cancelled
    if cancelled:
        assert isinstance(job.error, Cancelled)
    gate.set()
    await job._finished.wait()
    assert job.state is (JobState.CANCELLED if cancelled else JobState.SUCCEEDED)


async def test_a_new_watcher_stops_the_grace_timer() -> None:
    table = JobTable(JobsSettings(disconnect_grace_s=0.2))
    gate = asyncio.Event()
    job = await table.submit(scripted(full_run(new_job_id()), gate), submission())
    first = table.watch(job)
    await anext(first)
    await first.aclose()
    second = table.watch(job, after=1)
    waiting = asyncio.ensure_future(anext(second))
    await asyncio.sleep(0.5)
    assert not job.state.terminal
    gate.set()
    events = [await waiting] + [item async for item in second]
    assert [sequence for sequence, _ in events] == list(range(2, 9))
    assert job.state is JobState.SUCCEEDED


async def test_a_refusal_before_acceptance_is_raised_and_forgets_the_request_id() -> None:
    async def refused() -> AsyncIterator[RunnerEvent]:
        raise Cancelled("refused")
        yield  # pragma: no cover - makes this an async generator

    table = JobTable(JobsSettings())
    with pytest.raises(Cancelled):
        await table.submit(refused(), submission(key="k"))
    job = await table.submit(scripted(full_run(new_job_id())), submission(key="k"))
    assert job.submission.client_request_id == "k"


def record(recorder: StoreRecorder, job_id: str, state: str, *, replica: str, age_s: float) -> StoredJob:
    message = convert.JOB_MESSAGES.job()
    message.status.job_id = job_id
    message.status.state = job_pb2.JobState.Value(state)
    return StoredJob(job=message, replica=replica, heartbeat_at=time.time() - age_s)


def test_a_stored_unfinished_job_is_lost_only_once_its_replica_falls_silent(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    settings = JobsSettings(heartbeat_s=1.0)
    recorder = StoreRecorder(store, convert.JOB_MESSAGES, domain="img2img.kiln.dev", replica="me", settings=settings)
    job_id = new_job_id()
    fresh = recorder.view(record(recorder, job_id, "JOB_STATE_RUNNING", replica="other", age_s=1.0), time.time())
    assert fresh.status.state == job_pb2.JOB_STATE_RUNNING
    silent = recorder.view(record(recorder, job_id, "JOB_STATE_RUNNING", replica="other", age_s=4.0), time.time())
    assert silent.status.state == job_pb2.JOB_STATE_FAILED
    assert "stopped before the job ended" in silent.status.error.message
    mine = recorder.view(record(recorder, job_id, "JOB_STATE_QUEUED", replica="me", age_s=4.0), time.time())
    assert mine.status.state == job_pb2.JOB_STATE_QUEUED


async def test_records_round_trip_through_the_store(tmp_path: Path) -> None:
    store = LocalArtifactStore(tmp_path)
    recorder = StoreRecorder(store, convert.JOB_MESSAGES, domain="d", replica="me", settings=JobsSettings())
    table = JobTable(JobsSettings(), recorder=recorder)
    job_id = new_job_id()
    job = await table.submit(
        scripted([AcceptedEvent(job_id, 0), StartedEvent(), ErrorEvent(Cancelled("x"))]), submission()
    )
    await job._finished.wait()
    assert recorder.load(job_id) is None, "a cancelled job leaves nothing in the store"
    failing = new_job_id()

    job = await table.submit(scripted([AcceptedEvent(failing, 0), ErrorEvent(ProviderFailed("bad"))]), submission())
    await job._finished.wait()
    stored = recorder.load(failing)
    assert stored is not None and stored.replica == "me"
    assert stored.job.status.state == job_pb2.JOB_STATE_FAILED and stored.job.status.error.message == "bad"
    assert json.loads(store.read(f"{failing}/job.json"))["version"] == 1
    assert store.job_ids() == [failing]
