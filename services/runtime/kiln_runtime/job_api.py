"""The job RPCs both services share, and the job records kept in the artifact store.

`JobRpcs` implements `Generate` on top of the job table (submit, then watch from the start),
`WatchJob`, `GetJob`, `CancelJob` and `ListJobs` for one service's message classes. A job this
server holds answers from memory; any other answers from its record (`<job_id>/job.json`
beside its artifacts), which is how a restarted server or another replica sharing the store
sees finished jobs, and how it notices that the replica running a job has gone.

Every job belongs to the principal that submitted it (`JobStatus.owner`, also in the record).
Another principal gets NOT_FOUND with the very message of a job that does not exist, so job ids
cannot be probed; ListJobs lists the caller's own jobs only. Artifact URIs are made afresh
whenever a result is sent: signed links and presigned URLs expire, a replay must not hand out
dead ones.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format, timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from kiln.common.v1 import job_pb2
from kiln_runtime import convert as common
from kiln_runtime.errors import FieldViolation, InvalidArgument, KilnError, NotFound, ReplicaLost
from kiln_runtime.job_table import DisconnectPolicy, Job, JobState, JobTable, Submission, by_reference
from kiln_runtime.jobs import AcceptedEvent, JobEvent, ResultEvent, RunnerEvent
from kiln_runtime.principal import ANONYMOUS, current_principal
from kiln_runtime.redaction import public_status
from kiln_runtime.settings import JobsSettings
from kiln_runtime.storage import (
    JOB_CANCEL_NAME,
    JOB_RECORD_NAME,
    ArtifactNotFound,
    ArtifactStore,
    InvalidArtifactId,
    validate_job_id,
)

log = logging.getLogger(__name__)

RECORD_VERSION = 1
#: A record this many heartbeats old belongs to a replica that has stopped.
LOST_AFTER_HEARTBEATS = 3
#: Reads of a record before it counts as missing (see `StoreRecorder.load`).
READ_ATTEMPTS = 3
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
#: Stored records one ListJobs call reads at most; past it the page is cut short (with a token).
MAX_RECORD_READS = 500

_STATE_NAMES = {state: f"JOB_STATE_{state.name}" for state in JobState}
_STATES = {state: job_pb2.JobState.Value(name) for state, name in _STATE_NAMES.items()}
_POLICIES = {
    job_pb2.DISCONNECT_POLICY_UNSPECIFIED: DisconnectPolicy.WAIT_FOR_WATCHER,
    job_pb2.DISCONNECT_POLICY_WAIT_FOR_WATCHER: DisconnectPolicy.WAIT_FOR_WATCHER,
    job_pb2.DISCONNECT_POLICY_CANCEL: DisconnectPolicy.CANCEL,
    job_pb2.DISCONNECT_POLICY_DETACH: DisconnectPolicy.DETACH,
}
_POLICY_NAMES = {policy: f"DISCONNECT_POLICY_{policy.name}" for policy in DisconnectPolicy}
_TERMINAL = {job_pb2.JOB_STATE_SUCCEEDED, job_pb2.JOB_STATE_FAILED, job_pb2.JOB_STATE_CANCELLED}


@dataclass(frozen=True)
class JobMessages:
    """One service's message classes, and how its results become messages."""

    generate_response: type[Any]
    job: type[Any]
    get_job_response: type[Any]
    cancel_job_response: type[Any]
    list_jobs_response: type[Any]
    result: Callable[[ResultEvent[Any]], Any]

    @classmethod
    def of(cls, module: Any, result: Callable[[ResultEvent[Any]], Any]) -> JobMessages:
        """The classes of a service's generated module (both services name them alike)."""
        return cls(
            generate_response=module.GenerateResponse,
            job=module.Job,
            get_job_response=module.GetJobResponse,
            cancel_job_response=module.CancelJobResponse,
            list_jobs_response=module.ListJobsResponse,
            result=result,
        )


def new_replica_id() -> str:
    """This process's name in job records: host, pid, and a random tag (pids are reused)."""
    return f"{socket.gethostname()}/{os.getpid()}/{os.urandom(3).hex()}"


