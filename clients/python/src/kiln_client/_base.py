"""What every typed client shares: the channel, call options, context-manager use, artifacts.

`ServiceClient` blocks; `AsyncServiceClient` is the same for grpc.aio. Each owns one generated
stub of its service plus the artifact stub on the same channel, so a result delivered by
reference downloads through the connection (and credentials) that produced it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.artifacts.v1 import artifact_service_pb2 as artifacts_pb
from kiln.artifacts.v1 import artifact_service_pb2_grpc as artifacts_grpc
from kiln.common.v1 import artifact_pb2
from kiln_client import _download, _stream
from kiln_client.errors import KilnError, error_from_rpc_error

StubT = TypeVar("StubT")
ResponseT = TypeVar("ResponseT")

DEFAULT_MAX_MESSAGE_BYTES = 4 << 20
"""The servers' default cap (``KILN_<SERVICE>__SERVER__MAX_MESSAGE_BYTES``): larger artifacts
arrive in chunks below it, and a larger upload would be refused. Raise both together."""

Metadata = tuple[tuple[str, str], ...]


def _channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _credentials(tls: bool, credentials: grpc.ChannelCredentials | None) -> grpc.ChannelCredentials | None:
    if credentials is None and tls:
        return grpc.ssl_channel_credentials()  # the system's root certificates
    return credentials


def _call_metadata(api_key: str | None, metadata: Sequence[tuple[str, str]]) -> Metadata:
    # Sent per call rather than as call credentials: grpc refuses call credentials on an
    # insecure channel, and a gateway on a private network may take a key without TLS.
    pairs = [(key.lower(), value) for key, value in metadata]
    if api_key:
        pairs.append(("authorization", f"Bearer {api_key}"))
    return tuple(pairs)


class _ClientCore(Generic[StubT]):
    """What both client kinds keep: construction, deadlines, retries, metadata."""

    _stub_type: Callable[[Any], StubT]

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls: bool = False,
        credentials: grpc.ChannelCredentials | None = None,
        api_key: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        retries: int = 2,
    ) -> None:
        channel = self._open_channel(target, _channel_options(max_message_bytes), _credentials(tls, credentials))
        self._init(
            channel, timeout=timeout, retries=retries, metadata=_call_metadata(api_key, metadata), owns_channel=True
        )

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
    ) -> Self:
        """Wrap an existing channel (``grpc.Channel``, or ``grpc.aio.Channel`` for the asyncio clients).

        ``close`` leaves it open for its owner.

        Args:
            channel: The channel to use.
            timeout: Default deadline in seconds for every call.
            retries: Default retries before the first event.
            metadata: Extra ``(key, value)`` pairs sent on every call.

        Returns:
            The client.
        """
        client = cls.__new__(cls)
        client._init(channel, timeout=timeout, retries=retries, metadata=tuple(metadata), owns_channel=False)
        return client

    def _init(
        self,
        channel: Any,
        *,
        timeout: float | None,
        retries: int,
        metadata: Metadata,
        owns_channel: bool,
    ) -> None:
        self._channel = channel
        self._stub = type(self)._stub_type(channel)
        self._artifacts = artifacts_grpc.ArtifactProviderStub(channel)
        self._timeout = timeout
        self._retries = retries
        self._metadata = metadata
        self._owns_channel = owns_channel

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self._timeout

    def _retry_count(self, retries: int | None) -> int:
        return self._retries if retries is None else retries


class ServiceClient(_ClientCore[StubT]):
    """A blocking client owning a channel and one generated stub; subclasses add the service's calls.

    Args:
        target: Server or gateway address, for example ``localhost:50051``.
        timeout: Default deadline in seconds for every call; None waits indefinitely.
        max_message_bytes: Send and receive cap of the channel (the servers' default).
        tls: Use TLS with the system's root certificates (ignored when ``credentials`` is given).
        credentials: Explicit channel credentials, for example ``grpc.ssl_channel_credentials(ca)``.
        api_key: Sent as ``authorization: Bearer <key>`` on every call (for a gateway that checks it).
        metadata: Extra ``(key, value)`` pairs sent on every call.
        retries: Default number of retries of UNAVAILABLE and RESOURCE_EXHAUSTED before the
            first event of a stream.
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

    def _generate(self, request: Any, timeout: float | None, retries: int | None) -> Iterator[Any]:
        """Start Generate with the client's deadline and metadata; events with the retry rule."""
        deadline = self._deadline(timeout)

        def start() -> Iterator[Any]:
            return self._stub.Generate(request, timeout=deadline, metadata=self._metadata)  # type: ignore[attr-defined, no-any-return]

        return _stream.stream_events(start, retries=self._retry_count(retries))

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

    def fetch_artifact(self, artifact: artifact_pb2.Artifact, *, timeout: float | None = None) -> bytes:
        """The bytes of an artifact, wherever they are, checked against its SHA-256.

        Inline bytes are used as they are; a ``file://`` URI readable here is read; otherwise the
        server's ``ArtifactProvider.GetArtifact`` on this channel, then an ``http(s)://`` URI.

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
            request = artifacts_pb.GetArtifactRequest(artifact_id=artifact.id)
            try:
                data = self._unary(self._artifacts.GetArtifact, request, timeout).data
            except KilnError as error:
                data = _download.http_bytes_after(error, artifact, self._deadline(timeout))
        _download.verify(artifact, data)
        return data

    def download(self, artifact: artifact_pb2.Artifact, path: str | Path, *, timeout: float | None = None) -> Path:
        """Write an artifact to ``path``: complete and verified, or not at all.

        Args:
            artifact: An artifact of a result.
            path: Destination file; its folder must exist.
            timeout: Deadline in seconds for a download; default the client's.

        Returns:
            The written path.
        """
        return _download.write_atomically(Path(path), self.fetch_artifact(artifact, timeout=timeout))


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

    def _generate(self, request: Any, timeout: float | None, retries: int | None) -> AsyncGenerator[Any]:
        """`ServiceClient._generate` for grpc.aio."""
        deadline = self._deadline(timeout)

        def start() -> AsyncIterator[Any]:
            return self._stub.Generate(request, timeout=deadline, metadata=self._metadata)  # type: ignore[attr-defined, no-any-return]

        return _stream.astream_events(start, retries=self._retry_count(retries))

    async def fetch_artifact(self, artifact: artifact_pb2.Artifact, *, timeout: float | None = None) -> bytes:
        """See `ServiceClient.fetch_artifact`."""
        data = _download.local_bytes(artifact)
        if data is None:
            request = artifacts_pb.GetArtifactRequest(artifact_id=artifact.id)
            try:
                data = (await self._unary(self._artifacts.GetArtifact, request, timeout)).data
            except KilnError as error:
                data = await asyncio.to_thread(_download.http_bytes_after, error, artifact, self._deadline(timeout))
        assert data is not None
        _download.verify(artifact, data)
        return data

    async def download(
        self, artifact: artifact_pb2.Artifact, path: str | Path, *, timeout: float | None = None
    ) -> Path:
        """See `ServiceClient.download`."""
        data = await self.fetch_artifact(artifact, timeout=timeout)
        return await asyncio.to_thread(_download.write_atomically, Path(path), data)
