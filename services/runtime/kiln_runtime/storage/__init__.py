"""Artifact storage: where job outputs are written and how clients reach them."""

from kiln_runtime.storage.backends import open_store
from kiln_runtime.storage.base import (
    JOB_CANCEL_NAME,
    JOB_FILES,
    JOB_RECORD_NAME,
    ArtifactNotFound,
    ArtifactStore,
    InvalidArtifactId,
    StoredArtifact,
    new_job_id,
    validate_artifact_id,
    validate_artifact_name,
    validate_job_id,
)
from kiln_runtime.storage.local import LocalArtifactStore

__all__ = [
    "JOB_CANCEL_NAME",
    "JOB_FILES",
    "JOB_RECORD_NAME",
    "ArtifactNotFound",
    "ArtifactStore",
    "InvalidArtifactId",
    "LocalArtifactStore",
    "StoredArtifact",
    "new_job_id",
    "open_store",
    "validate_artifact_id",
    "validate_artifact_name",
    "validate_job_id",
]
