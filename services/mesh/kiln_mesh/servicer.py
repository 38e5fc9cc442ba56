"""The thin gRPC layer of `kiln.mesh.v1.MeshProvider`: convert, delegate, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from kiln.mesh.v1 import mesh_service_pb2 as pb
from kiln.mesh.v1 import mesh_service_pb2_grpc as pb_grpc
from kiln_mesh import convert
from kiln_mesh.service import MeshService
from kiln_runtime import convert as common
from kiln_runtime.job_servicer import JobMethods, deadline


class MeshServicer(JobMethods, pb_grpc.MeshProviderServicer):
    """Generate and GetInfo here; the job methods come from `JobMethods`."""

    def __init__(self, service: MeshService) -> None:
        self.service = service

    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        job = convert.job_from_request(request)
        events = self.service.generate(job, time_remaining=deadline(context))
        async for response in self.service.runtime.job_rpcs.generate(request, events):
            yield response

    async def GetInfo(  # noqa: N802 - gRPC method name
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetInfoResponse:
        runtime = self.service.runtime
        return pb.GetInfoResponse(
            model=common.model_info(runtime.manager, storage_refusal=runtime.runner.storage_refusal()),
            limits=common.server_limits(runtime.settings, runtime.admission, runtime.runner.max_inline_bytes),
            # Only Kiln's own TripoSR bakes textures; vendors and the fake return what they return.
            parameters=convert.parameter_ranges(can_bake_texture=runtime.manager.describe().kind == "local"),
        )
