"""The img2img model server as a declaration; `kiln_runtime.bootstrap` builds it."""

from __future__ import annotations

from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img import SERVICE_NAME, convert
from kiln_img2img.config import Img2ImgSettings
from kiln_img2img.providers import RUNS_LOCALLY, create_provider
from kiln_img2img.service import Img2ImgService
from kiln_runtime.bootstrap import ServiceSpec

SPEC = ServiceSpec(
    name="img2img",
    full_name=SERVICE_NAME,
    settings_type=Img2ImgSettings,
    create_provider=create_provider,
    runs_locally=RUNS_LOCALLY,
    create_service=lambda runtime, settings: Img2ImgService(runtime, settings.img2img.diffusers),
    job_from_request=convert.job_from_request,
    job_messages=convert.JOB_MESSAGES,
    info_response=pb.GetInfoResponse,
    parameters=lambda runtime: convert.parameter_ranges(),
    register=pb_grpc.add_Img2ImgProviderServicer_to_server,
)

#: Everything wired, nothing bound: call `start()` (tests) or run `serve()` (main).
create_server = SPEC.create_server
