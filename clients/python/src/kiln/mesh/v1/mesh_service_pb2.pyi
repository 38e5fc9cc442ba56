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

class RemoveBackground(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REMOVE_BACKGROUND_UNSPECIFIED: _ClassVar[RemoveBackground]
    REMOVE_BACKGROUND_AUTO: _ClassVar[RemoveBackground]
    REMOVE_BACKGROUND_ALWAYS: _ClassVar[RemoveBackground]
    REMOVE_BACKGROUND_NEVER: _ClassVar[RemoveBackground]

class MeshFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESH_FORMAT_UNSPECIFIED: _ClassVar[MeshFormat]
    MESH_FORMAT_GLB: _ClassVar[MeshFormat]
    MESH_FORMAT_OBJ: _ClassVar[MeshFormat]
    MESH_FORMAT_PLY: _ClassVar[MeshFormat]

class MeshFrame(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESH_FRAME_UNSPECIFIED: _ClassVar[MeshFrame]
    MESH_FRAME_Y_UP: _ClassVar[MeshFrame]
    MESH_FRAME_NATIVE: _ClassVar[MeshFrame]
REMOVE_BACKGROUND_UNSPECIFIED: RemoveBackground
REMOVE_BACKGROUND_AUTO: RemoveBackground
REMOVE_BACKGROUND_ALWAYS: RemoveBackground
REMOVE_BACKGROUND_NEVER: RemoveBackground
MESH_FORMAT_UNSPECIFIED: MeshFormat
MESH_FORMAT_GLB: MeshFormat
MESH_FORMAT_OBJ: MeshFormat
MESH_FORMAT_PLY: MeshFormat
MESH_FRAME_UNSPECIFIED: MeshFrame
MESH_FRAME_Y_UP: MeshFrame
MESH_FRAME_NATIVE: MeshFrame

class GenerateRequest(_message.Message):
    __slots__ = ("image", "remove_background", "foreground_ratio", "mc_resolution", "mc_threshold", "output_format", "bake_texture", "texture_resolution", "frame", "delivery", "client_request_id", "on_disconnect")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    REMOVE_BACKGROUND_FIELD_NUMBER: _ClassVar[int]
    FOREGROUND_RATIO_FIELD_NUMBER: _ClassVar[int]
    MC_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    MC_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    BAKE_TEXTURE_FIELD_NUMBER: _ClassVar[int]
    TEXTURE_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    remove_background: RemoveBackground
    foreground_ratio: float
    mc_resolution: int
    mc_threshold: float
    output_format: MeshFormat
    bake_texture: bool
    texture_resolution: int
    frame: MeshFrame
    delivery: _artifact_pb2.ArtifactDelivery
    client_request_id: str
    on_disconnect: _job_pb2.DisconnectPolicy
    def __init__(self, image: _Optional[bytes] = ..., remove_background: _Optional[_Union[RemoveBackground, str]] = ..., foreground_ratio: _Optional[float] = ..., mc_resolution: _Optional[int] = ..., mc_threshold: _Optional[float] = ..., output_format: _Optional[_Union[MeshFormat, str]] = ..., bake_texture: _Optional[bool] = ..., texture_resolution: _Optional[int] = ..., frame: _Optional[_Union[MeshFrame, str]] = ..., delivery: _Optional[_Union[_artifact_pb2.ArtifactDelivery, str]] = ..., client_request_id: _Optional[str] = ..., on_disconnect: _Optional[_Union[_job_pb2.DisconnectPolicy, str]] = ...) -> None: ...

class EffectiveParameters(_message.Message):
    __slots__ = ("background_removed", "foreground_ratio", "mc_resolution", "mc_threshold", "output_format", "bake_texture", "texture_resolution", "frame")
    BACKGROUND_REMOVED_FIELD_NUMBER: _ClassVar[int]
    FOREGROUND_RATIO_FIELD_NUMBER: _ClassVar[int]
    MC_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    MC_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    BAKE_TEXTURE_FIELD_NUMBER: _ClassVar[int]
    TEXTURE_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    background_removed: bool
    foreground_ratio: float
    mc_resolution: int
    mc_threshold: float
    output_format: MeshFormat
    bake_texture: bool
    texture_resolution: int
    frame: MeshFrame
    def __init__(self, background_removed: _Optional[bool] = ..., foreground_ratio: _Optional[float] = ..., mc_resolution: _Optional[int] = ..., mc_threshold: _Optional[float] = ..., output_format: _Optional[_Union[MeshFormat, str]] = ..., bake_texture: _Optional[bool] = ..., texture_resolution: _Optional[int] = ..., frame: _Optional[_Union[MeshFrame, str]] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("artifacts", "parameters", "provenance", "timings", "vertex_count", "face_count")
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    VERTEX_COUNT_FIELD_NUMBER: _ClassVar[int]
    FACE_COUNT_FIELD_NUMBER: _ClassVar[int]
    artifacts: _containers.RepeatedCompositeFieldContainer[_artifact_pb2.Artifact]
    parameters: EffectiveParameters
    provenance: _job_pb2.Provenance
    timings: _containers.RepeatedCompositeFieldContainer[_job_pb2.PhaseTiming]
    vertex_count: int
    face_count: int
    def __init__(self, artifacts: _Optional[_Iterable[_Union[_artifact_pb2.Artifact, _Mapping]]] = ..., parameters: _Optional[_Union[EffectiveParameters, _Mapping]] = ..., provenance: _Optional[_Union[_job_pb2.Provenance, _Mapping]] = ..., timings: _Optional[_Iterable[_Union[_job_pb2.PhaseTiming, _Mapping]]] = ..., vertex_count: _Optional[int] = ..., face_count: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("foreground_ratio", "mc_resolution", "mc_threshold", "texture_resolution", "output_formats", "can_bake_texture")
    FOREGROUND_RATIO_FIELD_NUMBER: _ClassVar[int]
    MC_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    MC_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TEXTURE_RESOLUTION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMATS_FIELD_NUMBER: _ClassVar[int]
    CAN_BAKE_TEXTURE_FIELD_NUMBER: _ClassVar[int]
    foreground_ratio: _service_info_pb2.FloatRange
    mc_resolution: _service_info_pb2.IntRange
    mc_threshold: _service_info_pb2.FloatRange
    texture_resolution: _service_info_pb2.IntRange
    output_formats: _containers.RepeatedScalarFieldContainer[MeshFormat]
    can_bake_texture: bool
    def __init__(self, foreground_ratio: _Optional[_Union[_service_info_pb2.FloatRange, _Mapping]] = ..., mc_resolution: _Optional[_Union[_service_info_pb2.IntRange, _Mapping]] = ..., mc_threshold: _Optional[_Union[_service_info_pb2.FloatRange, _Mapping]] = ..., texture_resolution: _Optional[_Union[_service_info_pb2.IntRange, _Mapping]] = ..., output_formats: _Optional[_Iterable[_Union[MeshFormat, str]]] = ..., can_bake_texture: _Optional[bool] = ...) -> None: ...

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
