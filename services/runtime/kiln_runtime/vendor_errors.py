"""Outcomes of a vendor API call that are not Kiln's fault, as domain errors.

Vendor providers (Gemini for img2img today, a hosted mesh API later) raise these so that a
client sees the same `ErrorInfo` reason whichever vendor is behind the model. Each one
carries the vendor's own raw reason in its `ErrorInfo` metadata (built by
`vendor_metadata`), because "blocked" from Kiln is only actionable next to the vendor's
`SAFETY` or `IMAGE_PROHIBITED_CONTENT`.

Status codes follow what the *caller* can do about the outcome:
- FAILED_PRECONDITION for content outcomes: retrying the same request gets the same answer;
  the caller must change the prompt or the input first.
- UNAVAILABLE for a vendor outage or timeout: the same request may succeed later, and gRPC
  clients treat UNAVAILABLE as safe to retry.
- RESOURCE_EXHAUSTED (via `Overloaded`, so `RetryInfo` is attached) for quota exhaustion.
- INTERNAL for the server's own credentials being rejected: see `VendorAuth`.
"""

from __future__ import annotations

import grpc

from kiln_runtime.errors import KilnError, Overloaded


def vendor_metadata(
    vendor: str,
    *,
    vendor_reason: str = "",
    http_status: int | None = None,
    **extra: str,
) -> dict[str, str]:
    """`ErrorInfo` metadata naming the vendor and its raw verdict; empty values are left out.

    Args:
        vendor: Short vendor name, e.g. "gemini".
        vendor_reason: The vendor's own reason (blockReason, finishReason, error.status or
            its ErrorInfo reason), so a person can look it up in the vendor's docs.
        http_status: The HTTP status of the vendor's answer (200 for in-band refusals).
        **extra: Further vendor-specific keys (string values, as ErrorInfo requires).

    Returns:
        The metadata dict for `KilnError(metadata=...)`.
    """
    metadata = {"vendor": vendor, "vendor_reason": vendor_reason, **extra}
    if http_status is not None:
        metadata["http_status"] = str(http_status)
    return {key: value for key, value in metadata.items() if value}


class ContentBlockedInput(KilnError):
    """The vendor's safety filter refused the request (prompt or input image) itself."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "CONTENT_BLOCKED_INPUT"


class ContentBlockedOutput(KilnError):
    """The vendor generated a result but withheld it (safety, recitation, ...)."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "CONTENT_BLOCKED_OUTPUT"


class NoImageProduced(KilnError):
    """The vendor answered normally but without an image (a silent refusal, or text only).

    FAILED_PRECONDITION rather than UNAVAILABLE or ABORTED: the vendor is up and the call
    succeeded; in practice the same prompt keeps producing no image (the model treats it as
    a question, or quietly declines it), so the caller should rephrase, not blindly retry.
    """

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "NO_IMAGE_PRODUCED"


class VendorUnavailable(KilnError):
    """The vendor could not be reached, failed (5xx) or did not answer in time."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "VENDOR_UNAVAILABLE"


class VendorAuth(KilnError):
    """The vendor rejected the *server's* configured credentials.

    Not UNAUTHENTICATED: that code tells the caller that *its* credentials are wrong, and it
    would send them looking at their own token. Not FAILED_PRECONDITION: that promises the
    caller can fix the state and retry. The caller can do nothing here; an operator must
    fix the server's configuration, so this is a server fault: INTERNAL (it also lands in
    the same alerts as other server faults). The message never includes the key.
    """

    code = grpc.StatusCode.INTERNAL
    reason = "VENDOR_AUTH"


class VendorQuota(Overloaded):
    """The vendor's quota or rate limit is exhausted; `RetryInfo` carries the vendor's delay.

    A subclass of `Overloaded` so that it is RESOURCE_EXHAUSTED with `RetryInfo` exactly as
    Kiln's own capacity refusals, only with reason VENDOR_QUOTA: clients that back off on
    CAPACITY back off here too, and the reason tells an operator where the limit is. Unlike
    CAPACITY it is not marked retriable: every replica calls the vendor with the same key, so
    Envoy's retry on another replica would only spend more of the same quota.
    """

    reason = "VENDOR_QUOTA"
    retriable = False
