"""Kiln's Python client. The generated contracts live in the `kiln` package beside it."""

from kiln_client._img2img import Img2ImgClient, Img2ImgResult
from kiln_client._mesh import MeshClient, MeshResult
from kiln_client.errors import (
    ChecksumError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    KilnError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)

__version__ = "0.1.0"

__all__ = [
    "ChecksumError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "Img2ImgClient",
    "Img2ImgResult",
    "InternalError",
    "InvalidArgumentError",
    "KilnError",
    "MeshClient",
    "MeshResult",
    "NotFoundError",
    "ResourceExhaustedError",
    "UnavailableError",
    "__version__",
]
