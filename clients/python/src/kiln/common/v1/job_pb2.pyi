import datetime

from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.rpc import status_pb2 as _status_pb2
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
    ERROR_REASON_REPLICA_LOST: _ClassVar[ErrorReason]
    ERROR_REASON_QUOTA: _ClassVar[ErrorReason]
    ERROR_REASON_LINK_NOT_VALID: _ClassVar[ErrorReason]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class DisconnectPolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DISCONNECT_POLICY_UNSPECIFIED: _ClassVar[DisconnectPolicy]
    DISCONNECT_POLICY_WAIT_FOR_WATCHER: _ClassVar[DisconnectPolicy]
    DISCONNECT_POLICY_CANCEL: _ClassVar[DisconnectPolicy]
    DISCONNECT_POLICY_DETACH: _ClassVar[DisconnectPolicy]
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
ERROR_REASON_REPLICA_LOST: ErrorReason
ERROR_REASON_QUOTA: ErrorReason
ERROR_REASON_LINK_NOT_VALID: ErrorReason
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
DISCONNECT_POLICY_UNSPECIFIED: DisconnectPolicy
DISCONNECT_POLICY_WAIT_FOR_WATCHER: DisconnectPolicy
DISCONNECT_POLICY_CANCEL: DisconnectPolicy
DISCONNECT_POLICY_DETACH: DisconnectPolicy

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

class JobStatus(_message.Message):
    __slots__ = ("job_id", "state", "queue_position", "queue_eta", "progress", "create_time", "start_time", "end_time", "expire_time", "error", "client_request_id", "last_sequence", "watchers", "disconnect_policy", "owner")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    QUEUE_ETA_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CLIENT_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    WATCHERS_FIELD_NUMBER: _ClassVar[int]
    DISCONNECT_POLICY_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    queue_position: int
    queue_eta: _duration_pb2.Duration
    progress: Progress
    create_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    expire_time: _timestamp_pb2.Timestamp
    error: _status_pb2.Status
    client_request_id: str
    last_sequence: int
    watchers: int
    disconnect_policy: DisconnectPolicy
    owner: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., queue_position: _Optional[int] = ..., queue_eta: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ..., client_request_id: _Optional[str] = ..., last_sequence: _Optional[int] = ..., watchers: _Optional[int] = ..., disconnect_policy: _Optional[_Union[DisconnectPolicy, str]] = ..., owner: _Optional[str] = ...) -> None: ...
