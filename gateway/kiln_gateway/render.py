"""Render Envoy's bootstrap YAML from `GatewaySettings`.

The config is built as plain Python dicts and dumped with `yaml.safe_dump`: no template
escaping, lists of replicas and origins are ordinary loops, and every value comes from the
settings. Comments say in words the Envoy pitfall a setting exists for.

One listener serves native gRPC (h2c), gRPC-Web and JSON (HTTP/1.1 or h2) through the filter
chain health_check → CORS → stateful_session → grpc_web → grpc_json_transcoder → router; one
cluster per model service.

The same function renders the config baked into the gateway container image and its Kubernetes
ConfigMap (`container.py`): there the static files are named, not listed from this machine's disk.
"""

from __future__ import annotations

import mimetypes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from kiln_client.limits import max_json_request_bytes, retry_buffer_bytes
from kiln_runtime.errors import RETRIABLE_HEADER

from . import auth, edge, tls
from .envoy_types import typed as _typed
from .settings import PLACEHOLDER_WEB_ROOT, GatewaySettings


@dataclass(frozen=True)
class Service:
    """One model service behind the gateway."""

    cluster: str
    grpc_service: str
    rest_prefix: str


SERVICES = (
    Service("img2img", "kiln.img2img.v1.Img2ImgProvider", "/v1/img2img"),
    Service("mesh", "kiln.mesh.v1.MeshProvider", "/v1/mesh"),
)
#: Every model server hosts the artifact service over its storage; downloads go to the img2img
#: cluster, which serves the mesh server's artifacts too when both share the storage folder
#: (the default of `make up`; in a cluster, a shared volume or an object store).
ARTIFACTS = Service("img2img", "kiln.artifacts.v1.ArtifactProvider", "/v1/artifacts")
#: HTTP/2 receive windows Envoy grants each model server: what one response stream (a download)
#: may have in flight inside Envoy before the client reads it, and all streams of a connection
#: together. Several DownloadArtifact pieces, far below Envoy's 256 MiB default.
UPSTREAM_STREAM_WINDOW_BYTES = 1 << 20
UPSTREAM_CONNECTION_WINDOW_BYTES = 16 << 20

#: What Envoy retries (ARCHITECTURE.md, "Retries"): a refusal the server marks with the
#: `kiln-retriable` header (CAPACITY, SHUTTING_DOWN: no work done, another replica may take it),
#: and failures before the request reached a server (connect-failure, refused-stream,
#: reset-before-request). Not status codes: RESOURCE_EXHAUSTED also means STORAGE_FULL and gRPC's
#: "message larger than max", which no retry fixes. Never `reset`: it could run a job twice.
RETRY_ON = "connect-failure,refused-stream,reset-before-request,retriable-headers"
BUFFER_FILTER = "envoy.filters.http.buffer"
BUFFER_TYPE = "envoy.extensions.filters.http.buffer.v3.Buffer"
#: The header the servers set on refusals another replica may accept (kiln_runtime.errors).
RETRIABLE_HEADERS = [{"name": RETRIABLE_HEADER, "string_match": {"exact": "true"}}]
#: At least this many retries may always be in flight per cluster, whatever the budget says.
MIN_RETRY_CONCURRENCY = 3

#: The header that ties a job's later calls (GetJob, WatchJob, CancelJob) to the replica running it.
#: Envoy adds it to a response, naming the upstream that answered (base64 of its address), unless
#: the request already named that upstream; a request that carries it goes to that upstream.
#: Clients treat the value as opaque, keep the latest one per job, and send it with that job's
#: calls; the Python client has its own copy (`kiln_client.SESSION_HEADER`).
SESSION_HEADER = "x-kiln-session"
SESSION_FILTER = "envoy.filters.http.stateful_session"

#: Answered by Envoy itself on the public listener: 200 while it serves, 503 once it drains
#: (admin `POST /healthcheck/fail`). The admin listener stays on 127.0.0.1, so probes from
#: outside the process (a kubelet, Docker) use this path instead of admin `/ready`.
HEALTH_PATH = "/healthz"
#: The direct-response cap when the static files are named rather than read (a container render):
#: their sizes are unknown here, and Envoy refuses to load a file larger than the cap.
NAMED_STATIC_FILES_MAX_BYTES = 4 << 20


