"""`kiln.artifacts.v1.ArtifactProvider`: stored artifacts by id, as a download through the gateway.

`GetArtifact` answers one message (artifacts below the message cap); `DownloadArtifact` streams
any size in pieces read from the store off the event loop. Each piece is yielded only after the
previous one was handed to the transport, so grpc's HTTP/2 flow control paces the reads: a slow
reader holds the server to a few pieces in memory, never the whole file.

Who may read an artifact: the principal that owns its job (the owner in `<job id>/job.json`),
or anybody with a valid signed link (`expires` + `signature`, see `kiln_runtime.signing`).
Another principal gets NOT_FOUND with the message of a missing artifact, so ids cannot be
probed; a link that was altered or has expired gets PERMISSION_DENIED, never the artifact.
"""

from __future__ import annotations

import asyncio
import collections
import re
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
from google.api import httpbody_pb2

from kiln.artifacts.v1 import artifact_service_pb2 as pb
from kiln.artifacts.v1 import artifact_service_pb2_grpc as pb_grpc
from kiln_runtime.errors import ArtifactTooLarge, FieldViolation, InvalidArgument, KilnError, NotFound
from kiln_runtime.job_api import record_owner
from kiln_runtime.jobs import MESSAGE_OVERHEAD_BYTES
from kiln_runtime.principal import ANONYMOUS, current_principal
from kiln_runtime.signing import LinkRefused, UrlSigner
from kiln_runtime.storage import (
    JOB_FILES,
    JOB_RECORD_NAME,
    ArtifactNotFound,
    ArtifactStore,
    InvalidArtifactId,
    StoredArtifact,
    validate_artifact_id,
)

SERVICE_NAME = "kiln.artifacts.v1.ArtifactProvider"

#: Bytes per DownloadArtifact message. Small enough that Envoy's transcoder (which holds one
#: whole message before it can pass its bytes on) and grpc's send buffer stay near this size;
#: large enough that per-message overhead does not matter (100 MB is 400 messages).
DOWNLOAD_CHUNK_BYTES = 256 * 1024

#: Initial metadata carrying the bytes this response will send, and, for a part of the artifact,
#: which part. The gateway turns them into Content-Length, and Content-Range with status 206
#: (the transcoder cannot set them itself: it never sees the whole body first).
CONTENT_LENGTH_HEADER = "x-kiln-content-length"
CONTENT_RANGE_HEADER = "x-kiln-content-range"

#: One `bytes=` range of RFC 9110 §14.1.2: `first-last`, `first-` or `-suffix`.
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

#: Job owners remembered (an owner never changes; this only saves re-reading records).
OWNER_CACHE_SIZE = 4096


class LinkNotValid(KilnError):
    """A signed link that was altered, is incomplete or has expired: PERMISSION_DENIED (HTTP 403)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "LINK_NOT_VALID"


class RangeNotSatisfiable(KilnError):
    """The requested part starts past the end of the artifact.

    Its trailers name the artifact's size as HTTP's `Content-Range: bytes */<size>`, which the
    gateway answers as 416 (so `curl -C -` on a complete file stops instead of appending).
    """

    code = grpc.StatusCode.OUT_OF_RANGE
    reason = "RANGE_NOT_SATISFIABLE"

    def __init__(self, message: str, *, size: int) -> None:
        super().__init__(message)
        self.size = size

    def trailers(self) -> tuple[tuple[str, str], ...]:
        return ((CONTENT_RANGE_HEADER, f"bytes */{self.size}"),)


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The `[start, stop)` an HTTP `Range` header selects from `size` bytes.

    Returns None when the header is not one well-formed byte range: RFC 9110 lets a server
    ignore such a header and send the whole representation, which is what callers do.

    Raises:
        RangeNotSatisfiable: The range is well-formed but selects nothing of `size` bytes.
    """
    match = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if not first:  # `-N`: the last N bytes
        start, stop = max(size - int(last), 0), size
        if int(last) == 0:
            raise RangeNotSatisfiable(f"range {header!r} selects no bytes of a {size}-byte artifact", size=size)
        return start, stop
    start = int(first)
    stop = size if not last else min(int(last) + 1, size)
    if last and int(last) < start:
        return None  # invalid: ignored, as the RFC allows
    if start >= size:
        raise RangeNotSatisfiable(f"range {header!r} starts past the end of a {size}-byte artifact", size=size)
    return start, stop


