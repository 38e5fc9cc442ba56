"""`kiln.img2img.v1` messages ↔ img2img domain objects, with all request validation.

Validation happens here, once, at the edge: every problem in a request is collected and
reported together as INVALID_ARGUMENT with one `BadRequest` field violation per field.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from kiln.common.v1 import service_info_pb2
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln_img2img.providers.base import Img2ImgOutput
from kiln_runtime import convert as common
from kiln_runtime.errors import FieldViolation, InvalidArgument
from kiln_runtime.job_api import JobMessages
from kiln_runtime.jobs import Delivery, JobEvent, ResultEvent
from kiln_runtime.provider import ProviderDescription

STRENGTH = service_info_pb2.FloatRange(min=0.0, max=1.0, min_exclusive=True, default_value=0.75)
STEPS = service_info_pb2.IntRange(min=1, max=150, default_value=50)
GUIDANCE = service_info_pb2.FloatRange(min=0.0, max=30.0, default_value=7.5)
PREVIEW_EVERY = service_info_pb2.IntRange(min=0, max=150, default_value=0)
MAX_PROMPT_TOKENS = 77
SCHEDULERS = [name for name in pb.Scheduler.keys() if name != "SCHEDULER_UNSPECIFIED"]  # noqa: SIM118 - not a dict
IMAGE_FORMATS = [name for name in pb.ImageFormat.keys() if name != "IMAGE_FORMAT_UNSPECIFIED"]  # noqa: SIM118 - not a dict
# Prompts are tokenised later; this only stops absurd payloads before any work.
MAX_PROMPT_CHARS = 10_000


@dataclass(frozen=True)
class Img2ImgJob:
    """A validated request: everything but the image is final; the image is still encoded."""

    image_bytes: bytes
    prompt: str
    negative_prompt: str
    strength: float
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: str
    output_format: str
    preview_every_n_steps: int
    delivery: Delivery
    client_request_id: str


@dataclass(frozen=True)
class Img2ImgPayload:
    """What the result event carries besides the artifact."""

    job: Img2ImgJob
    output: Img2ImgOutput
    description: ProviderDescription


def job_from_request(request: pb.GenerateRequest) -> Img2ImgJob:
    """Validate a request and fill in defaults; raises `InvalidArgument` listing every problem."""
    violations: list[FieldViolation] = []
    if not request.image:
        violations.append(FieldViolation("image", "is required: the encoded PNG, JPEG or WebP input image"))
    if not request.prompt.strip():
        violations.append(FieldViolation("prompt", "is required and must not be blank"))
    for field in ("prompt", "negative_prompt"):
        if len(getattr(request, field)) > MAX_PROMPT_CHARS:
            violations.append(FieldViolation(field, f"is longer than {MAX_PROMPT_CHARS} characters"))
    strength = request.strength if request.HasField("strength") else STRENGTH.default_value
    steps = request.num_inference_steps if request.HasField("num_inference_steps") else STEPS.default_value
    guidance = request.guidance_scale if request.HasField("guidance_scale") else GUIDANCE.default_value
    common.check_range(violations, "strength", strength, STRENGTH)
    common.check_range(violations, "num_inference_steps", steps, STEPS)
    common.check_range(violations, "guidance_scale", guidance, GUIDANCE)
    if 0 < strength <= 1 and steps >= 1 and int(steps * strength) < 1:
        # img2img runs int(steps x strength) denoising steps; zero would return noise, not an edit.
        violations.append(
            FieldViolation("strength", f"{strength:g} x {steps} steps runs no denoising step; raise either")
        )
    common.check_range(violations, "preview_every_n_steps", request.preview_every_n_steps, PREVIEW_EVERY)
    common.check_enum(
        violations, "scheduler", request.scheduler, map(pb.Scheduler.Value, SCHEDULERS), "Scheduler", required=True
    )
    common.check_enum(
        violations,
        "output_format",
        request.output_format,
        map(pb.ImageFormat.Value, IMAGE_FORMATS),
        "ImageFormat",
        required=True,
    )
    common.check_client_request_id(violations, request.client_request_id)
    try:
        delivery = common.delivery_from_proto(request.delivery)
    except InvalidArgument as err:
        violations.extend(err.violations)
    if violations:
        raise InvalidArgument(violations)
    return Img2ImgJob(
        image_bytes=request.image,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        strength=float(strength),
        num_inference_steps=int(steps),
        guidance_scale=float(guidance),
        seed=request.seed if request.HasField("seed") else secrets.randbits(32),
        scheduler=pb.Scheduler.Name(request.scheduler).removeprefix("SCHEDULER_"),
        output_format=pb.ImageFormat.Name(request.output_format).removeprefix("IMAGE_FORMAT_"),
        preview_every_n_steps=request.preview_every_n_steps,
        delivery=delivery,
        client_request_id=request.client_request_id,
    )


def result(event: ResultEvent[Img2ImgPayload]) -> pb.Result:
    payload = event.payload
    job, output = payload.job, payload.output
    parameters = pb.EffectiveParameters(
        prompt=job.prompt,
        prompt_truncated=output.prompt_truncated,
        negative_prompt=job.negative_prompt,
        strength=job.strength,
        num_inference_steps=job.num_inference_steps,
        steps_run=output.steps_run,
        guidance_scale=job.guidance_scale,
        seed=job.seed,
        scheduler=f"SCHEDULER_{job.scheduler}",
        output_format=f"IMAGE_FORMAT_{job.output_format}",
    )
    return pb.Result(
        artifacts=[common.artifact(a) for a in event.artifacts],
        parameters=parameters,
        provenance=common.provenance(payload.description),
        timings=common.timings(event.timings),
        width=output.image.width,
        height=output.image.height,
    )


def response(event: JobEvent, domain: str) -> pb.GenerateResponse:
    return common.generate_response(event, pb.GenerateResponse, result, domain)


def parameter_ranges() -> pb.ParameterRanges:
    return pb.ParameterRanges(
        strength=STRENGTH,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        preview_every_n_steps=PREVIEW_EVERY,
        schedulers=SCHEDULERS,
        output_formats=IMAGE_FORMATS,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
    )


JOB_MESSAGES = JobMessages.of(pb, result)
