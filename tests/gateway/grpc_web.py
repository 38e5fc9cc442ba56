"""A minimal binary gRPC-Web client (`application/grpc-web+proto`) over httpx, for tests.

Only what the gateway tests need: server-streaming (and unary, which is a one-message stream)
calls to Envoy's grpc_web filter. The wire format (gRPC-Web protocol, PROTOCOL-WEB.md):

- request body: one frame `flag(1) length(4, big-endian) message`, flag 0x00;
- response body: data frames (flag 0x00) as the messages come, then one trailer frame (flag
  0x80) whose payload is HTTP/1-style `key: value\\r\\n` lines (grpc-status, grpc-message,
  grpc-status-details-bin);
- a trailers-only response (an error before any message) has grpc-status in the HTTP headers
  and no trailer frame.

The body is read incrementally (`aiter_raw`), so each message is yielded as soon as its frame
is complete: tests can check that events are not buffered until the end.
"""

from __future__ import annotations

import base64
import struct
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import Generic, TypeVar

import httpx
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2

M = TypeVar("M", bound=Message)

CONTENT_TYPE = "application/grpc-web+proto"
USER_AGENT = "kiln-tests-grpc-web/1.0"
DATA_FLAG = 0x00
TRAILER_FLAG = 0x80
COMPRESSED_FLAG = 0x01
HEADER = struct.Struct(">BI")

#: How a non-200 HTTP status without grpc-status maps to a gRPC code (gRPC's http-grpc-status-mapping).
HTTP_TO_GRPC = {
    400: code_pb2.INTERNAL,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.UNIMPLEMENTED,
    429: code_pb2.UNAVAILABLE,
    502: code_pb2.UNAVAILABLE,
    503: code_pb2.UNAVAILABLE,
    504: code_pb2.UNAVAILABLE,
}


class GrpcWebError(Exception):
    """A call that ended with a non-OK grpc-status (or never produced one).

    Attributes:
        code: The numeric gRPC status code (`google.rpc.code_pb2` values).
        message: grpc-message, percent-decoded.
        status: The `google.rpc.Status` from grpc-status-details-bin, when the server sent one.
    """

    def __init__(self, code: int, message: str, status: status_pb2.Status | None = None) -> None:
        name = code_pb2.Code.Name(code) if code in code_pb2.Code.values() else "?"
        super().__init__(f"grpc-status {code} ({name}): {message}")
        self.code = code
        self.message = message
        self.status = status


def encode_frame(message: Message, flag: int = DATA_FLAG) -> bytes:
    """One length-prefixed gRPC(-Web) frame holding a serialized message."""
    payload = message.SerializeToString()
    return HEADER.pack(flag, len(payload)) + payload