def fingerprint(request: Any) -> str:
    """Equal for requests that must share a job under one `client_request_id` (AIP-155).

    The whole request, image included, except `on_disconnect`: how long the caller is willing
    to wait around does not change what it asked for.
    """
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("on_disconnect")
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def submission(request: Any) -> Submission:
    """The table's view of a validated request (raises INVALID_ARGUMENT for an unknown policy)."""
    policy = _POLICIES.get(request.on_disconnect)
    if policy is None:
        violation = FieldViolation("on_disconnect", f"{request.on_disconnect} is not a known DisconnectPolicy value")
        raise InvalidArgument([violation])
    without_image = type(request)()
    without_image.CopyFrom(request)
    without_image.ClearField("image")
    return Submission(
        request=without_image,
        client_request_id=request.client_request_id,
        fingerprint=fingerprint(request),
        policy=policy,
        owner=current_principal(),
    )


def _timestamp(seconds: float | None) -> timestamp_pb2.Timestamp | None:
    if seconds is None:
        return None
    value = timestamp_pb2.Timestamp()
    value.FromNanoseconds(round(seconds * 1e9))
    return value


class StoredError(KilnError):
    """An error that reaches a watcher as a status already built (recorded, or read back)."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status
        self.code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                self.reason = info.reason

    def to_status(self, domain: str) -> status_pb2.Status:
        return self.status


@dataclass(frozen=True)
class BuiltResult:
    """A retained result's payload: the service's `Result` message, built once at the end."""

    message: Any


def result_message(messages: JobMessages, event: ResultEvent[Any]) -> Any:
    """The service's `Result` for a result event, its artifacts as the event delivers them now."""
    if not isinstance(event.payload, BuiltResult):
        return messages.result(event)
    message = type(event.payload.message)()
    message.CopyFrom(event.payload.message)
    del message.artifacts[:]  # inline bytes and chunk counts follow the event (see job_table.compact)
    message.artifacts.extend(common.artifact(artifact) for artifact in event.artifacts)
    return message


@dataclass(frozen=True)
class StoredJob:
    """A job record read back from the store."""

    job: Any  # the service's Job message
    replica: str
    heartbeat_at: float


