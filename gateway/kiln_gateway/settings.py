"""Settings of the Envoy gateway (pydantic-settings, prefix `KILN_GATEWAY__`).

Same house style as the model servers (`kiln_runtime.settings`): built once by the caller and
passed down, nothing read at import time, `.env` read too (the environment wins). Names:
`KILN_GATEWAY__PORT=8080`, `KILN_GATEWAY__IMG2IMG_UPSTREAMS=10.0.0.5:50051,10.0.0.6:50051`,
`KILN_GATEWAY__CORS_ALLOWED_ORIGINS=https://app.example.com`. Lists accept a JSON array or a
comma-separated string.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from kiln_client.limits import DEFAULT_MAX_IMAGE_BYTES

MiB = 1 << 20

#: The descriptor set `make gen` writes next to this package (gateway/kiln.binpb).
DEFAULT_DESCRIPTOR = Path(__file__).resolve().parent.parent / "kiln.binpb"
_REPO = Path(__file__).resolve().parent.parent.parent
#: The web client's bundle (`make web` builds it); served at `/` when it holds an index.html.
DEFAULT_WEB_ROOT = _REPO / "clients" / "web" / "dist"
#: Served at `/` when `web_root` has no index.html (a Python-only install never built the page).
PLACEHOLDER_WEB_ROOT = _REPO / "gateway" / "web"

CommaList = Annotated[list[str], NoDecode]


def _split(value: Any) -> Any:
    """Accept `a,b` and `["a","b"]` from the environment; lists pass through."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _check_upstream(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"upstream {address!r} must be host:port")
    return address


#: Services a key or token may be limited to (the keys file's third column, the JWT services claim).
AUTH_SERVICES = ("img2img", "mesh")


class JwtSettings(BaseModel):
    """How the gateway checks JWTs (`auth.mode=jwt`): Envoy's jwt_authn with one provider."""

    issuer: str = Field("", description="The `iss` every token must carry.")
    audiences: CommaList = Field(
        default_factory=list, description="Accepted `aud` values (at least one): a token for another audience fails."
    )
    jwks_file: Path | None = Field(
        None, description="JWKS file with the issuer's public keys, read by Envoy when it loads its config."
    )
    jwks_uri: str = Field(
        "", description="http(s) URL of the issuer's JWKS, fetched and cached by Envoy (instead of jwks_file)."
    )
    principal_claim: str = Field("sub", min_length=1, description="Claim naming the principal (the caller).")
    services_claim: str = Field(
        "kiln_services",
        min_length=1,
        description="List claim of the services the token may use (img2img, mesh); absent: every service.",
    )

    _split_audiences = field_validator("audiences", mode="before")(_split)

    @field_validator("jwks_uri")
    @classmethod
    def _valid_uri(cls, value: str) -> str:
        if value:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"jwks_uri {value!r} must be an http:// or https:// URL with a host")
        return value


class AuthSettings(BaseModel):
    """Who may call the gateway (ARCHITECTURE.md, "Edge security"). Owned by the auth work.

    `none`: anyone who reaches the port (refused off loopback unless `allow_anonymous`); `api_key`:
    `authorization: Bearer <key>` checked against `api_keys_file`, which Envoy reads at run time;
    `jwt`: a signed token from `jwt.issuer`.
    """

    mode: Literal["none", "api_key", "jwt"] = Field("none", description="How callers prove who they are.")
    api_keys_file: Path | None = Field(
        None,
        description="Keys file for mode api_key: one `name key [service,service]` per line, `#` comments; "
        "no services listed = every service. Read by Envoy while it runs (changes apply within seconds), "
        "so it may not exist where the config is rendered (a container's mounted Secret).",
    )
    allow_anonymous: bool = Field(
        False, description="Let mode none serve on a non-loopback address (anyone who reaches it may run jobs)."
    )
    jwt: JwtSettings = Field(default_factory=JwtSettings, description="JWT provider for mode jwt.")

    @model_validator(mode="after")
    def _mode_complete(self) -> AuthSettings:
        if self.mode == "api_key" and self.api_keys_file is None:
            raise ValueError("auth.mode=api_key needs auth.api_keys_file (KILN_GATEWAY__AUTH__API_KEYS_FILE)")
        if self.mode == "jwt":
            jwt = self.jwt
            if not jwt.issuer:
                raise ValueError("auth.mode=jwt needs auth.jwt.issuer (KILN_GATEWAY__AUTH__JWT__ISSUER)")
            if not jwt.audiences:
                raise ValueError("auth.mode=jwt needs auth.jwt.audiences (KILN_GATEWAY__AUTH__JWT__AUDIENCES)")
            if (jwt.jwks_file is None) == (not jwt.jwks_uri):
                raise ValueError(
                    "auth.mode=jwt needs exactly one of auth.jwt.jwks_file and auth.jwt.jwks_uri "
                    "(KILN_GATEWAY__AUTH__JWT__JWKS_FILE / __JWKS_URI)"
                )
        return self


