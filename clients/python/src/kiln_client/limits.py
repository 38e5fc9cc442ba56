"""Request size caps, all derived from one number: the largest input image a server accepts.

The servers' `limits.max_image_bytes` (GetInfo's `limits.max_image_bytes`, default
`DEFAULT_MAX_IMAGE_BYTES`) is the only size a person sets. Every cap on the way to it is
computed here, by the servers (gRPC receive cap), this client (gRPC send cap) and the gateway
(Envoy's JSON body and retry buffer limits), so none of them can drift from the others.

The caps sit well *above* the image limit on purpose: an image somewhat over the limit must
reach the server, which refuses it with INVALID_ARGUMENT naming `image` and the limit. A
transport cap right at the limit would instead answer gRPC's own RESOURCE_EXHAUSTED
("message larger than max"), the code of a full queue, which clients and gateways retry.
"""

from __future__ import annotations

import math

MiB = 1 << 20

DEFAULT_MAX_IMAGE_BYTES = 20 * MiB
"""The servers' default `limits.max_image_bytes`."""

REQUEST_FIELDS_BYTES = 1 * MiB
"""Room for everything in a request besides the image (prompt, negative prompt, options)."""


def max_request_message_bytes(max_image_bytes: int) -> int:
    """The gRPC message cap for requests: twice the image limit plus the other fields.

    Up to twice the limit a too-large image gets the server's own INVALID_ARGUMENT; the
    server holds at most this much per call while it reads a request.
    """
    return 2 * max_image_bytes + REQUEST_FIELDS_BYTES


def max_json_request_bytes(max_image_bytes: int) -> int:
    """The JSON body cap: the gRPC request cap with the image in base64 (4 bytes per 3)."""
    return math.ceil(max_request_message_bytes(max_image_bytes) * 4 / 3)


def retry_buffer_bytes(max_image_bytes: int) -> int:
    """What a gateway buffers per request to be able to retry it: any request within the limit."""
    return max_image_bytes + REQUEST_FIELDS_BYTES
