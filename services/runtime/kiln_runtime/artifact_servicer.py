"""`kiln.artifacts.v1.ArtifactProvider`: stored artifacts by id, as a download through the gateway."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.api import httpbody_pb2

from kiln.artifacts.v1 import artifact_service_pb2 as pb
from kiln.artifacts.v1 import artifact_service_pb2_grpc as pb_grpc
from kiln_runtime.errors import ArtifactTooLarge, FieldViolation, InvalidArgument, NotFound
from kiln_runtime.jobs import MESSAGE_OVERHEAD_BYTES
from kiln_runtime.storage import ArtifactNotFound, ArtifactStore, InvalidArtifactId

SERVICE_NAME = "kiln.artifacts.v1.ArtifactProvider"


class ArtifactServicer(pb_grpc.ArtifactProviderServicer):
    def __init__(self, store: ArtifactStore, max_message_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_message_bytes - MESSAGE_OVERHEAD_BYTES

    async def GetArtifact(  # noqa: N802 - gRPC method name
        self, request: pb.GetArtifactRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> httpbody_pb2.HttpBody:
        artifact_id = request.artifact_id
        try:
            stored = await asyncio.to_thread(self.store.get, artifact_id)
            if stored.size_bytes > self.max_bytes:
                raise ArtifactTooLarge(
                    f"{artifact_id} is {stored.size_bytes} bytes, more than one message may carry "
                    f"({self.max_bytes}); ask Generate for ARTIFACT_DELIVERY_CHUNKED instead"
                )
            data = await asyncio.to_thread(self.store.read, artifact_id)
        except InvalidArtifactId as err:
            raise InvalidArgument([FieldViolation("artifact_id", f"{err}; expected <job id>/<file name>")]) from None
        except ArtifactNotFound:
            raise NotFound(f"no artifact {artifact_id!r} (never stored, or removed by cleanup)") from None
        return httpbody_pb2.HttpBody(content_type=stored.media_type, data=data)
