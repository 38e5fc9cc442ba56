"""What both typed clients share: the channel, the generated stub, context-manager use, unary calls."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import grpc

from kiln_client import _stream
from kiln_client.errors import error_from_rpc_error

StubT = TypeVar("StubT")
ResponseT = TypeVar("ResponseT")


class ServiceClient(Generic[StubT]):
    """A blocking client owning a channel and one generated stub; subclasses add the service's calls.

    Args:
        target: Server or gateway address, for example ``localhost:50051``.
        timeout: Default deadline in seconds for every call; None waits indefinitely.
        max_message_bytes: Send and receive cap of the channel.
        credentials: TLS credentials; None opens an insecure channel.
        retries: Default number of retries of UNAVAILABLE and RESOURCE_EXHAUSTED before the
            first event of a stream.
    """

    _stub_type: Callable[[grpc.Channel], StubT]

    def __init__(
        self,
        target: str,
        *,
        timeout: float | None = None,
        max_message_bytes: int = _stream.DEFAULT_MAX_MESSAGE_BYTES,
        credentials: grpc.ChannelCredentials | None = None,
        retries: int = 2,
    ) -> None:
        channel = _stream.make_channel(target, max_message_bytes=max_message_bytes, credentials=credentials)
        self._init(channel, timeout=timeout, retries=retries, owns_channel=True)

    @classmethod
    def from_channel(cls, channel: grpc.Channel, *, timeout: float | None = None, retries: int = 2) -> Self:
        """Wrap an existing channel; ``close`` leaves it open for its owner.

        Args:
            channel: The channel to use.
            timeout: Default deadline in seconds for every call.
            retries: Default retries before the first event.

        Returns:
            The client.
        """
        client = cls.__new__(cls)
        client._init(channel, timeout=timeout, retries=retries, owns_channel=False)
        return client

    def _init(self, channel: grpc.Channel, *, timeout: float | None, retries: int, owns_channel: bool) -> None:
        self._channel = channel
        self._stub = type(self)._stub_type(channel)
        self._timeout = timeout
        self._retries = retries
        self._owns_channel = owns_channel

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
        """Call a unary RPC with the client's default deadline; failures become `KilnError`s."""
        try:
            return method(request, timeout=timeout if timeout is not None else self._timeout)
        except grpc.RpcError as error:
            raise error_from_rpc_error(error) from error