def _seconds(value: float) -> str:
    """Envoy Duration text; whole seconds stay integral for readable configs."""
    return f"{int(value)}s" if float(value).is_integer() else f"{value:.3f}s"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _cors_policy(settings: GatewaySettings) -> dict[str, Any]:
    return _typed(
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        allow_origin_string_match=[{"exact": origin} for origin in settings.cors_allowed_origins],
        allow_methods="GET, POST, OPTIONS",
        allow_headers=f"content-type,x-grpc-web,x-user-agent,grpc-timeout,authorization,x-request-id,{SESSION_HEADER}",
        # Browsers hide response headers unless exposed; gRPC-Web clients read these, and the page
        # keeps the session header of a job's Generate response to send it back with that job.
        expose_headers=f"grpc-status,grpc-message,grpc-status-details-bin,x-request-id,{SESSION_HEADER}",
        max_age="86400",
        # A preflight from an origin not allowed is answered by Envoy (no ACAO), not forwarded
        # to the gRPC upstream, which would answer it with grpc-status 13 after a round trip.
        forward_not_matching_preflights=False,
    )


def _web_root(settings: GatewaySettings) -> Path:
    root = settings.web_root
    return root if (root / "index.html").is_file() else PLACEHOLDER_WEB_ROOT


def _static_files(settings: GatewaySettings, web_files: Sequence[str] | None) -> list[tuple[str, Path]]:
    """(URL path, file) for every file of the web root; index.html is also `/`.

    With `web_files`, those names under `settings.web_root` are served as they will exist where
    Envoy runs (a container image); nothing is read from this machine.
    """
    if web_files is not None:
        if "index.html" not in web_files:
            raise ValueError("web_files must include index.html (it is also served at /)")
        root = settings.web_root
        return [("/", root / "index.html"), *((f"/{name}", root / name) for name in web_files)]
    root = _web_root(settings).resolve()
    files = sorted(path for path in root.rglob("*") if path.is_file())
    pairs = [(f"/{path.relative_to(root).as_posix()}", path) for path in files]
    return [("/", root / "index.html"), *pairs]


def _direct_response_cap(files: list[tuple[str, Path]], named: bool) -> int:
    # The default (4 KiB) is too small for the page and its script bundle.
    if named:
        return NAMED_STATIC_FILES_MAX_BYTES
    return max(1 << 20, *(path.stat().st_size for _, path in files))


