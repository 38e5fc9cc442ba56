"""What every typed client shares: the channel, call options, context-manager use, artifacts.

`ServiceClient` blocks; `AsyncServiceClient` is the same for grpc.aio. Each owns one generated
stub of its service plus the artifact stub on the same channel, so a result delivered by
reference downloads through the connection (and credentials) that produced it. Both speak to
jobs the same way: `Generate` submits (with a ``client_request_id``, so a retried submit attaches
to the job instead of running it twice) and `WatchJob` resumes a broken stream; the gateway's
session header of each job is remembered (`JobSessions`) and sent back on its job calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Generic, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.artifacts.v1 import artifact_service_pb2 as artifacts_pb
from kiln.artifacts.v1 import artifact_service_pb2_grpc as artifacts_grpc
from kiln.common.v1 import artifact_pb2, job_pb2
from kiln_client import _download, _stream
from kiln_client._resume import RESUME_WINDOW_S, JobCursor
from kiln_client._session import JobSessions
from kiln_client.errors import InvalidArgumentError, error_from_rpc_error
from kiln_client.limits import DEFAULT_MAX_IMAGE_BYTES, max_request_message_bytes

StubT = TypeVar("StubT")
ResponseT = TypeVar("ResponseT")

DEFAULT_MAX_MESSAGE_BYTES = 4 << 20
"""The servers' default send cap (``KILN_<SERVICE>__SERVER__MAX_MESSAGE_BYTES``): larger artifacts
arrive in chunks below it. It is this client's receive cap; raise both together."""

Metadata = tuple[tuple[str, str], ...]

LEFT_JOB_CANCEL_TIMEOUT_S = 5.0
"""Deadline of the CancelJob sent for a job whose caller stopped reading its stream."""


def _remaining(timeout: float | None) -> Callable[[], float | None]:
    """Seconds left of one deadline for the whole stream, for each call that carries it."""
    if timeout is None:
        return lambda: None
    deadline = time.monotonic() + timeout
    return lambda: max(deadline - time.monotonic(), 0.0)


def _cancels_when_left(request: Any) -> bool:
    """Whether leaving the stream early means "cancel the job".

    So it always did; a dropped connection no longer does (the server keeps the job for a
    watcher, and the client resumes). ``WAIT_FOR_WATCHER`` and ``DETACH`` ask the job to outlive
    its stream, so leaving it alone is the point.
    """
    return request.on_disconnect in (job_pb2.DISCONNECT_POLICY_UNSPECIFIED, job_pb2.DISCONNECT_POLICY_CANCEL)


def _channel_options(max_message_bytes: int, max_image_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        # The servers' own receive cap for that image limit: an image over the limit still reaches
        # the server, whose INVALID_ARGUMENT names the field and the limit (kiln_client.limits).
        ("grpc.max_send_message_length", max_request_message_bytes(max_image_bytes)),
    ]


def _credentials(tls: bool, credentials: grpc.ChannelCredentials | None) -> grpc.ChannelCredentials | None:
    if credentials is None and tls:
        return grpc.ssl_channel_credentials()  # the system's root certificates
    return credentials


def _call_metadata(api_key: str | None, token: str | None, metadata: Sequence[tuple[str, str]]) -> Metadata:
    # Sent per call rather than as call credentials: grpc refuses call credentials on an
    # insecure channel, and a gateway on a private network may take a key without TLS.
    if api_key and token:
        # Both travel in the one `authorization` header; sending one silently would hide a mistake.
        raise ValueError("give an API key or a bearer token, not both")
    pairs = [(key.lower(), value) for key, value in metadata]
    if api_key or token:
        pairs.append(("authorization", f"Bearer {api_key or token}"))
    return tuple(pairs)


