import datetime

from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_PREPROCESS: _ClassVar[Stage]
    STAGE_DENOISE: _ClassVar[Stage]
    STAGE_DECODE: _ClassVar[Stage]
    STAGE_REMOVE_BACKGROUND: _ClassVar[Stage]
    STAGE_ENCODE: _ClassVar[Stage]
    STAGE_EXTRACT: _ClassVar[Stage]
    STAGE_EXPORT: _ClassVar[Stage]
    STAGE_POSTPROCESS: _ClassVar[Stage]
    STAGE_VENDOR_SUBMITTED: _ClassVar[Stage]
    STAGE_VENDOR_WAITING: _ClassVar[Stage]
    STAGE_VENDOR_RECEIVED: _ClassVar[Stage]
    STAGE_LOAD_MODEL: _ClassVar[Stage]

class Reproducibility(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPRODUCIBILITY_UNSPECIFIED: _ClassVar[Reproducibility]
    REPRODUCIBILITY_BITWISE_SAME_HARDWARE: _ClassVar[Reproducibility]
    REPRODUCIBILITY_BEST_EFFORT: _ClassVar[Reproducibility]
    REPRODUCIBILITY_NONE: _ClassVar[Reproducibility]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_ARGUMENT: _ClassVar[ErrorReason]
    ERROR_REASON_CAPACITY: _ClassVar[ErrorReason]
    ERROR_REASON_MODEL_NOT_READY: _ClassVar[ErrorReason]
    ERROR_REASON_SHUTTING_DOWN: _ClassVar[ErrorReason]
    ERROR_REASON_CANCELLED: _ClassVar[ErrorReason]
    ERROR_REASON_PROVIDER_FAILED: _ClassVar[ErrorReason]
    ERROR_REASON_CONTENT_BLOCKED_INPUT: _ClassVar[ErrorReason]
    ERROR_REASON_CONTENT_BLOCKED_OUTPUT: _ClassVar[ErrorReason]
    ERROR_REASON_NO_IMAGE_PRODUCED: _ClassVar[ErrorReason]
    ERROR_REASON_VENDOR_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_VENDOR_AUTH: _ClassVar[ErrorReason]
    ERROR_REASON_VENDOR_QUOTA: _ClassVar[ErrorReason]
    ERROR_REASON_ARTIFACT_TOO_LARGE: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_DEADLINE_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_STORAGE_FULL: _ClassVar[ErrorReason]
    ERROR_REASON_STORAGE_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_RANGE_NOT_SATISFIABLE: _ClassVar[ErrorReason]
STAGE_UNSPECIFIED: Stage
STAGE_PREPROCESS: Stage
STAGE_DENOISE: Stage
STAGE_DECODE: Stage
STAGE_REMOVE_BACKGROUND: Stage
STAGE_ENCODE: Stage
STAGE_EXTRACT: Stage
STAGE_EXPORT: Stage
STAGE_POSTPROCESS: Stage
STAGE_VENDOR_SUBMITTED: Stage
STAGE_VENDOR_WAITING: Stage
STAGE_VENDOR_RECEIVED: Stage
STAGE_LOAD_MODEL: Stage
REPRODUCIBILITY_UNSPECIFIED: Reproducibility
REPRODUCIBILITY_BITWISE_SAME_HARDWARE: Reproducibility
REPRODUCIBILITY_BEST_EFFORT: Reproducibility
REPRODUCIBILITY_NONE: Reproducibility
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_INVALID_ARGUMENT: ErrorReason
ERROR_REASON_CAPACITY: ErrorReason
ERROR_REASON_MODEL_NOT_READY: ErrorReason
ERROR_REASON_SHUTTING_DOWN: ErrorReason
ERROR_REASON_CANCELLED: ErrorReason
ERROR_REASON_PROVIDER_FAILED: ErrorReason
ERROR_REASON_CONTENT_BLOCKED_INPUT: ErrorReason
ERROR_REASON_CONTENT_BLOCKED_OUTPUT: ErrorReason
ERROR_REASON_NO_IMAGE_PRODUCED: ErrorReason
ERROR_REASON_VENDOR_UNAVAILABLE: ErrorReason
ERROR_REASON_VENDOR_AUTH: ErrorReason
ERROR_REASON_VENDOR_QUOTA: ErrorReason
ERROR_REASON_ARTIFACT_TOO_LARGE: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_DEADLINE_EXCEEDED: ErrorReason
ERROR_REASON_STORAGE_FULL: ErrorReason
ERROR_REASON_STORAGE_UNAVAILABLE: ErrorReason
ERROR_REASON_NOT_FOUND: ErrorReason
ERROR_REASON_RANGE_NOT_SATISFIABLE: ErrorReason

class Accepted(_message.Message):
    __slots__ = ("job_id", "queue_position")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    queue_position: int
    def __init__(self, job_id: _Optional[str] = ..., queue_position: _Optional[int] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position", "eta")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    position: int
    eta: _duration_pb2.Duration
    def __init__(self, position: _Optional[int] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("media_type", "data", "width", "height")
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    media_type: str
    data: bytes
    width: int
    height: int
    def __init__(self, media_type: _Optional[str] = ..., data: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "step", "total_steps", "fraction", "eta", "preview")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    ETA_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    step: int
    total_steps: int
    fraction: float
    eta: _duration_pb2.Duration
    preview: Preview
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., fraction: _Optional[float] = ..., eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ...) -> None: ...

class PhaseTiming(_message.Message):
    __slots__ = ("phase", "duration")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    phase: str
    duration: _duration_pb2.Duration
    def __init__(self, phase: _Optional[str] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Provenance(_message.Message):
    __slots__ = ("provider", "model_id", "model_revision", "device", "dtype", "library_versions", "reproducibility")
    class LibraryVersionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    REPRODUCIBILITY_FIELD_NUMBER: _ClassVar[int]
    provider: str
    model_id: str
    model_revision: str
    device: str
    dtype: str
    library_versions: _containers.ScalarMap[str, str]
    reproducibility: Reproducibility
    def __init__(self, provider: _Optional[str] = ..., model_id: _Optional[str] = ..., model_revision: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., library_versions: _Optional[_Mapping[str, str]] = ..., reproducibility: _Optional[_Union[Reproducibility, str]] = ...) -> None: ...