def _static_route(url: str, path: Path) -> dict[str, Any]:
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if media_type.startswith("text/") or media_type in ("application/javascript", "application/json"):
        media_type += "; charset=utf-8"
    headers = {
        "content-type": media_type,
        # File names carry no content hash, so a browser must revalidate after a rebuild.
        "cache-control": "no-cache",
        "x-content-type-options": "nosniff",
    }
    return {
        "match": {"path": url},
        # Envoy reads the file when the config loads: a rebuilt page needs a gateway restart.
        "direct_response": {"status": 200, "body": {"filename": str(path)}},
        "response_headers_to_add": [
            {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for key, value in headers.items()
        ],
    }


def _json_body_cap(settings: GatewaySettings) -> dict[str, Any]:
    limit = max_json_request_bytes(settings.max_image_bytes)
    return _typed(f"{BUFFER_TYPE}PerRoute", buffer={"max_request_bytes": limit})


def _routes(settings: GatewaySettings, static_files: list[tuple[str, Path]]) -> list[dict[str, Any]]:
    idle = _seconds(settings.stream_idle_timeout_s)
    routes = [_static_route(url, path) for url, path in static_files]
    for service in (*SERVICES, ARTIFACTS):
        action = {
            "cluster": service.cluster,
            # The default 15 s route timeout resets a stream even while events flow.
            "timeout": "0s",
            "idle_timeout": idle,
            # No max_stream_duration / grpc_timeout_header_max: Envoy would enforce grpc-timeout
            # itself and turn DEADLINE_EXCEEDED into INTERNAL. The servers enforce deadlines.
            "retry_policy": {
                "retry_on": RETRY_ON,
                "retriable_headers": RETRIABLE_HEADERS,
                "num_retries": settings.num_retries,
                # A retry goes to another replica when there is one (Envoy only retries before the
                # response has started, so a stream with events is never retried).
                "retry_host_predicate": [
                    {
                        "name": "envoy.retry_host_predicates.previous_hosts",
                        "typed_config": _typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
                    }
                ],
                "host_selection_retry_max_attempts": 5,
            },
        }
        # The router keeps a request's body to replay it on a retry, up to this limit; a larger body
        # is sent on without it and its retries are abandoned (ARCHITECTURE.md, "Retries").
        buffer = {"request_body_buffer_limit": retry_buffer_bytes(settings.max_image_bytes)}
        # Downloads need no particular replica (every one serves the shared store): they stay
        # balanced, header or not, and their responses name no replica.
        per_filter = {SESSION_FILTER: _no_session()} if service is ARTIFACTS else {}
        # After transcoding the path is /<package>.<Service>/<Method>, so this one route carries
        # gRPC, gRPC-Web and transcoded JSON.
        grpc_route = {"match": {"prefix": f"/{service.grpc_service}/"}, "route": action, **buffer}
        routes.append({**grpc_route, "typed_per_filter_config": per_filter} if per_filter else grpc_route)
        # The CORS filter runs before the transcoder and looks up the route of the original
        # REST path; without these routes OPTIONS /v1/... is a 404 and responses carry no ACAO.
        routes.append(
            {
                "match": {"prefix": service.rest_prefix},
                "route": action,
                **buffer,
                # Only JSON bodies are buffered and capped (the buffer filter is off elsewhere).
                "typed_per_filter_config": {BUFFER_FILTER: _json_body_cap(settings), **per_filter},
            }
        )
    return edge.apply_to_routes(settings, auth.apply_to_routes(settings, routes))


#: Media types the gateway gzips: the page's files (the script bundle shrinks about 4x). Never
#: gRPC, gRPC-Web or event streams: compressing a stream would hold events back.
COMPRESSED_TYPES = ("text/html", "text/css", "text/javascript", "application/javascript")


def _compressor() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.compressor",
        "typed_config": _typed(
            "envoy.extensions.filters.http.compressor.v3.Compressor",
            response_direction_config={
                "common_config": {"min_content_length": 1024, "content_type": list(COMPRESSED_TYPES)},
            },
            compressor_library={
                "name": "gzip",
                "typed_config": _typed("envoy.extensions.compression.gzip.compressor.v3.Gzip"),
            },
        ),
    }


#: Turns the artifact server's length and range metadata (kiln_runtime.artifact_servicer) into
#: HTTP: the transcoder streams a DownloadArtifact response as it arrives, so it cannot know the
#: length itself, and it always answers 200. It sits just before the transcoder in the chain, so
#: on the way out it sees the transcoded response. gRPC and gRPC-Web answers keep their framing
#: (a Content-Length of the raw bytes would be wrong there) and the metadata as it is.
ARTIFACT_HEADERS_LUA = """
function envoy_on_response(response_handle)
  local headers = response_handle:headers()
  local length = headers:get("x-kiln-content-length")
  local range = headers:get("x-kiln-content-range")
  if length == nil and range == nil then
    return
  end
  local content_type = headers:get("content-type") or ""
  if string.sub(content_type, 1, 16) == "application/grpc" then
    return
  end
  headers:remove("x-kiln-content-length")
  headers:remove("x-kiln-content-range")
  if length == nil then
    -- A range past the end: the error's trailers name the size ("bytes */<size>").
    headers:replace(":status", "416")
    headers:replace("content-range", range)
    return
  end
  headers:replace("content-length", length)
  headers:replace("accept-ranges", "bytes")
  if range ~= nil then
    headers:replace(":status", "206")
    headers:replace("content-range", range)
  end
end
"""


def _artifact_headers() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.lua",
        "typed_config": _typed(
            "envoy.extensions.filters.http.lua.v3.Lua",
            default_source_code={"inline_string": ARTIFACT_HEADERS_LUA.strip() + "\n"},
        ),
    }