class _ClientCore(Generic[StubT]):
    """What both client kinds keep: construction, deadlines, retries, metadata."""

    _stub_type: Callable[[Any], StubT]
    #: The service's generated messages (``GetJobRequest``, ``WatchJobRequest``, ...).
    _messages: ModuleType
    # What this client sends at most; a larger request is refused here, before it travels.
    _max_request_bytes: int = max_request_message_bytes(DEFAULT_MAX_IMAGE_BYTES)

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        tls: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        retries: int = 2,
        resume_window_s: float = RESUME_WINDOW_S,
    ) -> None:
        options = _channel_options(max_message_bytes, max_image_bytes)
        channel = self._open_channel(target, options, _credentials(tls, credentials))
        self._init(
            channel,
            timeout=timeout,
            retries=retries,
            metadata=_call_metadata(api_key, token, metadata),
            owns_channel=True,
            resume_window_s=resume_window_s,
        )
        self._max_request_bytes = max_request_message_bytes(max_image_bytes)

    @staticmethod
    def _open_channel(
        target: str, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
    ) -> Any:  # pragma: no cover - each client kind opens its own
        raise NotImplementedError

    @classmethod
    def from_channel(
        cls,
        channel: Any,
        *,
        timeout: float | None = None,
        retries: int = 2,
        metadata: Sequence[tuple[str, str]] = (),
        resume_window_s: float = RESUME_WINDOW_S,
    ) -> Self:
        """Wrap an existing channel (``grpc.Channel``, or ``grpc.aio.Channel`` for the asyncio clients).

        ``close`` leaves it open for its owner.

        Args:
            channel: The channel to use.
            timeout: Default deadline in seconds for every call.
            retries: Default retries before the first event.
            metadata: Extra ``(key, value)`` pairs sent on every call.
            resume_window_s: How long a broken job stream is resumed; 0 never resumes.

        Returns:
            The client.
        """
        client = cls.__new__(cls)
        client._init(
            channel,
            timeout=timeout,
            retries=retries,
            metadata=tuple(metadata),
            owns_channel=False,
            resume_window_s=resume_window_s,
        )
        return client

    def _init(
        self,
        channel: Any,
        *,
        timeout: float | None,
        retries: int,
        metadata: Metadata,
        owns_channel: bool,
        resume_window_s: float,
    ) -> None:
        self._channel = channel
        self._stub = type(self)._stub_type(channel)
        self._artifacts = artifacts_grpc.ArtifactProviderStub(channel)
        self._timeout = timeout
        self._retries = retries
        self._metadata = metadata
        self._owns_channel = owns_channel
        self._resume_window_s = resume_window_s
        #: The gateway's session value of each recent job (``kiln_client.SESSION_HEADER``):
        #: sent back on that job's calls so they reach the replica that runs it.
        self.sessions = JobSessions()

    @property
    def _calls(self) -> Any:
        """The service stub, untyped: the generated grpc modules carry no annotations."""
        return self._stub

    def _job_metadata(self, job_id: str) -> Metadata:
        return self.sessions.metadata(job_id, self._metadata)

    def _submit(self, request: Any) -> Any:
        """Check a Generate request and give it an idempotency key when the caller gave none."""
        self._check_request_size(request)
        if not request.client_request_id:
            # The key lets a submit interrupted before `accepted` be sent again safely: the
            # server attaches the second try to the job the first one created.
            request.client_request_id = str(uuid.uuid4())
        return request

    def _open_call(self, request: Any, cursor: JobCursor, remaining: Callable[[], float | None]) -> Any:
        """The next call of a job's stream: Generate until the job exists, then WatchJob after the cursor."""
        if not cursor.started:
            return self._calls.Generate(request, timeout=remaining(), metadata=self._metadata)
        watch = self._messages.WatchJobRequest(job_id=cursor.job_id, after_sequence=cursor.last_sequence)
        return self._calls.WatchJob(watch, timeout=remaining(), metadata=self._job_metadata(cursor.job_id))

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self._timeout

    def _retry_count(self, retries: int | None) -> int:
        return self._retries if retries is None else retries

    def _check_request_size(self, request: Any) -> None:
        """Refuse a request the channel could not send, as the server would: by field, with the limit.

        Without this, grpc refuses it locally as RESOURCE_EXHAUSTED ("Sent message larger than
        max"), the code of a full server. Only images far over the servers' limit get here.
        """
        size = request.ByteSize()
        if size > self._max_request_bytes:
            description = (
                f"makes a request of {size} bytes, more than the {self._max_request_bytes} this client sends; "
                "the server's image limit is GetInfo's limits.max_image_bytes"
            )
            raise InvalidArgumentError(
                f"invalid request: image: {description}", field_violations=[("image", description)]
            )


