"""`kiln.mesh.v1` messages ↔ mesh domain objects, with all request validation.

As in img2img, every problem in a request is collected and reported together as
INVALID_ARGUMENT with one `BadRequest` field violation per field.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.common.v1 import service_info_pb2
from kiln.mesh.v1 import mesh_service_pb2 as pb
from kiln_mesh.export import MeshFormat
from kiln_mesh.providers.base import MeshOutput
from kiln_runtime import convert as common
from kiln_runtime.errors import FieldViolation, InvalidArgument
from kiln_runtime.job_api import JobMessages
from kiln_runtime.jobs import Delivery, JobEvent, ResultEvent
from kiln_runtime.provider import ProviderDescription

FOREGROUND_RATIO = service_info_pb2.FloatRange(min=0.5, max=1.0, default_value=0.85)
MC_RESOLUTION = service_info_pb2.IntRange(min=32, max=512, default_value=256)
MC_THRESHOLD = service_info_pb2.FloatRange(min=0.0, max=1000.0, min_exclusive=True, default_value=25.0)
TEXTURE_RESOLUTION = service_info_pb2.IntRange(min=256, max=4096, default_value=2048)
MESH_FORMATS = [name for name in pb.MeshFormat.keys() if name != "MESH_FORMAT_UNSPECIFIED"]  # noqa: SIM118 - not a dict
_REMOVE_BACKGROUND = {
    pb.REMOVE_BACKGROUND_UNSPECIFIED: "AUTO",
    pb.REMOVE_BACKGROUND_AUTO: "AUTO",
    pb.REMOVE_BACKGROUND_ALWAYS: "ALWAYS",
    pb.REMOVE_BACKGROUND_NEVER: "NEVER",
}
_FRAMES = {pb.MESH_FRAME_UNSPECIFIED: "Y_UP", pb.MESH_FRAME_Y_UP: "Y_UP", pb.MESH_FRAME_NATIVE: "NATIVE"}


@dataclass(frozen=True)
class MeshJob:
    """A validated request with defaults filled in; the image is still encoded."""

    image_bytes: bytes
    remove_background: str
    foreground_ratio: float
    mc_resolution: int
    mc_threshold: float
    output_format: MeshFormat
    bake_texture: bool
    texture_resolution: int
    frame: str
    delivery: Delivery
    client_request_id: str


@dataclass(frozen=True)
class MeshPayload:
    """What the result event carries besides the artifact."""

    job: MeshJob
    output: MeshOutput
    description: ProviderDescription


def job_from_request(request: pb.GenerateRequest) -> MeshJob:
    """Validate a request and fill in defaults; raises `InvalidArgument` listing every problem."""
    violations: list[FieldViolation] = []
    if not request.image:
        violations.append(FieldViolation("image", "is required: the encoded PNG, JPEG or WebP input image"))
    ratio = request.foreground_ratio if request.HasField("foreground_ratio") else FOREGROUND_RATIO.default_value
    resolution = request.mc_resolution if request.HasField("mc_resolution") else MC_RESOLUTION.default_value
    threshold = request.mc_threshold if request.HasField("mc_threshold") else MC_THRESHOLD.default_value
    texture = request.texture_resolution if request.HasField("texture_resolution") else TEXTURE_RESOLUTION.default_value
    common.check_range(violations, "foreground_ratio", ratio, FOREGROUND_RATIO)
    common.check_range(violations, "mc_resolution", resolution, MC_RESOLUTION)
    common.check_range(violations, "mc_threshold", threshold, MC_THRESHOLD)
    common.check_range(violations, "texture_resolution", texture, TEXTURE_RESOLUTION)
    common.check_enum(
        violations,
        "output_format",
        request.output_format,
        map(pb.MeshFormat.Value, MESH_FORMATS),
        "MeshFormat",
        required=True,
    )
    common.check_enum(
        violations,
        "remove_background",
        request.remove_background,
        _REMOVE_BACKGROUND,
        "RemoveBackground",
        required=False,
    )
    common.check_enum(violations, "frame", request.frame, _FRAMES, "MeshFrame", required=False)
    if request.bake_texture and request.output_format not in (pb.MESH_FORMAT_GLB, pb.MESH_FORMAT_UNSPECIFIED):
        violations.append(FieldViolation("bake_texture", "needs output_format MESH_FORMAT_GLB"))
    common.check_client_request_id(violations, request.client_request_id)
    try:
        delivery = common.delivery_from_proto(request.delivery)
    except InvalidArgument as err:
        violations.extend(err.violations)
    if violations:
        raise InvalidArgument(violations)
    return MeshJob(
        image_bytes=request.image,
        remove_background=_REMOVE_BACKGROUND[request.remove_background],
        foreground_ratio=float(ratio),
        mc_resolution=int(resolution),
        mc_threshold=float(threshold),
        output_format=MeshFormat[pb.MeshFormat.Name(request.output_format).removeprefix("MESH_FORMAT_")],
        bake_texture=request.bake_texture,
        texture_resolution=int(texture) if request.bake_texture else 0,
        frame=_FRAMES[request.frame],
        delivery=delivery,
        client_request_id=request.client_request_id,
    )


def result(event: ResultEvent[MeshPayload]) -> pb.Result:
    payload = event.payload
    job, output = payload.job, payload.output
    parameters = pb.EffectiveParameters(
        background_removed=output.background_removed,
        foreground_ratio=job.foreground_ratio,
        mc_resolution=job.mc_resolution,
        mc_threshold=job.mc_threshold,
        output_format=f"MESH_FORMAT_{job.output_format.name}",
        bake_texture=job.bake_texture,
        texture_resolution=job.texture_resolution,
        frame=f"MESH_FRAME_{job.frame}",
    )
    return pb.Result(
        artifacts=[common.artifact(a) for a in event.artifacts],
        parameters=parameters,
        provenance=common.provenance(payload.description),
        timings=common.timings(event.timings),
        vertex_count=output.vertex_count,
        face_count=output.face_count,
    )


def response(event: JobEvent, domain: str) -> pb.GenerateResponse:
    return common.generate_response(event, pb.GenerateResponse, result, domain)


def parameter_ranges(can_bake_texture: bool) -> pb.ParameterRanges:
    return pb.ParameterRanges(
        foreground_ratio=FOREGROUND_RATIO,
        mc_resolution=MC_RESOLUTION,
        mc_threshold=MC_THRESHOLD,
        texture_resolution=TEXTURE_RESOLUTION,
        output_formats=MESH_FORMATS,
        can_bake_texture=can_bake_texture,
    )


JOB_MESSAGES = JobMessages.of(pb, result)
