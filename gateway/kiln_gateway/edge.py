"""Rate limits and hardening of the public listener.

Rate limit: Envoy's local rate limit filter, one token bucket per principal (the
`x-kiln-principal` header the auth filters set before this one runs), shared by all Envoy
workers. A call without a principal (auth mode `none`, or an anonymous call where anonymous
access is allowed) gets a bucket per client address instead: one bucket for every anonymous
caller would let a single client starve all the others, which is what the limit is for. Behind
a proxy that address is the proxy's unless `hardening.xff_num_trusted_hops` says how many
X-Forwarded-For entries to trust. In mode `none` the principal header is ignored altogether, so
a client cannot mint itself fresh buckets by sending made-up names.

A limited call gets HTTP 429 with `retry-after` (JSON), or RESOURCE_EXHAUSTED (gRPC, gRPC-Web)
with a `google.rpc.Status` in `grpc-status-details-bin` that carries ErrorInfo `RATE_LIMITED`
and a RetryInfo: the same details a server's own refusal carries, so `kiln_client` reports
`retry_delay_s`. The limit is enforced before any upstream is picked, and the retry policy
(render.RETRY_ON) has no 4xx condition, so a limited call is never retried by the gateway.
"""

from __future__ import annotations

import base64
import math
from typing import Any
from urllib.parse import quote

from google.protobuf import duration_pb2, json_format
from google.rpc import code_pb2, error_details_pb2, status_pb2

from kiln_runtime.principal import PRINCIPAL_HEADER

from .envoy_types import typed
from .settings import GatewaySettings

RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
_RATE_LIMIT_TYPE = "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit"
RATE_LIMIT_STAT_PREFIX = "kiln_rate_limit"
RATE_LIMITED_REASON = "RATE_LIMITED"
RATE_LIMITED_DOMAIN = "gateway.kiln.dev"
#: The status message of a rate-limited call on every protocol.
RATE_LIMITED_MESSAGE = "rate limit exceeded"
#: Descriptor keys: the authenticated principal, or the marker and address of a call without one.
PRINCIPAL_KEY = "principal"
ANONYMOUS_KEY = "anonymous"
ADDRESS_KEY = "remote_address"

_ALWAYS = {"default_value": {"numerator": 100, "denominator": "HUNDRED"}}
_OVERWRITE = "OVERWRITE_IF_EXISTS_OR_ADD"

FIXED_HEAP = "envoy.resource_monitors.fixed_heap"
MAX_CONNECTIONS = "envoy.resource_monitors.global_downstream_max_connections"
#: Heap use (of `max_heap_bytes`) at which Envoy returns freed memory to the system, and at
#: which it answers new requests with 503 rather than growing further.
SHRINK_HEAP_AT = 0.95
STOP_REQUESTS_AT = 0.98


#: Envoy refuses a token bucket refilled more often than this.
MIN_FILL_INTERVAL_S = 0.05


def _fill(settings: GatewaySettings) -> tuple[int, float]:
    """(tokens per refill, refill interval in seconds) for the configured rate.

    One token every 1/rate seconds where Envoy allows it (a steady rate, never a batch of
    refills at once); above 20 per second, the fewest tokens per refill that keep the interval
    at Envoy's 50 ms minimum. The interval is kept to the millisecond.
    """
    rate = settings.rate_limit.requests_per_s
    tokens = max(1, math.ceil(rate * MIN_FILL_INTERVAL_S))
    return tokens, round(tokens / rate, 3) or 0.001


def retry_after_s(settings: GatewaySettings) -> float:
    """Seconds until a principal that emptied its bucket gets tokens again (one refill interval)."""
    return _fill(settings)[1]