class StoreRecorder:
    """Job records as JSON beside the job's artifacts: written by the job table, read by any replica."""

    def __init__(
        self, store: ArtifactStore, messages: JobMessages, *, domain: str, replica: str, settings: JobsSettings
    ) -> None:
        self.store = store
        self.messages = messages
        self.domain = domain
        self.replica = replica
        self.settings = settings

    def message(self, job: Job) -> Any:
        """The service's `Job` message for a job held in memory."""
        status = job_pb2.JobStatus(
            job_id=job.id,
            state=_STATE_NAMES[job.state],
            queue_position=job.position,
            create_time=_timestamp(job.created_at),
            start_time=_timestamp(job.started_at),
            end_time=_timestamp(job.finished_at),
            expire_time=_timestamp(None if job.finished_at is None else job.finished_at + self.settings.retention_s),
            client_request_id=job.submission.client_request_id,
            last_sequence=job.last_sequence,
            watchers=job.watchers,
            disconnect_policy=_POLICY_NAMES[job.submission.policy],
            owner=job.submission.owner,
        )
        if job.queue_eta_s is not None:
            status.queue_eta.CopyFrom(common.duration(job.queue_eta_s))
        if job.progress is not None:
            status.progress.CopyFrom(common.progress(job.progress))
        if job.error is not None:
            status.error.CopyFrom(public_status(job.error.to_status(self.domain)))
        message = self.messages.job(status=status, request=job.submission.request)
        if job.result is not None:
            message.result.CopyFrom(result_message(self.messages, by_reference(job.result)))
        return message

    # JobRecorder (job_table): encode on the loop, write and discard in a worker thread.
    def encode(self, job: Job) -> bytes:
        record = {
            "version": RECORD_VERSION,
            "replica": self.replica,
            "heartbeat_at": time.time(),
            "fingerprint": job.submission.fingerprint,
            # Also inside `job`; here too so the artifact service can read it without the job's classes.
            "owner": job.submission.owner,
            "job": json_format.MessageToDict(self.message(job)),
        }
        return json.dumps(record, sort_keys=True).encode()

    def retain(self, result: ResultEvent[Any]) -> ResultEvent[Any]:
        return dataclasses.replace(result, payload=BuiltResult(self.messages.result(result)))

    def write(self, job_id: str, data: bytes) -> None:
        self.store.put(job_id, JOB_RECORD_NAME, data, media_type="application/json")

    def discard(self, job_id: str) -> None:
        self.store.delete_job(job_id)

    def request_cancel(self, job_id: str, reason: str) -> None:
        """Leave a cancellation for the replica running the job (it looks every heartbeat)."""
        self.store.put(job_id, JOB_CANCEL_NAME, json.dumps({"reason": reason}).encode(), media_type="application/json")

    def cancel_requested(self, job_id: str) -> str | None:
        try:
            data = self.store.read(f"{job_id}/{JOB_CANCEL_NAME}")
        except ArtifactNotFound:
            return None
        try:
            return str(json.loads(data)["reason"]) or "cancelled by CancelJob"
        except (ValueError, KeyError, TypeError):
            return "cancelled by CancelJob"

    def load(self, job_id: str) -> StoredJob | None:
        """The stored record of a job, or None (never stored, cleaned up, or unreadable)."""
        for attempt in range(READ_ATTEMPTS):
            try:
                data = self.store.read(f"{job_id}/{JOB_RECORD_NAME}")
                break
            except ArtifactNotFound:
                # Also what a read racing the owner's rewrite gets (an object store checks that the
                # data it reads is the one the commit marker names); the next read sees the new one.
                if attempt == READ_ATTEMPTS - 1:
                    return None
                time.sleep(0.05)
        try:
            record = json.loads(data)
            job = self.messages.job()
            json_format.ParseDict(record["job"], job, ignore_unknown_fields=True)
            return StoredJob(job=job, replica=str(record["replica"]), heartbeat_at=float(record["heartbeat_at"]))
        except (ValueError, KeyError, TypeError, json_format.ParseError) as err:
            log.warning("ignoring the unreadable record of job %s: %s", job_id, err)
            return None

    def view(self, stored: StoredJob, now: float) -> Any | None:
        """What a record says now: None once expired; an unfinished job whose replica stopped is FAILED."""
        job, status = stored.job, stored.job.status
        if status.state in _TERMINAL:
            if status.end_time.ToNanoseconds() / 1e9 + self.settings.retention_s <= now:
                return None
            return job
        silent_s = now - stored.heartbeat_at
        if silent_s >= self.settings.retention_s:
            return None
        if stored.replica == self.replica or silent_s < LOST_AFTER_HEARTBEATS * self.settings.heartbeat_s:
            return job  # alive elsewhere: live progress comes from that replica (the session header)
        lost = type(job)()
        lost.CopyFrom(job)
        lost.status.state = job_pb2.JOB_STATE_FAILED
        lost.status.last_sequence += 1  # the error is one more event
        lost.status.queue_position = 0
        lost.status.ClearField("queue_eta")
        error = ReplicaLost(
            f"the server that ran job {status.job_id} ({stored.replica}) stopped before the job ended "
            f"(no sign of it for {silent_s:.0f} s); nothing of the job was kept: submit it again",
            metadata={"replica": stored.replica},
        )
        lost.status.error.CopyFrom(error.to_status(self.domain))
        return lost


def record_owner(data: bytes) -> str:
    """The owner a stored job record names (ANONYMOUS for records from before ownership).

    Raises:
        ValueError: The record is not a job record.
    """
    record = json.loads(data)
    if not isinstance(record, dict):
        raise ValueError("a job record is a JSON object")
    owner = record.get("owner") or record.get("job", {}).get("status", {}).get("owner")
    return str(owner) if owner else ANONYMOUS


def owner_of(message: Any) -> str:
    """The owner of a service's `Job` message (ANONYMOUS when it names none)."""
    return str(message.status.owner) or ANONYMOUS


