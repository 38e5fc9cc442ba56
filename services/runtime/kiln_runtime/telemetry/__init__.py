"""Logging and metrics shared by every Kiln model server."""

from kiln_runtime.telemetry.logging import (
    JsonFormatter,
    TextFormatter,
    configure_logging,
    job_id_var,
    redact,
    request_id_var,
    rpc_var,
)
from kiln_runtime.telemetry.metrics import MetricsServer, ServiceMetrics, start_metrics_server

__all__ = [
    "JsonFormatter",
    "MetricsServer",
    "ServiceMetrics",
    "TextFormatter",
    "configure_logging",
    "job_id_var",
    "redact",
    "request_id_var",
    "rpc_var",
    "start_metrics_server",
]
