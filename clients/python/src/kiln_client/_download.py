"""Getting an artifact's bytes from where the server put them, and writing them safely."""

from __future__ import annotations

import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import grpc

from kiln.common.v1 import artifact_pb2
from kiln_client._stream import verify
from kiln_client.errors import KilnError, NotFoundError, UnavailableError

__all__ = ["http_bytes_after", "local_bytes", "verify", "write_atomically"]

#: GetArtifact failures after which a public http(s) URI is still worth a try: the server has no
#: artifact service or not this artifact (another replica wrote it to storage it does not share).
_TRY_URI_AFTER = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED})


def local_bytes(artifact: artifact_pb2.Artifact) -> bytes | None:
    """Inline bytes, or a ``file://`` URI that exists on this machine; else None."""
    if artifact.inline_data:
        return artifact.inline_data
    uri = urlparse(artifact.uri)
    if uri.scheme == "file":
        path = Path(url2pathname(uri.path))
        if path.is_file():
            return path.read_bytes()
    return None


def http_bytes_after(error: KilnError, artifact: artifact_pb2.Artifact, timeout: float | None) -> bytes:
    """GET the artifact's http(s) URI when GetArtifact could not serve it; else re-raise ``error``."""
    if error.code not in _TRY_URI_AFTER or urlparse(artifact.uri).scheme not in ("http", "https"):
        raise error
    try:
        with urllib.request.urlopen(artifact.uri, timeout=timeout) as response:
            data: bytes = response.read()
            return data
    except urllib.error.HTTPError as http_error:
        if http_error.code == 404:
            raise NotFoundError(f"artifact {artifact.id} not found at {artifact.uri}") from http_error
        raise UnavailableError(f"GET {artifact.uri}: HTTP {http_error.code}") from http_error
    except OSError as os_error:
        raise UnavailableError(f"GET {artifact.uri}: {os_error}") from os_error


def write_atomically(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder.

    A reader sees the old file or the complete new one, never a partial write, and an
    interrupted download leaves nothing behind.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