class JobRpcs:
    """Generate, WatchJob, GetJob, CancelJob and ListJobs for one service."""

    def __init__(self, table: JobTable, recorder: StoreRecorder, messages: JobMessages, *, domain: str) -> None:
        self.table = table
        self.recorder = recorder
        self.messages = messages
        self.domain = domain

    async def generate(self, request: Any, events: AsyncIterator[RunnerEvent]) -> AsyncIterator[Any]:
        """Submit the job `events` runs (or attach to its twin) and stream it from the start."""
        job = await self.table.submit(events, submission(request))
        async for response in self._follow(job, 0):
            yield response

    async def watch(self, request: Any) -> AsyncIterator[Any]:
        job_id = _job_id(request.job_id)
        if request.after_sequence < 0:
            raise InvalidArgument([FieldViolation("after_sequence", "must be 0 (from the start) or more")])
        job = self.table.get(job_id)
        if job is not None:
            if job.submission.owner != current_principal():
                raise _not_found(job_id, self.table.settings)
            async for response in self._follow(job, request.after_sequence):
                yield response
            return
        async for response in self._follow_record(job_id, request.after_sequence):
            yield response

    async def get(self, request: Any) -> Any:
        return self.messages.get_job_response(job=self._fresh(await self._job(_job_id(request.job_id))))

    async def cancel(self, request: Any) -> Any:
        job_id = _job_id(request.job_id)
        held = self.table.get(job_id)
        if held is not None and held.submission.owner != current_principal():
            raise _not_found(job_id, self.table.settings)
        job = await self.table.cancel(job_id)
        if job is not None:
            return self.messages.cancel_job_response(job=self._fresh(self.recorder.message(job)))
        # Not held here: finished (returned unchanged), lost with its replica, or running on
        # another replica (the caller sent no session header): that one is asked through the store.
        message = await self._job(job_id)
        if message.status.state not in _TERMINAL:
            reason = "cancelled by CancelJob (passed on by another replica)"
            await asyncio.to_thread(self.recorder.request_cancel, job_id, reason)
        return self.messages.cancel_job_response(job=self._fresh(message))

    async def list(self, request: Any) -> Any:
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        violations = []
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            violations.append(FieldViolation("page_size", f"{request.page_size} is outside [0, {MAX_PAGE_SIZE}]"))
        states = set(request.states)
        if job_pb2.JOB_STATE_UNSPECIFIED in states or not states <= set(_STATES.values()):
            violations.append(FieldViolation("states", "name JobState values other than JOB_STATE_UNSPECIFIED"))
        before = _decode_token(request.page_token, states, violations)
        if violations:
            raise InvalidArgument(violations)
        held = {job.id: job for job in self.table.newest_first()}
        stored = await asyncio.to_thread(self.recorder.store.job_ids)
        ids = sorted(set(held) | set(stored), reverse=True)
        if before:
            ids = [job_id for job_id in ids if job_id < before]
        page: list[Any] = []
        examined, reads, now, caller = 0, 0, time.time(), current_principal()
        for job_id in ids:
            if len(page) == page_size or reads == MAX_RECORD_READS:
                break
            examined += 1
            job = self.table.get(job_id) if job_id in held else None
            if job is not None:
                if job.submission.owner != caller:
                    continue
                message = self.recorder.message(job)
            else:
                reads += 1
                record = await asyncio.to_thread(self.recorder.load, job_id)
                message = None if record is None else self.recorder.view(record, now)
                if message is not None and owner_of(message) != caller:
                    continue
            if message is not None and (not states or message.status.state in states):
                page.append(self._fresh(message))
        token = _encode_token(ids[examined - 1], states) if examined < len(ids) else ""
        return self.messages.list_jobs_response(jobs=page, next_page_token=token)

    async def _job(self, job_id: str) -> Any:
        """The caller's job as a message; NOT_FOUND if missing or another principal's (alike)."""
        job = self.table.get(job_id)
        if job is not None:
            if job.submission.owner != current_principal():
                raise _not_found(job_id, self.table.settings)
            return self.recorder.message(job)
        record = await asyncio.to_thread(self.recorder.load, job_id)
        message = None if record is None else self.recorder.view(record, time.time())
        if message is None or owner_of(message) != current_principal():
            raise _not_found(job_id, self.table.settings)
        return message

    def _fresh(self, message: Any) -> Any:
        """`message` (a Job or a GenerateResponse) with its result's artifact URIs made now."""
        if message.HasField("result"):
            for artifact in message.result.artifacts:
                artifact.uri = self._uri(artifact.id)
        return message

    def _uri(self, artifact_id: str) -> str:
        try:
            return self.recorder.store.uri_for(artifact_id)
        except Exception as err:  # a link is a convenience: the artifact is still there by id
            log.warning("could not make the URI of artifact %s: %s", artifact_id, err)
            return ""

    async def _follow(self, job: Job, after: int) -> AsyncIterator[Any]:
        """A held job's events after `after`, ending with the status its terminal event carries."""
        async for sequence, event in self.table.watch(job, after):
            yield self._response(event, sequence)
        if job.error is not None:
            raise StoredError(job.error.to_status(self.domain))

    async def _follow_record(self, job_id: str, after: int) -> AsyncIterator[Any]:
        """A job this server does not hold, from its record: polled until it ends or is lost.

        Only `accepted` and the terminal event are in a record; the progress in between lives in
        the replica that runs the job (reach it with the session header to see it).
        """
        sent_accepted = after >= 1
        while True:
            record = await asyncio.to_thread(self.recorder.load, job_id)
            job = None if record is None else self.recorder.view(record, time.time())
            if job is None or owner_of(job) != current_principal():
                raise _not_found(job_id, self.table.settings)
            status = job.status
            if not sent_accepted:
                accepted = AcceptedEvent(job_id=job_id, position=status.queue_position)
                yield self._response(accepted, 1)
                sent_accepted = True
            if status.state in _TERMINAL:
                sequence = status.last_sequence
                if after >= sequence and StoredError(status.error).reason == ReplicaLost.reason:
                    # The watcher saw more of the job (live, from its replica) than the record did;
                    # the error still reaches it, as the event after the last one it has.
                    sequence = after + 1
                if after < sequence:
                    terminal = {"result": job.result} if job.HasField("result") else {"error": status.error}
                    yield self._fresh(self.messages.generate_response(sequence=sequence, **terminal))
                if status.HasField("error"):
                    raise StoredError(status.error)
                return
            await asyncio.sleep(self.table.settings.heartbeat_s)

    def _response(self, event: JobEvent, sequence: int) -> Any:
        messages = self.messages

        def result(event: ResultEvent[Any]) -> Any:
            return result_message(messages, event)

        response = common.generate_response(event, messages.generate_response, result, self.domain)
        response.sequence = sequence
        return self._fresh(response)


