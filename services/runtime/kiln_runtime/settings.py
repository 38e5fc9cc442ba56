"""Settings shared by every Kiln model server (pydantic-settings, prefix `KILN_`).

Each server builds its root settings class once in `__main__` and passes parts of it down;
nothing reads the environment at import time. Environment names nest with `__`:
`KILN_STORAGE__OUTPUT_DIR`, `KILN_IMG2IMG__SERVER__PORT`, `KILN_IMG2IMG__RUNTIME__DEVICE`.
A `.env` file in the working directory is read too (the environment wins).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ByteSize,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from kiln_client.limits import DEFAULT_MAX_IMAGE_BYTES, max_request_message_bytes
from kiln_runtime.durations import parse_keep_alive

MiB = 1 << 20

DevicePolicy = Literal["auto", "cuda", "mps", "cpu"]
CudaDtype = Literal["float16", "bfloat16"]
# Seconds; None = stay loaded. Parsed from Ollama-style strings ("5m") by `durations`.
KeepAlive = Annotated[float | None, BeforeValidator(parse_keep_alive)]


class ServerSettings(BaseModel):
    """Where a model server listens and how large its messages may be."""

    host: str = Field("127.0.0.1", description="Address the gRPC server binds; 0.0.0.0 to serve other machines.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free one (tests).")
    metrics_enabled: bool = Field(True, description="Serve Prometheus metrics over HTTP at /metrics.")
    metrics_port: int = Field(
        9091, ge=0, le=65535, description="Prometheus metrics port on the same host; 0 picks one."
    )
    max_message_bytes: PositiveInt = Field(
        4 * MiB,
        description="Cap on any gRPC message sent (artifacts above it are chunked); requests may be larger: "
        "their cap follows limits.max_image_bytes.",
    )
    shutdown_grace_s: PositiveFloat = Field(
        30.0, description="Seconds in-flight streams may take to finish after SIGTERM before they are cancelled."
    )
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate (chain) of the gRPC port; with tls_key_file the port speaks TLS only."
    )
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None,
        description="PEM CA certificate(s): set = mutual TLS, only clients presenting a certificate from this CA "
        "(the gateway's) are accepted. Needs tls_cert_file and tls_key_file. Metrics stay plaintext.",
    )

    @model_validator(mode="after")
    def _tls_files_together(self) -> ServerSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("server TLS needs both tls_cert_file and tls_key_file (set both or neither)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file too")
        return self

    @property
    def tls_enabled(self) -> bool:
        """Whether the gRPC port speaks TLS."""
        return self.tls_cert_file is not None


class RuntimeSettings(BaseModel):
    """Device choice and admission limits for the one model a server holds."""

    device: DevicePolicy = Field(
        "auto", description="auto picks cuda, then mps, then cpu; a named device that is missing is a startup error."
    )
    cuda_dtype: CudaDtype = Field("float16", description="Compute dtype on CUDA (MPS and CPU always use float32).")
    mps_fallback: bool = Field(
        True,
        description="On a Mac, let torch run ops that have no MPS kernel on the CPU (PYTORCH_ENABLE_MPS_FALLBACK) "
        "instead of failing the job; an explicit PYTORCH_ENABLE_MPS_FALLBACK in the environment wins.",
    )
    max_concurrency: PositiveInt = Field(1, description="Jobs that run at once on this model.")
    max_queue: int = Field(8, ge=0, description="Jobs that may wait for a slot; beyond it RESOURCE_EXHAUSTED.")
    load_on_startup: bool = Field(
        True, description="Load and warm the model at startup; false loads it on the first request."
    )
    keep_alive: KeepAlive = Field(
        None,
        description="How long the model stays loaded after its last job: seconds or a duration (30s, 5m, 1h30m); "
        "0 unloads right after each job; unset (or negative) keeps it loaded. The next job reloads it.",
    )
    principal_weights: dict[str, PositiveInt] = Field(
        default_factory=dict,
        description="Fair admission: grants per turn of the queue's round-robin, by principal (JSON object, "
        'e.g. {"batch": 1, "studio": 3}); principals not listed get 1.',
    )


class LimitsSettings(BaseModel):
    """Input size limits checked before any decoding work."""

    max_image_bytes: PositiveInt = Field(
        DEFAULT_MAX_IMAGE_BYTES,
        description="Largest encoded input image, in bytes; the gRPC receive cap (twice this plus 1 MiB, so a "
        "larger image is refused by name rather than by the transport) follows it. Keep the gateway's "
        "KILN_GATEWAY__MAX_IMAGE_BYTES equal.",
    )
    max_image_pixels: PositiveInt = Field(
        4096 * 4096, description="Largest decoded input image, width x height; larger is a decompression bomb."
    )

    @property
    def max_request_bytes(self) -> int:
        """The gRPC receive cap for requests (`kiln_client.limits.max_request_message_bytes`)."""
        return max_request_message_bytes(self.max_image_bytes)


class ModelSettings(BaseModel):
    """Which weights a local provider loads; each service sets its own default."""

    id: str = Field("", description="Hub repo id (through the HF cache), a local folder, or a single checkpoint file.")
    revision: str = Field("", description="Hub revision to pin (branch, tag or commit); empty: the default branch.")
    cache_dir: Path | None = Field(
        None, description="Hugging Face cache folder for hub ids; default HF_HUB_CACHE, else HF_HOME/hub."
    )


class FakeProviderSettings(BaseModel):
    """The deterministic stand-in model used to exercise the whole path without weights."""

    steps: PositiveInt = Field(8, description="Progress steps a fake run reports.")
    step_delay_s: float = Field(0.01, ge=0, description="Seconds each fake step sleeps.")
    output_bytes: PositiveInt = Field(
        64 * 1024, description="Approximate size of the fake artifact in bytes (incompressible content)."
    )
    fail_at_step: int = Field(0, ge=0, description="Raise a provider failure at this step (1-based); 0 never fails.")
    fail_when_prompt_contains: str = Field(
        "", description="Fail at `fail_at_step` (or step 1) only when the prompt contains this text; empty: always."
    )
    load_delay_s: float = Field(0.0, ge=0, description="Seconds the fake model takes to load (health tests).")
    burn_cpu: bool = Field(
        False, description="Spend each step computing (numpy; the GIL is released, as in torch) instead of sleeping."
    )


class S3StorageSettings(BaseModel):
    """An S3-compatible bucket for artifacts (`storage.backend = s3`).

    Credentials are not settings: boto3 takes them from the standard AWS chain (AWS_ACCESS_KEY_ID /
    AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, web identity, instance roles), and Kiln never logs them.
    """

    endpoint_url: str = Field(
        "",
        description="S3 endpoint, e.g. http://127.0.0.1:8333 (SeaweedFS) or "
        "https://<account>.r2.cloudflarestorage.com; empty: AWS S3 for the region.",
    )
    bucket: str = Field("", description="Bucket the artifacts go to; it must exist (required with backend=s3).")
    prefix: str = Field("kiln/", description="Key prefix inside the bucket, so one bucket can hold other data too.")
    region: str = Field("us-east-1", description="Region for request signing (most non-AWS services accept any).")
    path_style: bool = Field(
        True,
        description="Path-style addressing (<endpoint>/<bucket>/<key>), which MinIO and SeaweedFS need; "
        "false: virtual-hosted style (<bucket>.<endpoint>).",
    )
    presign_expiry_s: int = Field(
        3600,
        ge=1,
        le=7 * 24 * 3600,
        description="Lifetime of the presigned GET URLs that artifact URIs are (max 7 days).",
    )
    public_endpoint_url: str = Field(
        "",
        description="Endpoint presigned URLs name, when clients reach the store at another address than the "
        "servers (e.g. http://127.0.0.1:8333 for a browser, http://seaweedfs:8333 inside compose); "
        "empty: endpoint_url.",
    )
    multipart_threshold_bytes: int = Field(
        16 * MiB, ge=5 * MiB, description="Artifacts at least this large are uploaded in parts (multipart upload)."
    )
    part_bytes: int = Field(8 * MiB, ge=5 * MiB, description="Part size of a multipart upload (S3's minimum is 5 MiB).")
    lifecycle_rule: bool = Field(
        False,
        description="At startup, set the bucket's lifecycle to expire objects under the prefix after "
        "retention_hours (rounded up to days) and abort stale multipart uploads. It replaces the bucket's whole "
        "lifecycle configuration, so it is off unless the bucket is Kiln's alone.",
    )


class StorageSettings(BaseModel):
    """Where artifacts are written and how clients reach them."""

    backend: Literal["local", "s3"] = Field(
        "local",
        description="local: files under output_dir (one machine, or a shared volume); s3: an "
        "S3-compatible bucket every replica reaches (the s3 section).",
    )
    s3: S3StorageSettings = Field(default_factory=S3StorageSettings, description="The bucket, when backend=s3.")
    data_dir: Path = Field(Path("data"), description="Root for Kiln's files; relative paths are from the cwd.")
    output_dir: Path | None = Field(None, description="Artifact directory; default <data_dir>/outputs.")
    public_base_url: str = Field(
        "",
        description="If set, artifact URIs are signed links <public_base_url>/<artifact id>?expires=..&signature=.. "
        "(the gateway's /v1/artifacts route); else presigned GET URLs (s3), or none (local: clients fetch by id).",
    )
    url_signing_key: SecretStr = Field(
        SecretStr(""),
        description="HMAC key of signed artifact links; every replica behind one gateway needs the same key. Empty: "
        "a random key per process (links then work only on the server that made them).",
    )
    url_expiry_s: PositiveInt = Field(3600, description="Seconds a signed artifact link stays valid.")
    local_path_uris: bool = Field(
        False,
        description="Local backend without public_base_url: give file:// URIs naming the server's folder (only for "
        "clients on the same machine); off: no URI, clients download by artifact id.",
    )
    max_inline_bytes: PositiveInt = Field(
        2 * MiB, description="Artifacts up to this size may travel inline in the result message."
    )
    retention_hours: PositiveFloat = Field(
        24.0 * 7, description="Job folders older than this are removed by the periodic cleanup."
    )
    cleanup_interval_s: PositiveFloat = Field(3600.0, description="Seconds between cleanup sweeps.")
    budget_bytes: ByteSize | None = Field(
        None,
        description="Most bytes the artifact folder may hold (local backend), e.g. 50GiB; a job that would cross it "
        "is refused before it runs (STORAGE_FULL). Unset: no budget, only min_free_bytes.",
    )
    min_free_bytes: ByteSize = Field(
        ByteSize(256 * MiB),
        description="Free space the local backend leaves on the artifact folder's disk, e.g. 1GiB; a job that would "
        "take it below this is refused before it runs (STORAGE_FULL). 0 turns the floor off.",
    )
    expected_job_bytes: ByteSize = Field(
        ByteSize(16 * MiB),
        description="Bytes a job is assumed to store until this server has stored some; from then on the largest of "
        "its last 32 jobs. Used, times the jobs admitted, to refuse work the storage could not keep.",
    )
    usage_interval_s: PositiveFloat = Field(
        30.0, description="Seconds between recounts of the bytes the artifact folder holds (budget, metrics)."
    )

    @model_validator(mode="after")
    def _s3_needs_a_bucket(self) -> StorageSettings:
        if self.backend == "s3" and not self.s3.bucket:
            raise ValueError("storage.backend=s3 needs a bucket: set KILN_STORAGE__S3__BUCKET")
        return self

    @property
    def resolved_output_dir(self) -> Path:
        return self.output_dir if self.output_dir is not None else self.data_dir / "outputs"


class TelemetrySettings(BaseModel):
    """Logging for the process."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Root log level.")
    log_format: Literal["json", "text"] = Field("json", description="json: one JSON object per line; text: for humans.")


