"""No server paths in what clients read: messages cut down to the names in them.

Errors are often built from exceptions ("no file named model_index.json in /srv/models/sd"),
and those reach clients as GetInfo's `readiness_reason`, a job's error, or a call's status.
The folders of the server (model folder, storage root, home) are nobody else's business, so
every absolute path is cut to its last part before it leaves: the name still says which model
or file is meant.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from google.rpc import status_pb2

#: An absolute path of two or more parts, or a file:// URI, inside a message. Not preceded by a
#: word character, `:` or `/`, so URLs (`http://host/v1/...`) and relative paths stay as they are.
_ABSOLUTE_PATH = re.compile(r"(?:\bfile://|(?<![\w:/.~-]))(/[^\s/'\"(),;:]+(?:/[^\s/'\"(),;:]*)+)")


def without_paths(text: str) -> str:
    """`text` with every absolute path (and file:// URI) in it cut to its last part."""
    return _ABSOLUTE_PATH.sub(lambda match: PurePosixPath(match.group(1).rstrip("/")).name or "/", text)


def public_status(status: status_pb2.Status) -> status_pb2.Status:
    """`status`, or a copy whose message names no server path (the original is left alone)."""
    message = without_paths(status.message)
    if message == status.message:
        return status
    public = status_pb2.Status()
    public.CopyFrom(status)
    public.message = message
    return public