class ServiceClient(_ClientCore[StubT]):
    """A blocking client owning a channel and one generated stub; subclasses add the service's calls.

    Args:
        target: Server or gateway address, for example ``localhost:50051``.
        timeout: Default deadline in seconds for every call; None waits indefinitely.
        max_message_bytes: Receive cap of the channel (the servers' send cap; larger artifacts arrive
            in chunks).
        max_image_bytes: The servers' image limit (GetInfo ``limits.max_image_bytes``); the send cap is
            derived from it with headroom, so a too-large image gets the server's own answer.
        tls: Use TLS with the system's root certificates (ignored when ``credentials`` is given).
        credentials: Explicit channel credentials, for example ``grpc.ssl_channel_credentials(ca)``.
        api_key: Sent as ``authorization: Bearer <key>`` on every call (a gateway with
            ``KILN_GATEWAY__AUTH__MODE=api_key``).
        token: A bearer token (a JWT from your identity provider), sent as ``authorization: Bearer
            <token>`` on every call (a gateway with ``KILN_GATEWAY__AUTH__MODE=jwt``). Not together with
            ``api_key``: both raises ValueError.
        metadata: Extra ``(key, value)`` pairs sent on every call.
        retries: Default number of retries before the job exists (its ``accepted`` event), of what
            can succeed on a later try: a full server (reason CAPACITY, after its RetryInfo
            delay), a draining one (SHUTTING_DOWN), a connection that failed (ARCHITECTURE.md,
            "Retries").
        resume_window_s: How long a job stream that broke after ``accepted`` is resumed with
            ``WatchJob`` (from the break; default 45 s, inside the servers' 60 s grace for an
            unwatched job); 0 never resumes.
    """

    @staticmethod
    def _open_channel(
        target: str, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
    ) -> grpc.Channel:
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def close(self) -> None:
        """Close the channel (when the client opened it)."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _unary(self, method: Callable[..., ResponseT], request: Any, timeout: float | None) -> ResponseT:
        """Call a unary RPC with the client's deadline and metadata; failures become `KilnError`s."""
        try:
            return method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from_rpc_error(error) from error

    def _job_unary(self, method: Any, request: Any, job_id: str, timeout: float | None) -> Any:
        """`_unary` for a call about one job: its session goes along, and a new one is remembered."""
        try:
            response, call = method.with_call(
                request, timeout=self._deadline(timeout), metadata=self._job_metadata(job_id)
            )
        except grpc.RpcError as error:
            raise error_from_rpc_error(error) from error
        self.sessions.note(job_id, call.initial_metadata())
        return response

    def _generate(self, request: Any, timeout: float | None, retries: int | None) -> Generator[Any]:
        """Submit a job and yield its events, resuming the stream if it breaks (`_stream.stream_events`)."""
        request = self._submit(request)
        remaining = _remaining(self._deadline(timeout))
        return _stream.stream_events(
            lambda cursor: self._open_call(request, cursor, remaining),
            JobCursor(window_s=self._resume_window_s),
            retries=self._retry_count(retries),
            on_first_event=self._note_session,
            on_abandon=self._cancel_left_job if _cancels_when_left(request) else None,
        )

    def _watch(self, job_id: str, after: int, timeout: float | None) -> Generator[Any]:
        """A job's events after ``after``, resumed like `_generate`'s."""
        remaining = _remaining(self._deadline(timeout))
        return _stream.stream_events(
            lambda cursor: self._open_call(None, cursor, remaining),
            JobCursor(job_id, after=after, window_s=self._resume_window_s),
            retries=0,
            on_first_event=self._note_session,
        )

    def _note_session(self, call: Any, cursor: JobCursor) -> None:
        self.sessions.note(cursor.job_id, call.initial_metadata())

    def _cancel_left_job(self, cursor: JobCursor) -> None:
        """Cancel a job whose caller stopped reading it; best effort (the server's grace period backs it).

        Anything that goes wrong is swallowed: this runs while the stream is being closed, perhaps
        by the garbage collector after the channel itself was closed.
        """
        request = self._messages.CancelJobRequest(job_id=cursor.job_id)
        with contextlib.suppress(Exception):
            self._job_unary(self._calls.CancelJob, request, cursor.job_id, LEFT_JOB_CANCEL_TIMEOUT_S)

    def _with_bytes(self, collected: _stream.Collected, delivery: str | int | None) -> _stream.Collected:
        """The collected job, with the artifact's bytes fetched if the stream lost them (`bytes_missing`)."""
        if not _stream.bytes_missing(collected, _stream.delivery(delivery)):
            return collected
        return dataclasses.replace(collected, data=self.fetch_artifact(collected.artifact))

    def check_health(self, service: str = "", *, timeout: float | None = None) -> str:
        """Ask the server's ``grpc.health.v1.Health`` service how ``service`` is.

        Args:
            service: A service name such as ``kiln.img2img.v1.Img2ImgProvider``; ``""`` is the
                whole server.
            timeout: Deadline in seconds; default the client's.

        Returns:
            ``SERVING``, ``NOT_SERVING`` (loading, draining or failed) or ``SERVICE_UNKNOWN``.

        Raises:
            NotFoundError: The server does not know the service name.
            UnimplementedError: The target has no health service (the gateway routes only Kiln's
                services; use ``get_info`` there).
        """
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._unary(health_pb2_grpc.HealthStub(self._channel).Check, request, timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def _artifact_pieces(self, artifact: artifact_pb2.Artifact, timeout: float | None) -> Iterator[bytes]:
        """The artifact's bytes in pieces: ``DownloadArtifact`` on this channel, else its http(s) URI."""
        request = artifacts_pb.DownloadArtifactRequest(artifact_id=artifact.id)
        call = self._artifacts.DownloadArtifact(request, timeout=self._deadline(timeout), metadata=self._metadata)
        started = False
        try:
            for body in call:
                started = True
                yield body.data
            return
        except grpc.RpcError as rpc_error:
            error = error_from_rpc_error(rpc_error)
            # Once bytes have arrived, another source would only hide a broken download.
            if started or not _download.should_try_uri(error, artifact):
                raise error from rpc_error
        finally:
            call.cancel()  # a consumer that stopped early (a full disk) ends the stream; no-op after it ended
        yield from _download.http_pieces(artifact, self._deadline(timeout))

    def fetch_artifact(self, artifact: artifact_pb2.Artifact, *, timeout: float | None = None) -> bytes:
        """The bytes of an artifact, wherever they are, checked against its SHA-256.

        Inline bytes are used as they are; a ``file://`` URI readable here is read; otherwise the
        server's ``ArtifactProvider.DownloadArtifact`` on this channel, then an ``http(s)://`` URI.
        The whole artifact is held in memory: `download` writes big ones to disk as they arrive.

        Args:
            artifact: An artifact of a result.
            timeout: Deadline in seconds for a download; default the client's.

        Returns:
            The verified bytes.

        Raises:
            ChecksumError: The bytes do not match the artifact's SHA-256.
            KilnError: No source had the artifact.
        """
        data = _download.local_bytes(artifact)
        if data is None:
            data = b"".join(self._artifact_pieces(artifact, timeout))
        _download.verify(artifact, data)
        return data

    def download(self, artifact: artifact_pb2.Artifact, path: str | Path, *, timeout: float | None = None) -> Path:
        """Write an artifact to ``path``: complete and verified, or not at all.

        The bytes stream into a temporary file beside ``path`` as they arrive (memory stays at a
        few pieces whatever the size) and are renamed into place once size and SHA-256 match.

        Args:
            artifact: An artifact of a result.
            path: Destination file; its folder must exist.
            timeout: Deadline in seconds for a download; default the client's.

        Returns:
            The written path.

        Raises:
            ChecksumError: The bytes do not match the artifact's SHA-256 (nothing is written).
            KilnError: No source had the artifact.
        """
        with _download.ArtifactFile(Path(path), artifact) as file:
            source = _download.local_path(artifact)
            if artifact.inline_data:
                file.write(artifact.inline_data)
            elif source is not None:
                file.copy_from(source)
            else:
                for piece in self._artifact_pieces(artifact, timeout):
                    file.write(piece)
            return file.commit()


class AsyncServiceClient(_ClientCore[StubT]):
    """The asyncio form of `ServiceClient` (grpc.aio); same arguments.

    Create it inside a running event loop (grpc.aio channels belong to the loop that made them).
    """

    @staticmethod
    def _open_channel(
        target: str, options: list[tuple[str, Any]], credentials: grpc.ChannelCredentials | None
    ) -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, credentials, options=options)

    async def close(self) -> None:
        """Close the channel (when the client opened it)."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _unary(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from_rpc_error(error) from error

    async def _job_unary(self, method: Any, request: Any, job_id: str, timeout: float | None) -> Any:
        """See `ServiceClient._job_unary`."""
        call = method(request, timeout=self._deadline(timeout), metadata=self._job_metadata(job_id))
        try:
            response = await call
        except grpc.RpcError as error:
            raise error_from_rpc_error(error) from error
        self.sessions.note(job_id, await call.initial_metadata())
        return response

    def _generate(self, request: Any, timeout: float | None, retries: int | None) -> AsyncGenerator[Any]:
        """`ServiceClient._generate` for grpc.aio."""
        request = self._submit(request)
        remaining = _remaining(self._deadline(timeout))
        return _stream.astream_events(
            lambda cursor: self._open_call(request, cursor, remaining),
            JobCursor(window_s=self._resume_window_s),
            retries=self._retry_count(retries),
            on_first_event=self._note_session,
            on_abandon=self._cancel_left_job if _cancels_when_left(request) else None,
        )

    def _watch(self, job_id: str, after: int, timeout: float | None) -> AsyncGenerator[Any]:
        """See `ServiceClient._watch`."""
        remaining = _remaining(self._deadline(timeout))
        return _stream.astream_events(
            lambda cursor: self._open_call(None, cursor, remaining),
            JobCursor(job_id, after=after, window_s=self._resume_window_s),
            retries=0,
            on_first_event=self._note_session,
        )

    async def _note_session(self, call: Any, cursor: JobCursor) -> None:
        self.sessions.note(cursor.job_id, await call.initial_metadata())

    async def _cancel_left_job(self, cursor: JobCursor) -> None:
        """See `ServiceClient._cancel_left_job`."""
        request = self._messages.CancelJobRequest(job_id=cursor.job_id)
        with contextlib.suppress(Exception):
            await self._job_unary(self._calls.CancelJob, request, cursor.job_id, LEFT_JOB_CANCEL_TIMEOUT_S)

    async def _with_bytes(self, collected: _stream.Collected, delivery: str | int | None) -> _stream.Collected:
        """See `ServiceClient._with_bytes`."""
        if not _stream.bytes_missing(collected, _stream.delivery(delivery)):
            return collected
        return dataclasses.replace(collected, data=await self.fetch_artifact(collected.artifact))

    async def _artifact_pieces(self, artifact: artifact_pb2.Artifact, timeout: float | None) -> AsyncIterator[bytes]:
        """See `ServiceClient._artifact_pieces`."""
        request = artifacts_pb.DownloadArtifactRequest(artifact_id=artifact.id)
        call = self._artifacts.DownloadArtifact(request, timeout=self._deadline(timeout), metadata=self._metadata)
        started = False
        try:
            async for body in call:
                started = True
                yield body.data
            return
        except grpc.RpcError as rpc_error:
            error = error_from_rpc_error(rpc_error)
            if started or not _download.should_try_uri(error, artifact):
                raise error from rpc_error
        finally:
            call.cancel()
        pieces = _download.http_pieces(artifact, self._deadline(timeout))
        while (piece := await asyncio.to_thread(next, pieces, None)) is not None:
            yield piece

    async def fetch_artifact(self, artifact: artifact_pb2.Artifact, *, timeout: float | None = None) -> bytes:
        """See `ServiceClient.fetch_artifact`."""
        data = _download.local_bytes(artifact)
        if data is None:
            data = b"".join([piece async for piece in self._artifact_pieces(artifact, timeout)])
        _download.verify(artifact, data)
        return data

    async def download(
        self, artifact: artifact_pb2.Artifact, path: str | Path, *, timeout: float | None = None
    ) -> Path:
        """See `ServiceClient.download` (file writes run in a worker thread)."""
        with await asyncio.to_thread(_download.ArtifactFile, Path(path), artifact) as file:
            source = _download.local_path(artifact)
            if artifact.inline_data:
                await asyncio.to_thread(file.write, artifact.inline_data)
            elif source is not None:
                await asyncio.to_thread(file.copy_from, source)
            else:
                async for piece in self._artifact_pieces(artifact, timeout):
                    await asyncio.to_thread(file.write, piece)
            return await asyncio.to_thread(file.commit)
