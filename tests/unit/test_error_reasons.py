"""Every ErrorInfo reason a server can send is a value of `kiln.common.v1.ErrorReason`, so clients
and the page can switch on the enum the API documents."""

from __future__ import annotations

import pytest

import kiln_runtime.artifact_servicer
import kiln_runtime.errors
import kiln_runtime.storage.s3
import kiln_runtime.vendor_errors  # noqa: F401  (imported for their KilnError subclasses)
from kiln.common.v1 import job_pb2
from kiln_runtime.errors import KilnError


def subclasses(cls: type[KilnError]) -> list[type[KilnError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *subclasses(sub)]
    return found


ERRORS = subclasses(KilnError)


def test_the_error_classes_are_found() -> None:
    names = {cls.__name__ for cls in ERRORS}
    assert {"Overloaded", "StorageFull", "StorageUnavailable", "RangeNotSatisfiable", "VendorQuota"} <= names


@pytest.mark.parametrize("error", ERRORS, ids=lambda cls: cls.__name__)
def test_reason_is_in_the_proto_enum(error: type[KilnError]) -> None:
    assert f"ERROR_REASON_{error.reason}" in set(job_pb2.ErrorReason.keys())
