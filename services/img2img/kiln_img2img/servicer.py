"""The thin gRPC layer of `kiln.img2img.v1.Img2ImgProvider`: convert, delegate, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img import convert
from kiln_img2img.service import Img2ImgService
from kiln_runtime import convert as common
from kiln_runtime.job_servicer import JobMethods, deadline


class Img2ImgServicer(JobMethods, pb_grpc.Img2ImgProviderServicer):
    """Generate and GetInfo here; the job methods come from `JobMethods`."""

    def __init__(self, service: Img2ImgService) -> None:
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
            parameters=convert.parameter_ranges(),
        )