def _stateful_session() -> dict[str, Any]:
    """Send a request carrying `SESSION_HEADER` to the replica it names.

    A job runs on one replica; its live events and its cancellation live there until it ends, so
    the calls that name the job must reach that replica, not the least busy one. Requests without
    the header are balanced as before (LEAST_REQUEST). Not strict: when the named replica is
    unhealthy or gone, the request goes to another one (a refused connection is retried there, see
    `RETRY_ON`), which answers from the job's stored record (a finished job, or a lost one
    reported as REPLICA_LOST) instead of the gateway failing the call.
    """
    return {
        "name": SESSION_FILTER,
        "typed_config": _typed(
            "envoy.extensions.filters.http.stateful_session.v3.StatefulSession",
            session_state={
                "name": "envoy.http.stateful_session.header",
                "typed_config": _typed(
                    "envoy.extensions.http.stateful_session.header.v3.HeaderBasedSessionState",
                    name=SESSION_HEADER,
                ),
            },
            strict=False,
        ),
    }


def _no_session() -> dict[str, Any]:
    return _typed("envoy.extensions.filters.http.stateful_session.v3.StatefulSessionPerRoute", disabled=True)


def _http_filters(settings: GatewaySettings) -> list[dict[str, Any]]:
    return [
        {
            # First, so a probe never reaches CORS, the transcoder or an upstream.
            "name": "envoy.filters.http.health_check",
            "typed_config": _typed(
                "envoy.extensions.filters.http.health_check.v3.HealthCheck",
                pass_through_mode=False,
                headers=[{"name": ":path", "string_match": {"exact": HEALTH_PATH}}],
            ),
        },
        _compressor(),
        {"name": "envoy.filters.http.cors", "typed_config": _typed("envoy.extensions.filters.http.cors.v3.Cors")},
        # After CORS, which answers preflights itself (they pick no replica). Before grpc_web and
        # the transcoder, so it reads the header as the client sent it and adds it to the response
        # as the client receives it: the same for gRPC, gRPC-Web and JSON/SSE. The header is
        # ordinary metadata to those filters; the replica it picks stays chosen after the
        # transcoder rewrites the path, since the router only looks the host up at the end.
        _stateful_session(),
        {
            "name": "envoy.filters.http.grpc_web",
            "typed_config": _typed("envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"),
        },
        # Identity first (the principal header is set or refused), then the per-principal rate limit.
        *auth.http_filters(settings),
        *edge.http_filters(settings),
        _artifact_headers(),
        {
            # The transcoder streams JSON into its parser and does not enforce max_request_body_size
            # on a unary body, so without this a JSON body of any size reaches a server, whose
            # transport then answers RESOURCE_EXHAUSTED (HTTP 429, "busy"). Whole JSON bodies are
            # buffered here and a larger one gets the 413 of `_too_large_mapper`. Off unless a route
            # turns it on (`_json_body_cap`, the REST routes): a gRPC stream, routed or not (grpcurl's
            # reflection), must never wait here for an end of stream that comes after its answer.
            "name": BUFFER_FILTER,
            "disabled": True,
            "typed_config": _typed(BUFFER_TYPE, max_request_bytes=max_json_request_bytes(settings.max_image_bytes)),
        },
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": _typed(
                "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
                # The descriptor must include google/rpc/error_details.proto (make gen does).
                proto_descriptor=str(settings.descriptor_path.resolve()),
                services=[service.grpc_service for service in (*SERVICES, ARTIFACTS)],
                # Errors before the first event become HTTP status + JSON google.rpc.Status body.
                # Errors after it travel as the in-band `error` event.
                convert_grpc_status=True,
                print_options={
                    "always_print_primitive_fields": True,
                    # SSE gives text/event-stream with one `data: {...}` per event, readable
                    # incrementally; NDJSON one object per line; neither set gives one JSON array.
                    "stream_sse_style_delimited": settings.json_stream_format == "sse",
                    "stream_newline_delimited": settings.json_stream_format == "ndjson",
                },
                # The default (the 1 MiB connection buffer) cuts results over 1 MiB after HTTP 200.
                # Any request within the image limit (base64 in JSON adds a third) reaches the server,
                # which names `image` and the limit; larger bodies get the 413 of `_local_reply_config`.
                max_request_body_size=max_json_request_bytes(settings.max_image_bytes),
                max_response_body_size=settings.max_response_bytes,
            ),
        },
        {"name": "envoy.filters.http.router", "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")},
    ]