def parse_trailers(payload: bytes) -> dict[str, str]:
    """The `key: value\\r\\n` lines of a trailer frame, keys lowercased."""
    trailers: dict[str, str] = {}
    for line in payload.decode("latin-1").split("\r\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise GrpcWebError(code_pb2.INTERNAL, f"malformed trailer line {line!r}")
        trailers[key.strip().lower()] = value.strip()
    return trailers


def _b64decode(text: str) -> bytes:
    """Base64 that may come without padding (gRPC sends binary headers unpadded)."""
    text = text.strip()
    return base64.b64decode(text + "=" * (-len(text) % 4))


def status_from(metadata: Mapping[str, str]) -> tuple[int, str, status_pb2.Status | None]:
    """grpc-status, grpc-message and the decoded grpc-status-details-bin of a trailer block."""
    raw_code = metadata.get("grpc-status", "")
    if not raw_code.strip().isdigit():
        return code_pb2.UNKNOWN, f"bad grpc-status {raw_code!r}", None
    message = urllib.parse.unquote(metadata.get("grpc-message", ""))
    status: status_pb2.Status | None = None
    if details := metadata.get("grpc-status-details-bin"):
        status = status_pb2.Status.FromString(_b64decode(details))
    return int(raw_code), message, status


def grpc_timeout(seconds: float) -> str:
    """A grpc-timeout header value (at most 8 digits, here in milliseconds)."""
    return f"{max(1, min(int(seconds * 1000), 99_999_999))}m"


class FrameReader:
    """Split a byte stream into (flag, payload) frames as the bytes arrive."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        frames: list[tuple[int, bytes]] = []
        while len(self._buffer) >= HEADER.size:
            flag, length = HEADER.unpack_from(self._buffer)
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            frames.append((flag, bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame still buffered."""
        return len(self._buffer)


class GrpcWebCall(Generic[M]):
    """One server-streaming gRPC-Web call; iterate it (once) for the response messages.

    After iteration `headers`, `http_status` and `trailers` are set. A non-OK status raises
    `GrpcWebError` after the messages that came before it were yielded.

    Args:
        client: The httpx client; its base_url is the gateway, e.g. http://127.0.0.1:8080.
        method: The full method, `/package.Service/Method`.
        request: The request message.
        response_type: The response message class.
        timeout_s: Sent as grpc-timeout when given.
        metadata: Extra request headers (e.g. Origin).
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout_s: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        self._client = client
        self.method = method if method.startswith("/") else "/" + method
        self.request = request
        self.response_type = response_type
        self.request_headers = {
            "content-type": CONTENT_TYPE,
            "accept": CONTENT_TYPE,
            "x-grpc-web": "1",
            "x-user-agent": USER_AGENT,
            **({"grpc-timeout": grpc_timeout(timeout_s)} if timeout_s is not None else {}),
            **(metadata or {}),
        }
        self.http_status = 0
        self.headers = httpx.Headers()
        self.trailers: dict[str, str] = {}

    async def __aiter__(self) -> AsyncIterator[M]:
        async with self._client.stream(
            "POST", self.method, content=encode_frame(self.request), headers=self.request_headers
        ) as response:
            self.http_status = response.status_code
            self.headers = response.headers
            if "grpc-status" in response.headers:  # trailers-only: an error before any message
                self.trailers = {key: response.headers[key] for key in response.headers if key.startswith("grpc-")}
                await response.aread()
                self._raise_for_status()
                return
            if response.status_code != 200:
                body = (await response.aread())[:500].decode(errors="replace")
                raise GrpcWebError(
                    HTTP_TO_GRPC.get(response.status_code, code_pb2.UNKNOWN),
                    f"HTTP {response.status_code}: {body}",
                )
            content_type = response.headers.get("content-type", "")
            if not content_type.startswith("application/grpc-web"):
                raise GrpcWebError(code_pb2.UNKNOWN, f"unexpected content-type {content_type!r}")
            reader = FrameReader()
            try:
                async for chunk in response.aiter_raw():
                    for flag, payload in reader.feed(chunk):
                        if flag & COMPRESSED_FLAG:
                            raise GrpcWebError(code_pb2.INTERNAL, "compressed frame, but no compression was asked for")
                        if flag & TRAILER_FLAG:
                            self.trailers = parse_trailers(payload)
                        elif self.trailers:
                            raise GrpcWebError(code_pb2.INTERNAL, "data frame after the trailers")
                        else:
                            yield self.response_type.FromString(payload)
            except httpx.TransportError as error:  # reset mid-stream: what grpcio reports as INTERNAL
                raise GrpcWebError(code_pb2.INTERNAL, f"stream broken: {error!r}") from error
            if reader.pending:
                raise GrpcWebError(code_pb2.INTERNAL, f"stream ended inside a frame ({reader.pending} bytes left)")
            if not self.trailers:
                raise GrpcWebError(code_pb2.INTERNAL, "stream ended without trailers")
            self._raise_for_status()

    def _raise_for_status(self) -> None:
        code, message, status = status_from(self.trailers)
        if code != code_pb2.OK:
            raise GrpcWebError(code, message, status)


async def collect(call: GrpcWebCall[M]) -> list[M]:
    """All messages of a call that ends OK (raises `GrpcWebError` otherwise)."""
    return [message async for message in call]