class RateLimitSettings(BaseModel):
    """Per-principal request rate at the gateway. Owned by the edge work.

    Envoy's local rate limit: one token bucket per principal, or per client address for calls
    without one.
    """

    requests_per_s: float = Field(
        0.0,
        ge=0,
        description="Sustained requests per second each principal may make through the gateway; 0 turns the "
        "limit off. Static files, /healthz and CORS preflights are never limited.",
    )
    burst: int = Field(
        20, ge=1, description="Requests a principal may make at once before the sustained rate applies (bucket size)."
    )
    max_principals: PositiveInt = Field(
        10000,
        description="Token buckets Envoy keeps (least recently used first out); a principal evicted from the "
        "table starts again with a full bucket.",
    )


class HardeningSettings(BaseModel):
    """Limits and headers that keep the public listener safe. Owned by the edge work."""

    xff_num_trusted_hops: int = Field(
        0,
        ge=0,
        le=10,
        description="Proxies in front of the gateway whose X-Forwarded-For entries are trusted; 0 = the client is "
        "the peer of the TCP connection (rate limits of callers without a principal key on that address).",
    )
    max_request_headers_kb: int = Field(
        32, ge=1, le=8192, description="Largest request header block, in KiB (Envoy answers 431 above it)."
    )
    max_headers_count: int = Field(
        100, ge=1, description="Most request headers (HTTP/1.1 answers 431 above it; HTTP/2 resets the stream)."
    )
    max_concurrent_streams: PositiveInt = Field(
        100, description="HTTP/2 streams one client connection may open at once."
    )
    initial_stream_window_bytes: int = Field(
        4 * MiB,
        ge=65535,
        le=2**31 - 1,
        description="HTTP/2 receive window per client stream: what a client may send ahead of Envoy reading it.",
    )
    initial_connection_window_bytes: int = Field(
        16 * MiB,
        ge=65535,
        le=2**31 - 1,
        description="HTTP/2 receive window per client connection (all its streams together).",
    )
    request_headers_timeout_s: PositiveFloat = Field(
        10.0, description="Seconds a client has to send a request's headers (slow clients holding connections)."
    )
    max_heap_bytes: int = Field(
        384 * MiB,
        ge=0,
        description="Envoy's heap budget for the overload manager: at 95% it returns freed memory to the system, "
        "at 98% new requests get 503 instead of the process running out of memory; 0 turns it off. Keep it "
        "below the container's memory limit (512 MiB in deploy/k8s), leaving room for what is not heap.",
    )
    max_downstream_connections: PositiveInt = Field(
        10000, description="Client connections Envoy accepts at once; further ones are closed on accept."
    )
    content_security_policy: str = Field(
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
        description="Content-Security-Policy sent with the page's static files. `blob:` in connect-src: the page "
        "reads back its own object URLs (result downloads, the 3D viewer's model).",
    )
    hsts_max_age_s: int = Field(
        31536000,
        ge=0,
        description="Strict-Transport-Security max-age sent with the page when TLS is on; 0 sends none.",
    )