def _too_large_mapper(settings: GatewaySettings) -> dict[str, Any]:
    """A JSON body over the transcoder's limit: Envoy's 413, worded like the server's own refusal.

    Same shape as the transcoder's errors (a `google.rpc.Status` with a BadRequest naming
    `image`), so a client reads one format; INVALID_ARGUMENT, never "busy", never retried.
    """
    limit = settings.max_image_bytes
    description = (
        f"the request is larger than the {max_json_request_bytes(limit)} bytes the gateway accepts; "
        f"images up to {limit} bytes ({limit / (1 << 20):g} MiB) are accepted"
    )
    return {
        "filter": {
            "status_code_filter": {
                "comparison": {"op": "EQ", "value": {"default_value": 413, "runtime_key": "kiln_local_reply_413"}}
            }
        },
        "body_format_override": {
            "json_format": {
                "code": 3,
                "message": f"invalid request: image: {description}",
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.BadRequest",
                        "fieldViolations": [{"field": "image", "description": description}],
                    }
                ],
            }
        },
    }


def _local_reply_config(settings: GatewaySettings) -> dict[str, Any]:
    # Envoy's own 4xx/5xx as JSON for JSON clients. A mapper filtered to >= 400, not a
    # top-level body_format, which would rewrite every local reply.
    return {
        "mappers": [
            _too_large_mapper(settings),
            # Auth refusals (401/403) with their gRPC codes (auth work).
            *auth.local_reply_mappers(settings),
            # Edge refusals (edge work): an encoded slash in the path; a rate limit (RESOURCE_EXHAUSTED
            # on gRPC-Web too, a JSON Status with RetryInfo).
            *edge.local_reply_mappers(settings),
            {
                "filter": {
                    "status_code_filter": {
                        "comparison": {
                            "op": "GE",
                            "value": {"default_value": 400, "runtime_key": "kiln_local_reply_json_min"},
                        }
                    }
                },
                "body_format_override": {
                    "json_format": {
                        "code": "%RESPONSE_CODE%",
                        "message": "%LOCAL_REPLY_BODY%",
                        "details": "%RESPONSE_CODE_DETAILS%",
                    }
                },
            },
        ]
    }


def _listener(settings: GatewaySettings, web_files: Sequence[str] | None) -> dict[str, Any]:
    static_files = _static_files(settings, web_files)
    manager: dict[str, Any] = {
        "stat_prefix": "kiln",
        # HTTP/1.1 for browsers and curl, h2c for gRPC clients, on one port.
        "codec_type": "AUTO",
        # The default 300 s would cut a stream whose steps are far apart.
        "stream_idle_timeout": _seconds(settings.stream_idle_timeout_s),
        "local_reply_config": _local_reply_config(settings),
        "route_config": {
            "name": "kiln",
            "max_direct_response_body_size_bytes": _direct_response_cap(static_files, web_files is not None),
            "virtual_hosts": [
                {
                    "name": "kiln",
                    "domains": ["*"],
                    "typed_per_filter_config": {"envoy.filters.http.cors": _cors_policy(settings)},
                    "routes": _routes(settings, static_files),
                }
            ],
        },
        "http_filters": _http_filters(settings),
        **edge.connection_manager_fields(settings),
    }
    if settings.access_log:
        manager["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                # No query strings (signed links) and no credentials in the log (auth work).
                "typed_config": _typed(
                    "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog", log_format=auth.access_log_format()
                ),
            }
        ]
    chain: dict[str, Any] = {}
    transport = tls.downstream_transport_socket(settings)
    if transport is not None:
        chain["transport_socket"] = transport
    return {
        "name": "kiln",
        "address": _address(settings.host, settings.port),
        "filter_chains": [
            {
                **chain,
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": _typed(
                            "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                            **manager,
                        ),
                    }
                ],
            }
        ],
    }


