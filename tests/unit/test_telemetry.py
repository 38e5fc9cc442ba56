from __future__ import annotations

import contextvars
import io
import json
import logging
import socket
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from kiln_runtime.telemetry.logging import (
    JsonFormatter,
    TextFormatter,
    configure_logging,
    job_id_var,
    redact,
    request_id_var,
    rpc_var,
)
from kiln_runtime.telemetry.metrics import ServiceMetrics, start_metrics_server


@pytest.fixture
def restore_root_logger() -> Iterator[logging.Logger]:
    # configure_logging replaces the root logger's handlers, pytest's own capture handlers
    # included; put everything back so later tests still have their log capture.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield root
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(level)


def _capture(formatter: logging.Formatter, name: str = "kiln.test") -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_line_has_core_fields() -> None:
    logger, stream = _capture(JsonFormatter(), "kiln.test.core")
    logger.info("hello %s", "world")
    (entry,) = _lines(stream)
    assert entry["message"] == "hello world"
    assert entry["level"] == "INFO"
    assert entry["logger"] == "kiln.test.core"
    assert entry["ts"].endswith("Z")
    assert "T" in entry["ts"]
    assert "request_id" not in entry
    assert "job_id" not in entry
    assert "rpc" not in entry


def test_json_carries_context_ids_inside_copied_context() -> None:
    logger, stream = _capture(JsonFormatter(), "kiln.test.ctx")

    def handle() -> None:
        request_id_var.set("req-1")
        job_id_var.set("job-1")
        rpc_var.set("/kiln.Img2Img/Generate")
        logger.info("in request")

    contextvars.copy_context().run(handle)
    logger.info("outside")  # the copied context's values do not leak out

    inside, outside = _lines(stream)
    assert inside["request_id"] == "req-1"
    assert inside["job_id"] == "job-1"
    assert inside["rpc"] == "/kiln.Img2Img/Generate"
    assert "request_id" not in outside
    assert "job_id" not in outside


def test_json_context_ids_set_and_reset() -> None:
    logger, stream = _capture(JsonFormatter(), "kiln.test.reset")
    token = request_id_var.set("req-2")
    try:
        logger.warning("set")
    finally:
        request_id_var.reset(token)
    logger.warning("reset")
    first, second = _lines(stream)
    assert first["request_id"] == "req-2"
    assert "request_id" not in second


def test_json_merges_extra_fields() -> None:
    logger, stream = _capture(JsonFormatter(), "kiln.test.extra")
    logger.info("done", extra={"kiln": {"steps": 8, "seconds": 1.5, "path": object(), "message": "clobber"}})
    (entry,) = _lines(stream)
    assert entry["steps"] == 8
    assert entry["seconds"] == 1.5
    assert isinstance(entry["path"], str)  # not JSON-encodable: written with str()
    assert entry["message"] == "done"  # extra fields never override the core keys


def test_json_serializes_exception() -> None:
    logger, stream = _capture(JsonFormatter(), "kiln.test.exc")
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        logger.exception("failed")
    (entry,) = _lines(stream)
    assert entry["level"] == "ERROR"
    assert entry["message"] == "failed"
    assert "ZeroDivisionError: boom" in entry["exception"]
    assert "Traceback" in entry["exception"]
    assert len(stream.getvalue().splitlines()) == 1  # still one line


def test_text_format_shows_context_ids_and_extra() -> None:
    logger, stream = _capture(TextFormatter(), "kiln.test.text")
    token = job_id_var.set("job-9")
    try:
        logger.info("started", extra={"kiln": {"steps": 4}})
    finally:
        job_id_var.reset(token)
    line = stream.getvalue().strip()
    assert "INFO kiln.test.text: started" in line
    assert "job_id=job-9" in line
    assert "steps=4" in line