class GatewayTlsSettings(BaseModel):
    """TLS towards clients (browsers get HTTP/2) and towards the model servers. Owned by the edge work."""

    cert_file: Path | None = Field(
        None,
        description="PEM certificate chain of the public listener; with key_file, the listener speaks only "
        "HTTPS (ALPN h2 and http/1.1, TLS 1.2 or later) and refuses plaintext.",
    )
    key_file: Path | None = Field(None, description="PEM private key of cert_file.")
    upstream_ca_file: Path | None = Field(
        None,
        description="PEM CA bundle; set = the gateway talks TLS to the model servers and verifies their "
        "certificates against it (and their name, see upstream_server_name).",
    )
    upstream_client_cert_file: Path | None = Field(
        None, description="PEM client certificate the gateway presents to the servers (mutual TLS)."
    )
    upstream_client_key_file: Path | None = Field(None, description="PEM private key of upstream_client_cert_file.")
    upstream_server_name: str = Field(
        "",
        description="Name the servers' certificates must carry (and the SNI sent); empty: each cluster's "
        "upstream hosts (a DNS name or an IP address).",
    )

    @property
    def downstream(self) -> bool:
        """Whether the public listener speaks TLS."""
        return self.cert_file is not None and self.key_file is not None

    @model_validator(mode="after")
    def _pairs(self) -> GatewayTlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file must be set together")
        if (self.upstream_client_cert_file is None) != (self.upstream_client_key_file is None):
            raise ValueError("tls.upstream_client_cert_file and tls.upstream_client_key_file must be set together")
        if self.upstream_client_cert_file is not None and self.upstream_ca_file is None:
            raise ValueError("a client certificate for the servers needs tls.upstream_ca_file (TLS to the servers)")
        return self