def _job_id(value: str) -> str:
    try:
        return validate_job_id(value)
    except InvalidArtifactId:
        raise InvalidArgument(
            [FieldViolation("job_id", f"{value!r} is not a job id (26 characters of Crockford base32, from Accepted)")]
        ) from None


def _not_found(job_id: str, settings: JobsSettings) -> NotFound:
    return NotFound(
        f"no job {job_id}: it was never accepted, was cancelled, or finished more than "
        f"{settings.retention_s:g} s ago and was forgotten",
        metadata={"job_id": job_id},
    )


def _encode_token(last_id: str, states: Iterable[int]) -> str:
    payload = json.dumps({"before": last_id, "states": sorted(states)}).encode()
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def _decode_token(token: str, states: set[int], violations: list[FieldViolation]) -> str:
    """The id a page starts below; records a violation for a bad or mismatched token."""
    if not token:
        return ""
    try:
        payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        before, token_states = str(payload["before"]), set(payload["states"])
        validate_job_id(before)
    except (ValueError, KeyError, TypeError, binascii.Error, InvalidArtifactId):
        violations.append(FieldViolation("page_token", "is not a token from an earlier ListJobs response"))
        return ""
    if token_states != states:
        violations.append(FieldViolation("page_token", "was issued for other `states`; send the same filter"))
    return before
