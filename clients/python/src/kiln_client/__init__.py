"""Kiln's Python client. The generated contracts live in the `kiln` package beside it.

Blocking clients: `Img2ImgClient`, `MeshClient`; asyncio: `AsyncImg2ImgClient`, `AsyncMeshClient`.
Each runs jobs (``generate``, resumed by itself when its stream breaks) and reaches them by id
(``get_job``, ``watch_job``, ``cancel_job``, ``list_jobs``). Every failure is a `KilnError`
subclass named for its gRPC status code. The command line is `kiln` (`kiln_client.cli`).
"""

from kiln_client._base import DEFAULT_MAX_MESSAGE_BYTES, AsyncServiceClient, ServiceClient
from kiln_client._img2img import AsyncImg2ImgClient, Img2ImgClient, Img2ImgOptions, Img2ImgResult
from kiln_client._jobs import AsyncJobsClient, JobPage, JobsClient
from kiln_client._mesh import AsyncMeshClient, MeshClient, MeshOptions, MeshResult
from kiln_client._resume import RESUME_WINDOW_S
from kiln_client._session import SESSION_HEADER, JobSessions
from kiln_client.errors import (
    CancelledError,
    ChecksumError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    KilnError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "RESUME_WINDOW_S",
    "SESSION_HEADER",
    "AsyncImg2ImgClient",
    "AsyncJobsClient",
    "AsyncMeshClient",
    "AsyncServiceClient",
    "CancelledError",
    "ChecksumError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "Img2ImgClient",
    "Img2ImgOptions",
    "Img2ImgResult",
    "InternalError",
    "InvalidArgumentError",
    "JobPage",
    "JobSessions",
    "JobsClient",
    "KilnError",
    "MeshClient",
    "MeshOptions",
    "MeshResult",
    "NotFoundError",
    "ResourceExhaustedError",
    "ServiceClient",
    "UnauthenticatedError",
    "UnavailableError",
    "__version__",
]