class JobsSettings(BaseModel):
    """How long jobs live apart from their streams (ARCHITECTURE.md, "Jobs")."""

    disconnect_grace_s: float = Field(
        60.0,
        ge=0,
        description="Seconds a job whose last watcher left keeps running, waiting for a WatchJob, before it is "
        "cancelled (requests with DisconnectPolicy WAIT_FOR_WATCHER, the default); also how long a finished job's "
        "full event log is kept for a reconnecting client before previews and chunks are dropped from it.",
    )
    retention_s: PositiveFloat = Field(
        3600.0, description="Seconds a finished job stays readable (GetJob, WatchJob, ListJobs); then NOT_FOUND."
    )
    max_retained_jobs: PositiveInt = Field(
        1000, description="Most finished jobs kept in memory; the oldest go first (the store still answers GetJob)."
    )
    max_retained_bytes: ByteSize = Field(
        ByteSize(256 * MiB),
        description="Most bytes of events (previews, chunks, inline results) finished jobs keep in memory (256MiB).",
    )
    heartbeat_s: PositiveFloat = Field(
        5.0,
        description="Seconds between rewrites of an unfinished job's stored record; a record three heartbeats old "
        "means its server is gone, and other replicas report the job as FAILED (REPLICA_LOST).",
    )
    max_jobs_per_principal: int = Field(
        0,
        ge=0,
        description="Most queued plus running jobs one principal may have on this server; beyond it "
        "RESOURCE_EXHAUSTED (reason QUOTA, not retried). 0 = no limit.",
    )


