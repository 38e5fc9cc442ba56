"""Getting an artifact's bytes from where the server put them, and writing them safely.

Downloads stream: pieces from ``ArtifactProvider.DownloadArtifact`` (or an http(s) URI) go
straight into a temporary file beside the destination while a SHA-256 runs over them, so a
100 MB mesh costs the client a few pieces of memory, not 100 MB. The file is renamed into place
only once size and hash match.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Self
from urllib.parse import urlparse
from urllib.request import url2pathname

import grpc

from kiln.common.v1 import artifact_pb2
from kiln_client._stream import verify
from kiln_client.errors import ChecksumError, KilnError, NotFoundError, UnavailableError

__all__ = [
    "READ_BYTES",
    "ArtifactFile",
    "http_pieces",
    "local_bytes",
    "local_path",
    "should_try_uri",
    "verify",
    "write_atomically",
]

#: Bytes per read from a local file or an HTTP response: the size of the server's pieces.
READ_BYTES = 256 * 1024

#: GetArtifact failures after which a public http(s) URI is still worth a try: the server has no
#: artifact service or not this artifact (another replica wrote it to storage it does not share).
_TRY_URI_AFTER = frozenset({grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED})


def local_path(artifact: artifact_pb2.Artifact) -> Path | None:
    """The file of a ``file://`` URI when it exists on this machine; else None."""
    uri = urlparse(artifact.uri)
    if uri.scheme == "file":
        path = Path(url2pathname(uri.path))
        if path.is_file():
            return path
    return None


def local_bytes(artifact: artifact_pb2.Artifact) -> bytes | None:
    """Inline bytes, or a ``file://`` URI that exists on this machine; else None."""
    if artifact.inline_data:
        return artifact.inline_data
    path = local_path(artifact)
    return path.read_bytes() if path is not None else None


def should_try_uri(error: KilnError, artifact: artifact_pb2.Artifact) -> bool:
    """Whether, after the server could not serve ``artifact``, its http(s) URI may still have it."""
    return error.code in _TRY_URI_AFTER and urlparse(artifact.uri).scheme in ("http", "https")


def http_pieces(artifact: artifact_pb2.Artifact, timeout: float | None) -> Iterator[bytes]:
    """GET the artifact's http(s) URI, yielding its body in pieces of at most `READ_BYTES`."""
    try:
        with urllib.request.urlopen(artifact.uri, timeout=timeout) as response:
            while piece := response.read(READ_BYTES):
                yield piece
    except urllib.error.HTTPError as http_error:
        if http_error.code == 404:
            raise NotFoundError(f"artifact {artifact.id} not found at {artifact.uri}") from http_error
        raise UnavailableError(f"GET {artifact.uri}: HTTP {http_error.code}") from http_error
    except OSError as os_error:
        raise UnavailableError(f"GET {artifact.uri}: {os_error}") from os_error


class ArtifactFile:
    """A download in progress: a temporary file beside ``path``, hashed as it is written.

    Use as a context manager: `commit` verifies size and SHA-256 and renames the file into
    place; leaving the block without a commit (an error, a bad checksum) removes it, so a
    reader sees the old file or the complete new one, never a partial write.
    """

    def __init__(self, path: Path, artifact: artifact_pb2.Artifact) -> None:
        self.path = path
        self.artifact = artifact
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        self._temporary = Path(temporary)
        self._file: IO[bytes] = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, piece: bytes) -> None:
        """Append ``piece`` to the file and the running hash."""
        self._file.write(piece)
        self._hash.update(piece)
        self.size += len(piece)

    def copy_from(self, source: Path) -> None:
        """Append a local file's bytes, a piece at a time."""
        with source.open("rb") as file:
            while piece := file.read(READ_BYTES):
                self.write(piece)

    def commit(self) -> Path:
        """Check size and SHA-256, then move the file into place.

        Raises:
            ChecksumError: The bytes are not the artifact's.
        """
        digest = self._hash.hexdigest()
        expected_size = self.artifact.size_bytes
        if digest != self.artifact.sha256.lower() or (expected_size and self.size != expected_size):
            raise ChecksumError(
                f"artifact {self.artifact.id}: got {self.size} bytes with sha256 {digest}, "
                f"expected {expected_size} bytes with sha256 {self.artifact.sha256}"
            )
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._temporary, self.path)
        return self.path

    def discard(self) -> None:
        """Remove the temporary file (nothing happens after a commit)."""
        self._file.close()
        self._temporary.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.discard()


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