class GatewaySettings(BaseSettings):
    """Where the gateway listens, which model servers it fronts, and its limits."""

    model_config = SettingsConfigDict(
        env_prefix="KILN_GATEWAY__",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
    )

    host: str = Field("127.0.0.1", description="Address the public listener binds; 0.0.0.0 to serve other machines.")
    port: int = Field(8080, ge=0, le=65535, description="Public port (gRPC, gRPC-Web, JSON); 0 picks a free one.")
    admin_port: int = Field(
        9901, ge=0, le=65535, description="Envoy admin port, always bound to 127.0.0.1; 0 picks a free one."
    )
    img2img_upstreams: CommaList = Field(
        default_factory=lambda: ["127.0.0.1:50051"],
        description="img2img replicas as host:port; a DNS name resolving to several addresses "
        "(a Kubernetes headless service) counts every address.",
    )
    mesh_upstreams: CommaList = Field(
        default_factory=lambda: ["127.0.0.1:50052"],
        description="mesh replicas as host:port, as for img2img_upstreams.",
    )
    cors_allowed_origins: CommaList = Field(
        default_factory=list,
        description="Browser origins (scheme://host[:port]) allowed to call the gateway cross-origin; "
        "empty: same-origin pages only.",
    )
    descriptor_path: Path = Field(
        DEFAULT_DESCRIPTOR,
        description="Descriptor set for JSON transcoding (written by `make gen`, includes google.rpc error details).",
    )
    web_root: Path = Field(
        DEFAULT_WEB_ROOT,
        description="Folder of static files served at / (index.html) and /<name> (Envoy reads them when the "
        "config loads); without an index.html there, a placeholder page is served instead.",
    )
    max_image_bytes: PositiveInt = Field(
        DEFAULT_MAX_IMAGE_BYTES,
        description="The model servers' limits.max_image_bytes (keep them equal): Envoy's JSON body limit and "
        "retry buffer are derived from it (kiln_client.limits), so an image up to it passes every protocol.",
    )
    max_response_bytes: PositiveInt = Field(
        16 * MiB,
        description="Largest single response message the JSON transcoder buffers; must be >= the servers' "
        "max_message_bytes, or large results are cut after HTTP 200.",
    )
    stream_idle_timeout_s: PositiveFloat = Field(
        600.0, description="Seconds a stream may go without any data before Envoy resets it (longest step gap)."
    )
    connect_timeout_s: PositiveFloat = Field(1.0, description="Seconds to open a connection to a model server.")
    health_check_interval_s: PositiveFloat = Field(
        5.0, description="Seconds between gRPC health checks of each replica while it has traffic."
    )
    health_check_no_traffic_interval_s: PositiveFloat = Field(
        5.0, description="Seconds between health checks of an idle replica (Envoy's default is 60)."
    )
    health_check_timeout_s: PositiveFloat = Field(1.0, description="Seconds a health check may take.")
    num_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Retries of a refusal the server marks retriable (CAPACITY, SHUTTING_DOWN) or a connection "
        "failure before the request reached a server, each to another replica when there is one.",
    )
    retry_budget_percent: float = Field(
        20.0,
        gt=0,
        le=100,
        description="Circuit breaker: retries in flight at most this share of the requests in flight per cluster "
        "(with at least 3 always allowed), so retries cannot multiply the load of a full cluster.",
    )
    max_requests_per_cluster: PositiveInt = Field(
        1024, description="Circuit breaker: concurrent requests (streams) per model cluster."
    )
    base_id: int | None = Field(
        None,
        ge=0,
        description="Envoy --base-id (shared-memory namespace); None lets Envoy pick a free one "
        "(--use-dynamic-base-id), so several gateways can run on one machine.",
    )
    concurrency: PositiveInt = Field(2, description="Envoy worker threads (--concurrency).")
    log_level: str = Field("warn", description="Envoy --log-level: trace, debug, info, warn, error, critical, off.")
    access_log: bool = Field(True, description="Write one access log line per request to Envoy's stdout.")
    json_stream_format: Literal["sse", "ndjson", "array"] = Field(
        "sse",
        description="How JSON clients receive a server stream: sse (one `data:` event per message, readable "
        "incrementally with fetch), ndjson (one JSON object per line), or array (one JSON array, complete "
        "only at the end of the stream).",
    )

    auth: AuthSettings = Field(default_factory=AuthSettings, description="Authentication and service access.")
    rate_limit: RateLimitSettings = Field(
        default_factory=RateLimitSettings, description="Per-principal request rate limit."
    )
    hardening: HardeningSettings = Field(
        default_factory=HardeningSettings, description="Header, stream and memory limits; security headers."
    )
    tls: GatewayTlsSettings = Field(default_factory=GatewayTlsSettings, description="TLS to clients and servers.")

    _split_lists = field_validator("img2img_upstreams", "mesh_upstreams", "cors_allowed_origins", mode="before")(_split)

    @field_validator("img2img_upstreams", "mesh_upstreams")
    @classmethod
    def _valid_upstreams(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one upstream is needed")
        return [_check_upstream(address) for address in value]

    @model_validator(mode="after")
    def _ports_differ(self) -> GatewaySettings:
        if self.port and self.port == self.admin_port:
            raise ValueError("port and admin_port must differ")
        return self

    @model_validator(mode="after")
    def _no_anonymous_off_loopback(self) -> GatewaySettings:
        # Secure by default: mode none is for a gateway only this machine can reach (auth work).
        if self.auth.mode == "none" and not self.auth.allow_anonymous and not is_loopback(self.host):
            raise ValueError(
                f"the gateway would listen on {self.host} with auth.mode=none: anyone who can reach it could "
                "run jobs. Set KILN_GATEWAY__AUTH__MODE=api_key (with KILN_GATEWAY__AUTH__API_KEYS_FILE) or jwt, "
                "or KILN_GATEWAY__AUTH__ALLOW_ANONYMOUS=1 to serve without authentication on purpose"
            )
        return self


def is_loopback(host: str) -> bool:
    """Whether a listener address is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything
