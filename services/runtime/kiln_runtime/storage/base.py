"""The artifact store interface, and the id rules every backend shares.

Ids arrive from clients (artifact ids) and become path components, so the rules are strict
allow-lists: anything not matching them is refused before it reaches a filesystem or a bucket.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ulid import PureRandomPolicy, ULIDGenerator

# A ULID's canonical spelling: 26 upper-case Crockford base-32 digits (no I, L, O, U), the
# first at most 7 because the value has 128 bits. python-ulid's parser also takes lower case,
# which would give one job two folder names, so the path rule stays this allow-list.
_JOB_ID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Z]{25}")
# Fresh randomness for every id, as ULIDs had before the library: its default generator counts
# up within a millisecond, which would make a job's id tell the next one's.
_JOB_IDS = ULIDGenerator(policy=PureRandomPolicy())
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: The job's own record (kiln_runtime.job_api) beside its artifacts; not an artifact itself.
JOB_RECORD_NAME = "job.json"
#: A CancelJob that reached a replica not running the job, left for the one that does.
JOB_CANCEL_NAME = "cancel.json"
#: The job's own files: the artifact service never serves them.
JOB_FILES = frozenset({JOB_RECORD_NAME, JOB_CANCEL_NAME})


class InvalidArtifactId(ValueError):
    """A job id, artifact name or artifact id that could not be safely used as a storage key."""


class ArtifactNotFound(LookupError):
    """The artifact was never committed, or has been deleted or cleaned up."""


def new_job_id() -> str:
    """A fresh ULID (48-bit millisecond time, 80 random bits), so job folders list in creation order."""
    return str(_JOB_IDS.generate())


def validate_job_id(job_id: str) -> str:
    """Return `job_id` unchanged if it is a well-formed job id; a job id is a directory name."""
    if not (isinstance(job_id, str) and _JOB_ID.fullmatch(job_id)):
        raise InvalidArtifactId(f"invalid job id {job_id!r}")
    return job_id


def validate_artifact_name(name: str) -> str:
    """Return `name` unchanged if it can be a file name inside a job folder on any backend."""
    # fullmatch (not `$`) so a trailing newline cannot slip through; ".." is refused even
    # mid-name so no backend ever has to reason about it.
    if not (isinstance(name, str) and _NAME.fullmatch(name)) or ".." in name:
        raise InvalidArtifactId(f"invalid artifact name {name!r}")
    return name


def validate_artifact_id(artifact_id: str) -> tuple[str, str]:
    """Split a client-supplied `<job_id>/<name>` into its parts, refusing anything else."""
    if not isinstance(artifact_id, str) or artifact_id.count("/") != 1:
        raise InvalidArtifactId(f"invalid artifact id {artifact_id!r}")
    job_id, name = artifact_id.split("/")
    try:
        return validate_job_id(job_id), validate_artifact_name(name)
    except InvalidArtifactId:
        raise InvalidArtifactId(f"invalid artifact id {artifact_id!r}") from None


@dataclass(frozen=True)
class StoredArtifact:
    """What a store knows about a committed artifact; enough to describe it without reading it."""

    id: str
    job_id: str
    name: str
    media_type: str
    size_bytes: int
    sha256: str  # lowercase hex
    uri: str
    created_at: float  # unix seconds
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def describe(
        cls, artifact_id: str, data: bytes, *, media_type: str, uri: str, metadata: Mapping[str, str] | None = None
    ) -> StoredArtifact:
        """A new artifact's description, computed from its bytes (`artifact_id` already validated)."""
        job_id, name = artifact_id.split("/")
        return cls(
            id=artifact_id,
            job_id=job_id,
            name=name,
            media_type=media_type,
            size_bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            uri=uri,
            created_at=time.time(),
            metadata=dict(metadata or {}),
        )

    def commit_record(self) -> bytes:
        """The metadata every backend writes last, as the marker that the artifact is complete."""
        record = {
            "id": self.id,
            "media_type": self.media_type,
            "size_bytes": self.size_bytes,
            "sha256": self.sha256,
            "created_at": self.created_at,
            "metadata": self.metadata,
        }
        return json.dumps(record, sort_keys=True).encode()

    @classmethod
    def from_record(cls, artifact_id: str, record: Mapping[str, Any], *, uri: str) -> StoredArtifact:
        """The description of a committed artifact, read back from its `commit_record`."""
        job_id, name = artifact_id.split("/")
        return cls(
            id=artifact_id,
            job_id=job_id,
            name=name,
            media_type=str(record["media_type"]),
            size_bytes=int(record["size_bytes"]),
            sha256=str(record["sha256"]),
            uri=uri,
            created_at=float(record["created_at"]),
            metadata={str(k): str(v) for k, v in record["metadata"].items()},
        )


@runtime_checkable
class ArtifactStore(Protocol):
    """Where job outputs live, so servers need not know whether that is a disk or a bucket."""

    def put(
        self, job_id: str, name: str, data: bytes, *, media_type: str, metadata: Mapping[str, str] | None = None
    ) -> StoredArtifact:
        """Store `data` as `<job_id>/<name>` all-or-nothing, replacing any earlier version."""
        ...

    def get(self, artifact_id: str) -> StoredArtifact:
        """Describe a committed artifact; raises ArtifactNotFound if there is none."""
        ...

    def read(self, artifact_id: str) -> bytes:
        """The artifact's bytes; raises ArtifactNotFound if there is none."""
        ...

    def chunks(self, artifact_id: str, *, chunk_bytes: int, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """The bytes `[start, stop)` of a committed artifact in pieces of at most `chunk_bytes`.

        For streaming large artifacts without holding them whole. `stop` None means the end;
        raises ArtifactNotFound (at the first `next`) if there is no such artifact.
        """
        ...

    def delete_job(self, job_id: str) -> None:
        """Remove every artifact of a job; deleting a job that has none is not an error."""
        ...

    def job_ids(self) -> list[str]:
        """The ids of the jobs that have anything stored, in no particular order (ListJobs)."""
        ...

    def cleanup(self, older_than_s: float, *, now: float | None = None) -> int:
        """Remove jobs untouched for `older_than_s` and stale partial writes; returns jobs removed."""
        ...

    def uri_for(self, artifact_id: str) -> str:
        """The URI a client can fetch the artifact from."""
        ...
