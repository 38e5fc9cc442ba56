import datetime

from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Readiness(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    READINESS_UNSPECIFIED: _ClassVar[Readiness]
    READINESS_LOADING: _ClassVar[Readiness]
    READINESS_READY: _ClassVar[Readiness]
    READINESS_FAILED: _ClassVar[Readiness]
    READINESS_DRAINING: _ClassVar[Readiness]
READINESS_UNSPECIFIED: Readiness
READINESS_LOADING: Readiness
READINESS_READY: Readiness
READINESS_FAILED: Readiness
READINESS_DRAINING: Readiness

class ModelInfo(_message.Message):
    __slots__ = ("provider", "model_id", "model_revision", "device", "dtype", "readiness", "readiness_reason", "library_versions", "loaded", "last_load_duration", "last_load_time", "keep_alive")
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
    READINESS_FIELD_NUMBER: _ClassVar[int]
    READINESS_REASON_FIELD_NUMBER: _ClassVar[int]
    LIBRARY_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    LAST_LOAD_DURATION_FIELD_NUMBER: _ClassVar[int]
    LAST_LOAD_TIME_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_FIELD_NUMBER: _ClassVar[int]
    provider: str
    model_id: str
    model_revision: str
    device: str
    dtype: str
    readiness: Readiness
    readiness_reason: str
    library_versions: _containers.ScalarMap[str, str]
    loaded: bool
    last_load_duration: _duration_pb2.Duration
    last_load_time: _timestamp_pb2.Timestamp
    keep_alive: _duration_pb2.Duration
    def __init__(self, provider: _Optional[str] = ..., model_id: _Optional[str] = ..., model_revision: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., readiness: _Optional[_Union[Readiness, str]] = ..., readiness_reason: _Optional[str] = ..., library_versions: _Optional[_Mapping[str, str]] = ..., loaded: _Optional[bool] = ..., last_load_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., last_load_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., keep_alive: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_concurrency", "max_queue", "running", "queued", "max_image_bytes", "max_image_pixels", "max_message_bytes", "max_inline_artifact_bytes")
    MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_INLINE_ARTIFACT_BYTES_FIELD_NUMBER: _ClassVar[int]
    max_concurrency: int
    max_queue: int
    running: int
    queued: int
    max_image_bytes: int
    max_image_pixels: int
    max_message_bytes: int
    max_inline_artifact_bytes: int
    def __init__(self, max_concurrency: _Optional[int] = ..., max_queue: _Optional[int] = ..., running: _Optional[int] = ..., queued: _Optional[int] = ..., max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_inline_artifact_bytes: _Optional[int] = ...) -> None: ...

class FloatRange(_message.Message):
    __slots__ = ("min", "max", "min_exclusive", "default_value")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MIN_EXCLUSIVE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    min: float
    max: float
    min_exclusive: bool
    default_value: float
    def __init__(self, min: _Optional[float] = ..., max: _Optional[float] = ..., min_exclusive: _Optional[bool] = ..., default_value: _Optional[float] = ...) -> None: ...

class IntRange(_message.Message):
    __slots__ = ("min", "max", "default_value")
    MIN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    min: int
    max: int
    default_value: int
    def __init__(self, min: _Optional[int] = ..., max: _Optional[int] = ..., default_value: _Optional[int] = ...) -> None: ...