def rate_limited_status(settings: GatewaySettings) -> status_pb2.Status:
    """The `google.rpc.Status` a rate-limited gRPC call receives in `grpc-status-details-bin`."""
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(retry_after_s(settings) * 1e9))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=RATE_LIMITED_MESSAGE)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(
            reason=RATE_LIMITED_REASON,
            domain=RATE_LIMITED_DOMAIN,
            metadata={
                "requests_per_s": f"{settings.rate_limit.requests_per_s:g}",
                "burst": str(settings.rate_limit.burst),
            },
        )
    )
    status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def _percent(text: str) -> str:
    """A literal header value: Envoy reads `%` in added headers as the start of a command."""
    return text.replace("%", "%%")


def _token_bucket(settings: GatewaySettings) -> dict[str, Any]:
    tokens, interval_s = _fill(settings)
    return {
        # A bucket smaller than one refill would throw tokens away.
        "max_tokens": max(settings.rate_limit.burst, tokens),
        "tokens_per_fill": tokens,
        "fill_interval": f"{interval_s:.3f}s",
    }


def _rate_limits(settings: GatewaySettings) -> list[dict[str, Any]]:
    """The descriptor each request produces: its principal, or its client address."""
    address: dict[str, Any] = {"remote_address": {}}
    if settings.auth.mode == "none":
        return [{"actions": [{"generic_key": {"descriptor_key": ANONYMOUS_KEY, "descriptor_value": "true"}}, address]}]
    # The marker entry exists only when no principal does: a principal's call never also counts
    # against its address (many users behind one NAT), and an anonymous one never against a principal.
    no_principal = {
        "header_value_match": {
            "descriptor_key": ANONYMOUS_KEY,
            "descriptor_value": "true",
            "expect_match": False,
            "headers": [{"name": PRINCIPAL_HEADER, "present_match": True}],
        }
    }
    principal = {"request_headers": {"header_name": PRINCIPAL_HEADER, "descriptor_key": PRINCIPAL_KEY}}
    return [{"actions": [principal]}, {"actions": [no_principal, address]}]


def _rate_limit_config(settings: GatewaySettings) -> dict[str, Any]:
    bucket = _token_bucket(settings)
    retry_after = str(max(1, math.ceil(retry_after_s(settings))))
    details = base64.b64encode(rate_limited_status(settings).SerializeToString(deterministic=True)).decode()
    return {
        **typed(_RATE_LIMIT_TYPE),
        "stat_prefix": RATE_LIMIT_STAT_PREFIX,
        # Used only by a request that matches no descriptor, which the rules below never produce.
        "token_bucket": bucket,
        "filter_enabled": _ALWAYS,
        "filter_enforced": _ALWAYS,
        "always_consume_default_token_bucket": False,
        # gRPC callers see RESOURCE_EXHAUSTED (retry later), not UNAVAILABLE (the HTTP 429 mapping).
        "rate_limited_as_resource_exhausted": True,
        # An empty descriptor value is a wildcard: each distinct principal or address gets its own
        # bucket, up to this many (least recently used evicted).
        "max_dynamic_descriptors": settings.rate_limit.max_principals,
        "rate_limits": _rate_limits(settings),
        "descriptors": [
            {"entries": [{"key": PRINCIPAL_KEY}], "token_bucket": bucket},
            {"entries": [{"key": ANONYMOUS_KEY, "value": "true"}, {"key": ADDRESS_KEY}], "token_bucket": bucket},
        ],
        # Only on limited responses. A gRPC refusal is trailers-only, so these headers reach a gRPC
        # client as trailers, where grpc-status-details-bin belongs.
        "response_headers_to_add": [
            {"header": {"key": "retry-after", "value": retry_after}, "append_action": _OVERWRITE},
            {"header": {"key": "grpc-status-details-bin", "value": details}, "append_action": _OVERWRITE},
            # With `_grpc_reply_mapper`, a gRPC or gRPC-Web refusal is a trailers-only gRPC reply
            # that carries its status in these headers.
            {"header": {"key": "grpc-status", "value": str(code_pb2.RESOURCE_EXHAUSTED)}, "append_action": _OVERWRITE},
            {
                "header": {"key": "grpc-message", "value": _percent(quote(RATE_LIMITED_MESSAGE))},
                "append_action": _OVERWRITE,
            },
        ],
    }