def test_configure_logging_twice_leaves_one_handler(
    restore_root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    root = restore_root_logger
    configure_logging("DEBUG", "text")
    configure_logging("info", "json")
    assert len(root.handlers) == 1
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    assert handler.stream is sys.stderr
    assert isinstance(handler.formatter, JsonFormatter)
    assert root.level == logging.INFO

    logging.getLogger("kiln.test.root").info("to stderr")
    err = capsys.readouterr().err.strip().splitlines()
    assert json.loads(err[-1])["message"] == "to stderr"


def test_configure_logging_rejects_unknown_level(restore_root_logger: logging.Logger) -> None:
    with pytest.raises(ValueError, match="LOUD"):
        configure_logging("LOUD", "json")


@pytest.mark.parametrize(
    ("secret", "expected"),
    [
        ("", "****"),
        ("abc", "****"),
        ("12345678", "****"),
        ("123456789", "****6789"),
        ("hf_abcdefghijklmnop", "****mnop"),
    ],
)
def test_redact(secret: str, expected: str) -> None:
    assert redact(secret) == expected


def test_two_service_metrics_do_not_collide() -> None:
    img2img = ServiceMetrics("img2img")
    mesh = ServiceMetrics("mesh")
    assert img2img.registry is not mesh.registry
    img2img.observe_request("Generate", "OK", 0.2)
    assert img2img.registry.get_sample_value(
        "kiln_requests_total", {"service": "img2img", "method": "Generate", "code": "OK"}
    ) == pytest.approx(1.0)
    assert (
        mesh.registry.get_sample_value("kiln_requests_total", {"service": "mesh", "method": "Generate", "code": "OK"})
        is None
    )


def test_same_service_twice_in_one_process() -> None:
    # Two servers of the same kind in one test process must not share (or clash on) metrics.
    first, second = ServiceMetrics("img2img"), ServiceMetrics("img2img")
    first.queue_depth.set(3)
    labels = {"service": "img2img"}
    assert first.registry.get_sample_value("kiln_queue_depth", labels) == 3
    assert second.registry.get_sample_value("kiln_queue_depth", labels) == 0


def test_given_registry_is_used() -> None:
    registry = CollectorRegistry()
    metrics = ServiceMetrics("mesh", registry=registry)
    assert metrics.registry is registry


def test_observe_request_counts_and_times() -> None:
    metrics = ServiceMetrics("img2img")
    metrics.observe_request("Generate", "OK", 0.5)
    metrics.observe_request("Generate", "OK", 1.5)
    metrics.observe_request("Generate", "INVALID_ARGUMENT", 0.001)
    get = metrics.registry.get_sample_value
    assert get("kiln_requests_total", {"service": "img2img", "method": "Generate", "code": "OK"}) == 2
    assert get("kiln_requests_total", {"service": "img2img", "method": "Generate", "code": "INVALID_ARGUMENT"}) == 1
    labels = {"service": "img2img", "method": "Generate"}
    assert get("kiln_request_duration_seconds_count", labels) == 3
    assert get("kiln_request_duration_seconds_sum", labels) == pytest.approx(2.001)
    # Buckets reach from 1 ms to 10 min.
    assert get("kiln_request_duration_seconds_bucket", {**labels, "le": "0.001"}) == 1
    assert get("kiln_request_duration_seconds_bucket", {**labels, "le": "600.0"}) == 3


def test_service_gauges_and_phase() -> None:
    metrics = ServiceMetrics("mesh")
    metrics.inflight_runs.inc()
    metrics.model_load.set(12.5)
    metrics.in_progress_for("Generate").inc()
    metrics.observe_phase("run", 3.0)
    get = metrics.registry.get_sample_value
    assert get("kiln_inflight_runs", {"service": "mesh"}) == 1
    assert get("kiln_model_load_seconds", {"service": "mesh"}) == 12.5
    assert get("kiln_requests_in_progress", {"service": "mesh", "method": "Generate"}) == 1
    assert get("kiln_phase_duration_seconds_count", {"service": "mesh", "phase": "run"}) == 1


def test_metrics_server_serves_registry() -> None:
    metrics = ServiceMetrics("img2img")
    metrics.observe_request("Generate", "OK", 0.01)
    server, port = start_metrics_server(metrics.registry, "127.0.0.1", 0)
    try:
        assert port > 0
        assert server.port == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            body = response.read().decode()
        assert 'kiln_requests_total{code="OK",method="Generate",service="img2img"} 1.0' in body
        assert "kiln_queue_depth" in body
    finally:
        server.shutdown()
    server.close()  # closing again is harmless


def test_metrics_server_context_manager_closes_socket() -> None:
    registry = ServiceMetrics("mesh").registry
    with start_metrics_server(registry, "127.0.0.1", 0)[0] as server:
        port = server.port
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