def _cluster(settings: GatewaySettings, service: Service, upstreams: list[str]) -> dict[str, Any]:
    endpoints = []
    for upstream in upstreams:
        host, _, port = upstream.rpartition(":")
        endpoints.append({"endpoint": {"address": _address(host.strip("[]"), int(port))}})
    transport = tls.upstream_transport_socket(settings, service.cluster)
    return {
        **({"transport_socket": transport} if transport is not None else {}),
        "name": service.cluster,
        # STRICT_DNS serves IP literals as they are and resolves names to every address (a
        # Kubernetes headless service gives one endpoint per pod).
        "type": "STRICT_DNS",
        # "localhost" must not resolve to ::1 when the servers bind 127.0.0.1.
        "dns_lookup_family": "V4_PREFERRED",
        "dns_refresh_rate": "5s",
        "connect_timeout": _seconds(settings.connect_timeout_s),
        # Long streams make round robin uneven; send new work to the least busy replica.
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {"cluster_name": service.cluster, "endpoints": [{"lb_endpoints": endpoints}]},
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                # grpcio speaks HTTP/2 only; keepalive finds a dead server during a quiet stream.
                explicit_http_config={
                    "http2_protocol_options": {
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"},
                        # Envoy's default receive windows (256 MiB) let a server push a whole large
                        # download into Envoy's memory while the client reads slowly; with these, a
                        # stream waits for the client after UPSTREAM_STREAM_WINDOW_BYTES.
                        "initial_stream_window_size": UPSTREAM_STREAM_WINDOW_BYTES,
                        "initial_connection_window_size": UPSTREAM_CONNECTION_WINDOW_BYTES,
                    }
                },
            )
        },
        "health_checks": [
            {
                "timeout": _seconds(settings.health_check_timeout_s),
                "interval": _seconds(settings.health_check_interval_s),
                # The default 60 s leaves an idle cluster's dead replica unnoticed for a minute.
                "no_traffic_interval": _seconds(settings.health_check_no_traffic_interval_s),
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                # The servers report NOT_SERVING per service name until the model is loaded and as
                # soon as SIGTERM arrives, so a loading or draining replica gets no new work.
                "grpc_health_check": {"service_name": service.grpc_service},
            }
        ],
        "circuit_breakers": {
            "thresholds": [
                {
                    "priority": "DEFAULT",
                    "max_connections": 1024,
                    "max_pending_requests": 1024,
                    "max_requests": settings.max_requests_per_cluster,
                    # Retries may add at most this share to the requests in flight (Envoy's retry
                    # budget replaces a fixed max_retries), so a full cluster is not hammered.
                    "retry_budget": {
                        "budget_percent": {"value": settings.retry_budget_percent},
                        "min_retry_concurrency": MIN_RETRY_CONCURRENCY,
                    },
                }
            ]
        },
        "outlier_detection": {
            # gRPC INTERNAL from a failed model run maps to HTTP 500; that is the request's problem,
            # not the replica's, so plain 5xx do not eject. Gateway failures (connect errors,
            # resets, UNAVAILABLE = 503) do.
            "enforcing_consecutive_5xx": 0,
            "consecutive_gateway_failure": 3,
            "enforcing_consecutive_gateway_failure": 100,
            "interval": "5s",
            "base_ejection_time": "30s",
            "max_ejection_percent": 50,
        },
    }


def render_config(settings: GatewaySettings, *, web_files: Sequence[str] | None = None) -> str:
    """Render the Envoy bootstrap for `settings` as YAML.

    Args:
        settings: The gateway settings; the descriptor path is made absolute.
        web_files: Names of the static files under `settings.web_root` where Envoy will run
            (must include index.html); None serves every file found there now (or the
            placeholder page).

    Returns:
        The YAML text of a complete static Envoy bootstrap (listener, clusters, admin).
    """
    bootstrap: dict[str, Any] = {
        **edge.bootstrap_fields(settings),
        "admin": {
            # Admin can quit Envoy and dump its config: never off the loopback interface.
            "address": _address("127.0.0.1", settings.admin_port),
        },
        "static_resources": {
            "listeners": [_listener(settings, web_files)],
            "clusters": [
                _cluster(settings, SERVICES[0], settings.img2img_upstreams),
                _cluster(settings, SERVICES[1], settings.mesh_upstreams),
                # A remote JWKS's cluster when there is one (auth work).
                *auth.clusters(settings),
            ],
        },
    }
    text: str = yaml.safe_dump(bootstrap, sort_keys=False, default_flow_style=False)
    return text