#: Why Envoy refused a path (`path_with_escaped_slashes_action`), in words.
ESCAPED_SLASH_MESSAGE = (
    "the request path contains an encoded slash or backslash; no Kiln path needs one, so send the path "
    "with plain slashes (artifact ids and job ids never contain either)"
)


def _escaped_slash_mapper() -> dict[str, Any]:
    """Envoy's 400 for an encoded slash, as an INVALID_ARGUMENT Status a person can act on.

    Envoy's own reply has an empty message; the response's code details name the cause, which a
    CEL filter can read (no other local-reply filter can).
    """
    return {
        "filter": {
            "extension_filter": {
                "name": "envoy.access_loggers.extension_filters.cel",
                "typed_config": typed(
                    "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                    expression="response.code_details == 'path_normalization_failed'",
                ),
            }
        },
        "body_format_override": {"json_format": {"code": code_pb2.INVALID_ARGUMENT, "message": ESCAPED_SLASH_MESSAGE}},
    }


def _is_rate_limited(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    status = {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": 429, "runtime_key": "kiln_rate_limited"}}
        }
    }
    if extra is None:
        return status
    return {"and_filter": {"filters": [status, extra]}}


def local_reply_mappers(settings: GatewaySettings) -> list[dict[str, Any]]:
    """Envoy's own replies of the edge: a refused path, and a rate-limited call.

    They come before Envoy's generic JSON mapper in `render._local_reply_config`. A rate-limited
    gRPC or gRPC-Web call (whose request content-type the grpc_web filter has already made
    `application/grpc`) gets an empty HTTP 200 gRPC reply whose headers carry the status
    (`response_headers_to_add`). Left as HTTP 429, the grpc_web filter would turn it into
    UNAVAILABLE (its fixed HTTP-to-gRPC mapping), which browsers' clients report as such.
    A JSON call gets a `google.rpc.Status` body like the transcoder's errors, with ErrorInfo and
    RetryInfo.
    """
    if settings.rate_limit.requests_per_s <= 0:
        return [_escaped_slash_mapper()]
    grpc_request = {
        "header_filter": {"header": {"name": "content-type", "string_match": {"prefix": "application/grpc"}}}
    }
    status = rate_limited_status(settings)
    details = [dict(json_format.MessageToDict(detail)) for detail in status.details]
    return [
        _escaped_slash_mapper(),
        {
            "filter": _is_rate_limited(grpc_request),
            "status_code": 200,
            "body_format_override": {"text_format": "", "content_type": "application/grpc"},
        },
        {
            "filter": _is_rate_limited(),
            "body_format_override": {
                "json_format": {
                    "code": code_pb2.RESOURCE_EXHAUSTED,
                    "message": RATE_LIMITED_MESSAGE,
                    "details": details,
                }
            },
        },
    ]


def http_filters(settings: GatewaySettings) -> list[dict[str, Any]]:
    """Filters placed after the auth filters (the principal header is set) and before the transcoder."""
    if settings.rate_limit.requests_per_s <= 0:
        return []
    return [{"name": RATE_LIMIT_FILTER, "typed_config": _rate_limit_config(settings)}]


def _static_headers(settings: GatewaySettings) -> dict[str, str]:
    hardening = settings.hardening
    headers = {
        "content-security-policy": hardening.content_security_policy,
        "x-frame-options": "DENY",
        "referrer-policy": "no-referrer",
    }
    if settings.tls.downstream and hardening.hsts_max_age_s:
        headers["strict-transport-security"] = f"max-age={hardening.hsts_max_age_s}"
    return headers


