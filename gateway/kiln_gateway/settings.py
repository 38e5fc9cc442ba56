"""Settings of the Envoy gateway (pydantic-settings, prefix `KILN_GATEWAY__`).

Same house style as the model servers (`kiln_runtime.settings`): built once by the caller and
passed down, nothing read at import time, `.env` read too (the environment wins). Names:
`KILN_GATEWAY__PORT=8080`, `KILN_GATEWAY__IMG2IMG_UPSTREAMS=10.0.0.5:50051,10.0.0.6:50051`,
`KILN_GATEWAY__CORS_ALLOWED_ORIGINS=https://app.example.com`. Lists accept a JSON array or a
comma-separated string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

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


class AuthSettings(BaseModel):
    """Who may call the gateway (ARCHITECTURE.md, "Edge security"). Owned by the auth work."""


class RateLimitSettings(BaseModel):
    """Per-principal request rate at the gateway. Owned by the edge work."""


class HardeningSettings(BaseModel):
    """Limits and headers that keep the public listener safe. Owned by the edge work."""


class GatewayTlsSettings(BaseModel):
    """TLS towards clients (browsers get HTTP/2) and towards the model servers. Owned by the edge work."""


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
