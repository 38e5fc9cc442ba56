from google.api import field_behavior_pb2 as _field_behavior_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class ArtifactDelivery(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARTIFACT_DELIVERY_UNSPECIFIED: _ClassVar[ArtifactDelivery]
    ARTIFACT_DELIVERY_INLINE: _ClassVar[ArtifactDelivery]
    ARTIFACT_DELIVERY_CHUNKED: _ClassVar[ArtifactDelivery]
    ARTIFACT_DELIVERY_REFERENCE: _ClassVar[ArtifactDelivery]
ARTIFACT_DELIVERY_UNSPECIFIED: ArtifactDelivery
ARTIFACT_DELIVERY_INLINE: ArtifactDelivery
ARTIFACT_DELIVERY_CHUNKED: ArtifactDelivery
ARTIFACT_DELIVERY_REFERENCE: ArtifactDelivery

class Artifact(_message.Message):
    __slots__ = ("id", "media_type", "size_bytes", "sha256", "inline_data", "uri", "chunk_count")
    ID_FIELD_NUMBER: _ClassVar[int]
    MEDIA_TYPE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INLINE_DATA_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    id: str
    media_type: str
    size_bytes: int
    sha256: str
    inline_data: bytes
    uri: str
    chunk_count: int
    def __init__(self, id: _Optional[str] = ..., media_type: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., inline_data: _Optional[bytes] = ..., uri: _Optional[str] = ..., chunk_count: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("artifact_id", "offset", "data", "last")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    offset: int
    data: bytes
    last: bool
    def __init__(self, artifact_id: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...