def apply_to_routes(settings: GatewaySettings, routes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Security headers on the page's static files; the rate limit off for them."""
    limited = settings.rate_limit.requests_per_s > 0
    result = []
    for route in routes:
        if "direct_response" not in route:
            result.append(route)
            continue
        extra = [
            {"header": {"key": key, "value": value}, "append_action": _OVERWRITE}
            for key, value in _static_headers(settings).items()
        ]
        route = {**route, "response_headers_to_add": [*route.get("response_headers_to_add", []), *extra]}
        if limited:
            # A per-route config without filter_enabled turns the filter off on this route (Envoy
            # insists on a bucket all the same): the page loads even for a principal that used up
            # its requests.
            off = typed(
                _RATE_LIMIT_TYPE,
                stat_prefix=f"{RATE_LIMIT_STAT_PREFIX}_static",
                token_bucket=_token_bucket(settings),
            )
            route["typed_per_filter_config"] = {**route.get("typed_per_filter_config", {}), RATE_LIMIT_FILTER: off}
        result.append(route)
    return result


def connection_manager_fields(settings: GatewaySettings) -> dict[str, Any]:
    """Extra HttpConnectionManager fields (remote address, path normalisation, header limits)."""
    hardening = settings.hardening
    return {
        # The client address is the TCP peer (or the trusted hop's X-Forwarded-For entry), never a
        # header the client wrote: rate limits without a principal key on it.
        "use_remote_address": True,
        "xff_num_trusted_hops": hardening.xff_num_trusted_hops,
        # Routes match on the normalised path: `/v1/./img2img` or `//v1//img2img` cannot slip past a
        # prefix route and its per-route settings.
        "normalize_path": True,
        "merge_slashes": True,
        # An encoded slash (%2F) could make a path mean one thing to Envoy and another upstream;
        # no Kiln path contains one, so such a request is refused (400) rather than redirected,
        # which gRPC clients would not follow.
        "path_with_escaped_slashes_action": "REJECT_REQUEST",
        "max_request_headers_kb": hardening.max_request_headers_kb,
        "request_headers_timeout": f"{hardening.request_headers_timeout_s:g}s",
        "common_http_protocol_options": {
            "max_headers_count": hardening.max_headers_count,
            # `x_kiln_principal` must not pass as `x-kiln-principal` to a backend that folds `_`
            # into `-`. Dropped, not refused: gRPC allows `_` in metadata keys and no Kiln header
            # has one, so a client's stray header costs nothing.
            "headers_with_underscores_action": "DROP_HEADER",
        },
        "http2_protocol_options": {
            "max_concurrent_streams": hardening.max_concurrent_streams,
            # Envoy's 256 MiB defaults would let one client park that much upload data in memory.
            "initial_stream_window_size": hardening.initial_stream_window_bytes,
            "initial_connection_window_size": hardening.initial_connection_window_bytes,
        },
    }


def _trigger(monitor: str, value: float) -> list[dict[str, Any]]:
    return [{"name": monitor, "threshold": {"value": value}}]


def bootstrap_fields(settings: GatewaySettings) -> dict[str, Any]:
    """Extra bootstrap fields (the overload manager)."""
    hardening = settings.hardening
    monitors: list[dict[str, Any]] = [
        {
            "name": MAX_CONNECTIONS,
            "typed_config": typed(
                "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                max_active_downstream_connections=hardening.max_downstream_connections,
            ),
        }
    ]
    actions: list[dict[str, Any]] = []
    if hardening.max_heap_bytes:
        monitors.append(
            {
                "name": FIXED_HEAP,
                "typed_config": typed(
                    "envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    max_heap_size_bytes=hardening.max_heap_bytes,
                ),
            }
        )
        actions = [
            {"name": "envoy.overload_actions.shrink_heap", "triggers": _trigger(FIXED_HEAP, SHRINK_HEAP_AT)},
            {
                "name": "envoy.overload_actions.stop_accepting_requests",
                "triggers": _trigger(FIXED_HEAP, STOP_REQUESTS_AT),
            },
        ]
    return {"overload_manager": {"refresh_interval": "0.25s", "resource_monitors": monitors, "actions": actions}}