def _invocation_header(context: grpc.aio.ServicerContext[Any, Any], name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


class ArtifactServicer(pb_grpc.ArtifactProviderServicer):
    """GetArtifact and DownloadArtifact for the owner of the artifact's job, or for a signed link.

    Args:
        store: Where the artifacts and the job records are.
        max_message_bytes: The server's message cap (GetArtifact answers at most this).
        signer: Checks signed links; None: the store's own signer (the one its links are made with).
    """

    def __init__(self, store: ArtifactStore, max_message_bytes: int, *, signer: UrlSigner | None = None) -> None:
        self.store = store
        self.max_bytes = max_message_bytes - MESSAGE_OVERHEAD_BYTES
        self.chunk_bytes = max(1, min(DOWNLOAD_CHUNK_BYTES, self.max_bytes))
        self.signer = signer if signer is not None else getattr(store, "signer", None)
        self._owners: collections.OrderedDict[str, str] = collections.OrderedDict()

    async def _describe(self, request: pb.GetArtifactRequest | pb.DownloadArtifactRequest) -> StoredArtifact:
        artifact_id = request.artifact_id
        missing = NotFound(f"no artifact {artifact_id!r} (never stored, removed by cleanup, or not yours)")
        if artifact_id.rpartition("/")[2] in JOB_FILES:  # the job's own files: GetJob answers for them
            raise NotFound(f"no artifact {artifact_id!r}; the job's own files are read with GetJob")
        try:
            job_id, _ = validate_artifact_id(artifact_id)
        except InvalidArtifactId as err:
            raise InvalidArgument([FieldViolation("artifact_id", f"{err}; expected <job id>/<file name>")]) from None
        if request.signature or request.expires:
            self._check_link(request)
        elif await self._owner(job_id) != current_principal():
            raise missing  # the same answer as for an artifact that does not exist
        try:
            return await asyncio.to_thread(self.store.get, artifact_id)
        except InvalidArtifactId as err:
            raise InvalidArgument([FieldViolation("artifact_id", f"{err}; expected <job id>/<file name>")]) from None
        except ArtifactNotFound:
            raise missing from None

    def _check_link(self, request: pb.GetArtifactRequest | pb.DownloadArtifactRequest) -> None:
        if not request.signature or not request.expires:
            field = "signature" if not request.signature else "expires"
            raise LinkNotValid(f"this link is incomplete: it has no {field}; use the whole link from the result")
        if self.signer is None:  # this server makes no links, so it cannot vouch for any
            raise LinkNotValid("this link's signature does not match")
        try:
            self.signer.check(request.artifact_id, request.expires, request.signature)
        except LinkRefused as err:
            raise LinkNotValid(str(err)) from None

    async def _owner(self, job_id: str) -> str:
        """The principal owning `job_id`, from its record.

        ANONYMOUS without a record: files from before ownership, or stored outside any job.
        """
        cached = self._owners.get(job_id)
        if cached is not None:
            self._owners.move_to_end(job_id)
            return cached
        try:
            data = await asyncio.to_thread(self.store.read, f"{job_id}/{JOB_RECORD_NAME}")
        except ArtifactNotFound:
            return ANONYMOUS  # not cached: the record may yet be written
        try:
            owner = record_owner(data)
        except (ValueError, AttributeError):
            return ""  # an unreadable record: nobody's until it can be read (no principal is "")
        self._owners[job_id] = owner
        if len(self._owners) > OWNER_CACHE_SIZE:
            self._owners.popitem(last=False)
        return owner

    async def GetArtifact(  # noqa: N802 - gRPC method name
        self, request: pb.GetArtifactRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> httpbody_pb2.HttpBody:
        artifact_id = request.artifact_id
        stored = await self._describe(request)
        if stored.size_bytes > self.max_bytes:
            raise ArtifactTooLarge(
                f"{artifact_id} is {stored.size_bytes} bytes, more than one message may carry "
                f"({self.max_bytes}); use DownloadArtifact (a stream of pieces) instead"
            )
        try:
            data = await asyncio.to_thread(self.store.read, artifact_id)
        except ArtifactNotFound:
            raise NotFound(f"no artifact {artifact_id!r} (removed by cleanup)") from None
        return httpbody_pb2.HttpBody(content_type=stored.media_type, data=data)

    def _span(
        self, request: pb.DownloadArtifactRequest, context: grpc.aio.ServicerContext[Any, Any], size: int
    ) -> tuple[int, int, bool]:
        """`[start, stop)` to send and whether that is a part (HTTP Range) rather than all of it."""
        if request.offset < 0 or request.length < 0:
            field = "offset" if request.offset < 0 else "length"
            raise InvalidArgument([FieldViolation(field, f"must be >= 0, got {getattr(request, field)}")])
        if request.offset or request.length:
            if request.offset and request.offset >= size:
                raise RangeNotSatisfiable(
                    f"offset {request.offset} is past the end of a {size}-byte artifact", size=size
                )
            stop = size if not request.length else min(size, request.offset + request.length)
            return request.offset, stop, True
        # Through the gateway, the transcoder forwards request headers as metadata.
        header = _invocation_header(context, "range")
        span = parse_range(header, size) if header else None
        if span is None:
            return 0, size, False
        return span[0], span[1], True

    async def DownloadArtifact(  # noqa: N802 - gRPC method name
        self, request: pb.DownloadArtifactRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        artifact_id = request.artifact_id
        stored = await self._describe(request)
        start, stop, partial = self._span(request, context, stored.size_bytes)
        headers = [(CONTENT_LENGTH_HEADER, str(stop - start))]
        if partial:
            headers.append((CONTENT_RANGE_HEADER, f"bytes {start}-{max(stop - 1, start)}/{stored.size_bytes}"))
        pieces = _Pieces(self.store.chunks(artifact_id, chunk_bytes=self.chunk_bytes, start=start, stop=stop))
        try:
            # The first read also proves the artifact is still there before any header is sent.
            first = await asyncio.to_thread(pieces.next, artifact_id)
            await context.send_initial_metadata(headers)
            yield httpbody_pb2.HttpBody(content_type=stored.media_type, data=first or b"")
            while first is not None:
                piece = await asyncio.to_thread(pieces.next, artifact_id)
                if piece is None:
                    break
                yield httpbody_pb2.HttpBody(data=piece)
        finally:
            # Not awaited: on cancellation a read may still run in its thread, and the close must
            # wait for it there rather than be cancelled itself (the file would stay open).
            asyncio.get_running_loop().run_in_executor(None, pieces.close)


class _Pieces:
    """A store's piece iterator that worker threads advance one at a time and close safely."""

    def __init__(self, iterator: Iterator[bytes]) -> None:
        self._iterator = iterator
        self._lock = threading.Lock()

    def next(self, artifact_id: str) -> bytes | None:
        with self._lock:
            try:
                return next(self._iterator, None)
            except ArtifactNotFound:
                raise NotFound(f"no artifact {artifact_id!r} (never stored, or removed by cleanup)") from None

    def close(self) -> None:
        with self._lock:  # after a read still running in another thread
            close = getattr(self._iterator, "close", None)
            if close is not None:
                close()