class ServiceSettings(BaseModel):
    """Everything one model server needs except its provider's own settings."""

    server: ServerSettings = Field(default_factory=ServerSettings, description="Listening and message caps.")
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings, description="Device and admission.")
    limits: LimitsSettings = Field(default_factory=LimitsSettings, description="Input size limits.")
    jobs: JobsSettings = Field(default_factory=JobsSettings, description="Jobs that outlive their streams.")

    @model_validator(mode="after")
    def _ports_differ(self) -> ServiceSettings:
        if self.server.port and self.server.port == self.server.metrics_port:
            raise ValueError("server.port and server.metrics_port must differ")
        return self


class KilnSettings(BaseSettings):
    """Root settings shared by both servers; each server subclasses it to add its own section."""

    model_config = SettingsConfigDict(
        env_prefix="KILN_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        nested_model_default_partial_update=True,
    )

    offline: bool = Field(
        False,
        description="Never download models (HF_HUB_OFFLINE=1 also turns it on); a missing model fails at startup.",
    )
    profile: Literal["default", "tiny", "laptop"] = Field(
        "default",
        description="tiny: use the generated tiny test models instead of real weights (make up); laptop: load "
        "models on first use, unload them after 5 idle minutes, one job at a time, attention slicing.",
    )
    storage: StorageSettings = Field(default_factory=StorageSettings, description="Artifact storage.")
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings, description="Logging.")

    @model_validator(mode="after")
    def _honour_hf_offline(self) -> KilnSettings:
        # Hugging Face users already know HF_HUB_OFFLINE; it means the same thing here.
        if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
            self.offline = True
        return self
