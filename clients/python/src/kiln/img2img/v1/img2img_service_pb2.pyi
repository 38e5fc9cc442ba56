from google.api import annotations_pb2 as _annotations_pb2
from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.rpc import status_pb2 as _status_pb2
from kiln.common.v1 import artifact_pb2 as _artifact_pb2
from kiln.common.v1 import job_pb2 as _job_pb2
from kiln.common.v1 import service_info_pb2 as _service_info_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Scheduler(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SCHEDULER_UNSPECIFIED: _ClassVar[Scheduler]
    SCHEDULER_DPMPP_2M: _ClassVar[Scheduler]
    SCHEDULER_EULER: _ClassVar[Scheduler]
    SCHEDULER_EULER_ANCESTRAL: _ClassVar[Scheduler]
    SCHEDULER_DDIM: _ClassVar[Scheduler]
    SCHEDULER_PNDM: _ClassVar[Scheduler]
    SCHEDULER_LMS: _ClassVar[Scheduler]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_WEBP: _ClassVar[ImageFormat]
SCHEDULER_UNSPECIFIED: Scheduler
SCHEDULER_DPMPP_2M: Scheduler
SCHEDULER_EULER: Scheduler
SCHEDULER_EULER_ANCESTRAL: Scheduler
SCHEDULER_DDIM: Scheduler
SCHEDULER_PNDM: Scheduler
SCHEDULER_LMS: Scheduler
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_WEBP: ImageFormat

class GenerateRequest(_message.Message):
    __slots__ = ("image", "prompt", "negative_prompt", "strength", "num_inference_steps", "guidance_scale", "seed", "scheduler", "output_format", "preview_every_n_steps", "delivery", "client_request_id", "on_disconnect")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_N_STEPS_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    prompt: str
    negative_prompt: str
    strength: float
    num_inference_steps: int
    guidance_scale: float
    seed: int
    scheduler: Scheduler
    output_format: ImageFormat
    preview_every_n_steps: int
    delivery: _artifact_pb2.ArtifactDelivery
    client_request_id: str
    on_disconnect: _job_pb2.DisconnectPolicy
    def __init__(self, image: _Optional[bytes] = ..., prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., strength: _Optional[float] = ..., num_inference_steps: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., scheduler: _Optional[_Union[Scheduler, str]] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ..., preview_every_n_steps: _Optional[int] = ..., delivery: _Optional[_Union[_artifact_pb2.ArtifactDelivery, str]] = ..., client_request_id: _Optional[str] = ..., on_disconnect: _Optional[_Union[_job_pb2.DisconnectPolicy, str]] = ...) -> None: ...

class EffectiveParameters(_message.Message):
    __slots__ = ("prompt", "prompt_truncated", "negative_prompt", "strength", "num_inference_steps", "steps_run", "guidance_scale", "seed", "scheduler", "output_format")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEPS_RUN_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SCHEDULER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prompt_truncated: bool
    negative_prompt: str
    strength: float
    num_inference_steps: int
    steps_run: int
    guidance_scale: float
    seed: int
    scheduler: Scheduler
    output_format: ImageFormat
    def __init__(self, prompt: _Optional[str] = ..., prompt_truncated: _Optional[bool] = ..., negative_prompt: _Optional[str] = ..., strength: _Optional[float] = ..., num_inference_steps: _Optional[int] = ..., steps_run: _Optional[int] = ..., guidance_scale: _Optional[float] = ..., seed: _Optional[int] = ..., scheduler: _Optional[_Union[Scheduler, str]] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("artifacts", "parameters", "provenance", "timings", "width", "height")
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[_artifact_pb2.Artifact]
    parameters: EffectiveParameters
    provenance: _job_pb2.Provenance
    timings: _containers.RepeatedCompositeFieldContainer[_job_pb2.PhaseTiming]
    width: int
    height: int
    def __init__(self, artifacts: _Optional[_Iterable[_Union[_artifact_pb2.Artifact, _Mapping]]] = ..., parameters: _Optional[_Union[EffectiveParameters, _Mapping]] = ..., provenance: _Optional[_Union[_job_pb2.Provenance, _Mapping]] = ..., timings: _Optional[_Iterable[_Union[_job_pb2.PhaseTiming, _Mapping]]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("accepted", "queued", "progress", "chunk", "result", "error", "sequence")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    accepted: _job_pb2.Accepted
    queued: _job_pb2.Queued
    progress: _job_pb2.Progress
    chunk: _artifact_pb2.ArtifactChunk
    result: Result
    error: _status_pb2.Status
    sequence: int
    def __init__(self, accepted: _Optional[_Union[_job_pb2.Accepted, _Mapping]] = ..., queued: _Optional[_Union[_job_pb2.Queued, _Mapping]] = ..., progress: _Optional[_Union[_job_pb2.Progress, _Mapping]] = ..., chunk: _Optional[_Union[_artifact_pb2.ArtifactChunk, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., sequence: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ParameterRanges(_message.Message):
    __slots__ = ("strength", "num_inference_steps", "guidance_scale", "preview_every_n_steps", "schedulers", "output_formats", "max_prompt_tokens")
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    NUM_INFERENCE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_N_STEPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULERS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    strength: _service_info_pb2.FloatRange
    num_inference_steps: _service_info_pb2.IntRange
    guidance_scale: _service_info_pb2.FloatRange
    preview_every_n_steps: _service_info_pb2.IntRange
    schedulers: _containers.RepeatedScalarFieldContainer[Scheduler]
    output_formats: _containers.RepeatedScalarFieldContainer[ImageFormat]
    max_prompt_tokens: int
    def __init__(self, strength: _Optional[_Union[_service_info_pb2.FloatRange, _Mapping]] = ..., num_inference_steps: _Optional[_Union[_service_info_pb2.IntRange, _Mapping]] = ..., guidance_scale: _Optional[_Union[_service_info_pb2.FloatRange, _Mapping]] = ..., preview_every_n_steps: _Optional[_Union[_service_info_pb2.IntRange, _Mapping]] = ..., schedulers: _Optional[_Iterable[_Union[Scheduler, str]]] = ..., output_formats: _Optional[_Iterable[_Union[ImageFormat, str]]] = ..., max_prompt_tokens: _Optional[int] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model", "limits", "parameters")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    model: _service_info_pb2.ModelInfo
    limits: _service_info_pb2.ServerLimits
    parameters: ParameterRanges
    def __init__(self, model: _Optional[_Union[_service_info_pb2.ModelInfo, _Mapping]] = ..., limits: _Optional[_Union[_service_info_pb2.ServerLimits, _Mapping]] = ..., parameters: _Optional[_Union[ParameterRanges, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("status", "request", "result")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    status: _job_pb2.JobStatus
    request: GenerateRequest
    result: Result
    def __init__(self, status: _Optional[_Union[_job_pb2.JobStatus, _Mapping]] = ..., request: _Optional[_Union[GenerateRequest, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id", "after_sequence")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_sequence: int
    def __init__(self, job_id: _Optional[str] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "states")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATES_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    states: _containers.RepeatedScalarFieldContainer[_job_pb2.JobState]
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., states: _Optional[_Iterable[_Union[_job_pb2.JobState, str]]] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
