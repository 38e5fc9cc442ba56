"""Every request cap is derived from `limits.max_image_bytes`, and retries follow one table.

No sockets: the rendered Envoy config, the client's channel options and the server settings
are compared with the formulas in `kiln_client.limits`, for the default limit and another one,
so a cap changed in one place alone fails here. The retry decision table in ARCHITECTURE.md is
parsed and checked against the Python client's rule and the servers' `retriable` flags.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml  # type: ignore[import-untyped]

from gateway.kiln_gateway import GatewaySettings, render_config
from kiln_client import _base
from kiln_client._stream import retriable
from kiln_client.errors import KilnError as ClientError
from kiln_client.limits import (
    DEFAULT_MAX_IMAGE_BYTES,
    max_json_request_bytes,
    max_request_message_bytes,
    retry_buffer_bytes,
)
from kiln_runtime import errors as server_errors
from kiln_runtime.settings import LimitsSettings
from tests.unit.test_error_reasons import ERRORS

MiB = 1 << 20
ARCHITECTURE = Path(__file__).resolve().parents[2] / "ARCHITECTURE.md"
LIMITS = [DEFAULT_MAX_IMAGE_BYTES, 7 * MiB + 3]


def test_the_formulas_leave_room_above_the_limit() -> None:
    limit = DEFAULT_MAX_IMAGE_BYTES
    assert limit == 20 * MiB
    # A request with an image somewhat over the limit must still reach the server's own check.
    assert max_request_message_bytes(limit) >= 2 * limit
    # base64 of the largest message, with room for the JSON around it.
    assert max_json_request_bytes(limit) >= max_request_message_bytes(limit) * 4 // 3
    # A request within the limit fits the retry buffer.
    assert limit < retry_buffer_bytes(limit) < max_request_message_bytes(limit)


@pytest.mark.parametrize("limit", LIMITS)
def test_server_receive_cap_follows_the_limit(limit: int) -> None:
    assert LimitsSettings(max_image_bytes=limit).max_request_bytes == max_request_message_bytes(limit)


def test_server_default_is_the_shared_default() -> None:
    assert LimitsSettings().max_image_bytes == DEFAULT_MAX_IMAGE_BYTES


@pytest.mark.parametrize("limit", LIMITS)
def test_client_send_cap_follows_the_limit(limit: int) -> None:
    options = dict(_base._channel_options(4 * MiB, limit))
    assert options["grpc.max_send_message_length"] == max_request_message_bytes(limit)
    assert options["grpc.max_receive_message_length"] == 4 * MiB
    signature = inspect.signature(_base._ClientCore.__init__)
    assert signature.parameters["max_image_bytes"].default == DEFAULT_MAX_IMAGE_BYTES


def rendered(**fields: Any) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(render_config(GatewaySettings(_env_file=None, **fields)))  # type: ignore[call-arg]
    return config


def manager(config: dict[str, Any]) -> dict[str, Any]:
    (listener,) = config["static_resources"]["listeners"]
    typed: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def http_filter(config: dict[str, Any], suffix: str) -> dict[str, Any]:
    (found,) = [f["typed_config"] for f in manager(config)["http_filters"] if f["name"].endswith(suffix)]
    return found


def kiln_routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    routes = manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    return [route for route in routes if "route" in route]


@pytest.mark.parametrize("limit", [None, *LIMITS])
def test_envoy_caps_follow_the_limit(limit: int | None) -> None:
    config = rendered() if limit is None else rendered(max_image_bytes=limit)
    limit = limit or DEFAULT_MAX_IMAGE_BYTES
    assert http_filter(config, "grpc_json_transcoder")["max_request_body_size"] == max_json_request_bytes(limit)
    assert http_filter(config, ".buffer")["max_request_bytes"] == max_json_request_bytes(limit)
    # Off by default (gRPC streams must never wait for their end here) ...
    (buffer_filter,) = [f for f in manager(config)["http_filters"] if f["name"].endswith(".buffer")]
    assert buffer_filter["disabled"] is True
    routes = kiln_routes(config)
    assert routes
    for route in routes:
        assert route["request_body_buffer_limit"] == retry_buffer_bytes(limit), route["match"]
        per_filter = route.get("typed_per_filter_config", {}).get("envoy.filters.http.buffer")
        if route["match"]["prefix"].startswith("/kiln."):
            assert per_filter is None, route["match"]  # gRPC and gRPC-Web stream through
        else:  # ... and on for the REST routes, where JSON bodies arrive
            assert per_filter["buffer"]["max_request_bytes"] == max_json_request_bytes(limit), route["match"]
    (too_large,) = [
        mapper
        for mapper in manager(config)["local_reply_config"]["mappers"]
        if mapper["filter"].get("status_code_filter", {}).get("comparison", {}).get("op") == "EQ"
        and mapper["filter"]["status_code_filter"]["comparison"]["value"]["default_value"] == 413
    ]
    body = too_large["body_format_override"]["json_format"]
    assert body["code"] == 3
    (violation,) = body["details"][0]["fieldViolations"]
    assert violation["field"] == "image" and f"images up to {limit} bytes" in violation["description"]


def test_envoy_retries_what_the_servers_mark_and_connection_failures_only() -> None:
    config = rendered(num_retries=2)
    for route in kiln_routes(config):
        policy = route["route"]["retry_policy"]
        assert set(policy["retry_on"].split(",")) == {
            "connect-failure",
            "refused-stream",
            "reset-before-request",
            "retriable-headers",
        }
        assert policy["retriable_headers"] == [
            {"name": server_errors.RETRIABLE_HEADER, "string_match": {"exact": "true"}}
        ]
    for cluster in config["static_resources"]["clusters"]:
        (threshold,) = cluster["circuit_breakers"]["thresholds"]
        assert "max_retries" not in threshold
        assert threshold["retry_budget"]["budget_percent"]["value"] == 20.0
        assert threshold["retry_budget"]["min_retry_concurrency"] >= 1


def decision_table() -> list[dict[str, str]]:
    """The rows of the Retries table in ARCHITECTURE.md, keyed by its header."""
    lines = ARCHITECTURE.read_text().splitlines()
    start = lines.index("| status | ErrorInfo reason | what happened | Envoy | Python client | page | delay |")
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append(dict(zip(header, cells, strict=True)))
    return rows


def test_the_table_covers_every_refusal_reason() -> None:
    reasons = {row["ErrorInfo reason"] for row in decision_table()}
    for error in ERRORS:
        if error.code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
            assert error.reason in reasons, f"{error.__name__} ({error.reason}) is missing from the Retries table"


@pytest.mark.parametrize("row", decision_table(), ids=lambda row: f"{row['status']}/{row['ErrorInfo reason']}")
def test_the_code_follows_the_table(row: dict[str, str]) -> None:
    status, reason = row["status"], row["ErrorInfo reason"]
    if status not in grpc.StatusCode.__members__:
        # The catch-all rows: nothing else is retried by anyone.
        assert row["Envoy"] == row["Python client"] == row["page"] == "no"
        for code in grpc.StatusCode:
            if code not in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                assert not retriable(ClientError("x", code=code, reason=code.name)), code
        return
    reason = "" if reason == "(none)" else reason
    code = grpc.StatusCode[status]
    assert retriable(ClientError("x", code=code, reason=reason)) is (row["Python client"] == "yes")
    assert row["page"] == "no"  # the page retries only when a person presses Retry
    server_classes = [error for error in ERRORS if error.reason == reason]
    if reason:  # refused by a Kiln server: Envoy retries exactly what the server marks
        assert server_classes, f"no server error with reason {reason}"
        for cls in server_classes:
            assert cls.code is code, cls
            assert cls.retriable is (row["Envoy"] == "yes"), cls
