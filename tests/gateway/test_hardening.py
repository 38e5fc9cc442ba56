"""Hardening of the public listener: rendered fields, and the limits against a real Envoy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import yaml  # type: ignore[import-untyped]

from deploy.dev_ca import issue, make_ca
from gateway.kiln_gateway import Envoy, GatewaySettings, edge, render_config, validate_config
from gateway.kiln_gateway.edge import FIXED_HEAP, RATE_LIMIT_FILTER
from tests.gateway.conftest import envoy_running, kiln_server

INFO_PATH = "/v1/img2img/info"


def settings(**fields: Any) -> GatewaySettings:
    return GatewaySettings(_env_file=None, **fields)


def rendered(**fields: Any) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(render_config(settings(**fields)))
    return config


def manager(config: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = manager(config)["route_config"]["virtual_hosts"][0]["routes"]
    return found


def static_headers(route: dict[str, Any]) -> dict[str, str]:
    return {entry["header"]["key"]: entry["header"]["value"] for entry in route["response_headers_to_add"]}


def test_connection_manager_hardening_from_settings() -> None:
    hcm = manager(rendered(hardening={"xff_num_trusted_hops": 2, "max_headers_count": 50, "max_concurrent_streams": 7}))
    assert hcm["use_remote_address"] is True and hcm["xff_num_trusted_hops"] == 2
    assert hcm["normalize_path"] is True and hcm["merge_slashes"] is True
    assert hcm["path_with_escaped_slashes_action"] == "REJECT_REQUEST"
    assert hcm["common_http_protocol_options"]["max_headers_count"] == 50
    assert hcm["common_http_protocol_options"]["headers_with_underscores_action"] == "DROP_HEADER"
    assert hcm["max_request_headers_kb"] == 32
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] == 7
    assert hcm["http2_protocol_options"]["initial_stream_window_size"] < 256 << 20  # Envoy's default


def test_admin_stays_on_loopback_even_when_the_listener_is_public() -> None:
    config = rendered(host="0.0.0.0", auth={"allow_anonymous": True})
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert config["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] == "0.0.0.0"


def test_overload_manager_sheds_load_before_the_heap_runs_out() -> None:
    overload = rendered(hardening={"max_heap_bytes": 512 << 20})["overload_manager"]
    (heap,) = [monitor for monitor in overload["resource_monitors"] if monitor["name"] == FIXED_HEAP]
    assert heap["typed_config"]["max_heap_size_bytes"] == 512 << 20
    thresholds = {action["name"]: action["triggers"][0]["threshold"]["value"] for action in overload["actions"]}
    assert thresholds == {
        "envoy.overload_actions.shrink_heap": 0.95,
        "envoy.overload_actions.stop_accepting_requests": 0.98,
    }
    off = rendered(hardening={"max_heap_bytes": 0})["overload_manager"]
    assert off["actions"] == [] and all(monitor["name"] != FIXED_HEAP for monitor in off["resource_monitors"])


def test_security_headers_on_the_page_only() -> None:
    all_routes = routes(rendered())
    page = [route for route in all_routes if "direct_response" in route]
    api = [route for route in all_routes if "direct_response" not in route]
    assert page and api
    for route in page:
        headers = static_headers(route)
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-frame-options"] == "DENY" and headers["referrer-policy"] == "no-referrer"
        assert headers["x-content-type-options"] == "nosniff"
        assert "strict-transport-security" not in headers  # plaintext: HSTS would mean nothing
    assert all("content-security-policy" not in str(route.get("response_headers_to_add", "")) for route in api)


def test_hsts_when_tls_is_on(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    gateway = issue(ca, tmp_path, "gateway", hosts=["localhost"])
    page = [
        r for r in routes(rendered(tls={"cert_file": gateway.cert, "key_file": gateway.key})) if "direct_response" in r
    ]
    assert static_headers(page[0])["strict-transport-security"] == "max-age=31536000"


def test_rate_limit_off_renders_nothing() -> None:
    config = rendered()
    assert all(f["name"] != RATE_LIMIT_FILTER for f in manager(config)["http_filters"])
    assert RATE_LIMIT_FILTER not in str(routes(config))


def test_rate_limit_is_off_for_the_page() -> None:
    config = rendered(rate_limit={"requests_per_s": 5, "burst": 10})
    for route in routes(config):
        per_route = route.get("typed_per_filter_config", {}).get(RATE_LIMIT_FILTER)
        if "direct_response" in route:
            assert per_route is not None and "filter_enabled" not in per_route
        else:
            assert per_route is None  # the listener-wide limit applies, one bucket per caller
    (limit,) = [f["typed_config"] for f in manager(config)["http_filters"] if f["name"] == RATE_LIMIT_FILTER]
    assert limit["descriptors"][0]["token_bucket"] == {
        "max_tokens": 10,
        "tokens_per_fill": 1,
        "fill_interval": "0.200s",
    }


@pytest.mark.parametrize("rate", [0.001, 3, 25, 1000])
def test_any_rate_renders_a_bucket_envoy_accepts(tmp_path: Path, rate: float) -> None:
    config = settings(rate_limit={"requests_per_s": rate, "burst": 1})
    (filter_,) = edge.http_filters(config)
    bucket = filter_["typed_config"]["token_bucket"]
    interval = float(bucket["fill_interval"].removesuffix("s"))
    assert bucket["tokens_per_fill"] / interval == pytest.approx(rate, rel=0.01)
    path = tmp_path / "envoy.yaml"
    path.write_text(render_config(config))
    validate_config(path)  # e.g. Envoy refuses a refill interval under 50 ms


def test_tls_rate_limit_and_hardening_config_validates(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    gateway = issue(ca, tmp_path, "gateway", hosts=["localhost", "127.0.0.1"])
    client = issue(ca, tmp_path, "gateway-client", client=True)
    path = tmp_path / "envoy.yaml"
    config = settings(
        host="0.0.0.0",
        auth={"allow_anonymous": True},
        img2img_upstreams=["kiln-img2img:50051"],
        rate_limit={"requests_per_s": 2.5, "burst": 5},
        hardening={"xff_num_trusted_hops": 1, "max_heap_bytes": 256 << 20},
        tls={
            "cert_file": gateway.cert,
            "key_file": gateway.key,
            "upstream_ca_file": ca.cert,
            "upstream_client_cert_file": client.cert,
            "upstream_client_key_file": client.key,
        },
    )
    path.write_text(render_config(config))
    validate_config(path)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def envoy(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Envoy]:
    async with (
        kiln_server("img2img", tmp_path_factory.mktemp("hardening") / "img2img") as server,
        envoy_running([server.port], hardening={"max_headers_count": 30}) as running,
    ):
        yield running


async def _curl_status(port: int, path: str, *args: str) -> int:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "--path-as-is", *args,
        f"http://127.0.0.1:{port}{path}",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    return int(out)


async def _curl_body(port: int, path: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--max-time", "10", "--path-as-is", f"http://127.0.0.1:{port}{path}",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    body: dict[str, Any] = json.loads(out)
    return body


@pytest.mark.asyncio(loop_scope="module")
async def test_too_many_headers_is_431(envoy: Envoy) -> None:
    few = [arg for index in range(5) for arg in ("-H", f"x-extra-{index}: 1")]
    many = [arg for index in range(40) for arg in ("-H", f"x-extra-{index}: 1")]
    assert await _curl_status(envoy.port, INFO_PATH, *few) == 200
    assert await _curl_status(envoy.port, INFO_PATH, *many) == 431


@pytest.mark.asyncio(loop_scope="module")
async def test_slashes_are_merged_and_escaped_slashes_refused(envoy: Envoy) -> None:
    assert await _curl_status(envoy.port, "//v1//img2img/info") == 200
    assert await _curl_status(envoy.port, "/v1/img2img/./info") == 200
    assert await _curl_status(envoy.port, "/v1%2Fimg2img/info") == 400
    body = await _curl_body(envoy.port, "/v1/artifacts/01M8BRC3EP29HK3C17SXJ4WSHZ/%2e%2e%2fsecret")
    assert body["code"] == 3 and "encoded slash" in body["message"]


@pytest.mark.asyncio(loop_scope="module")
async def test_page_carries_security_headers(envoy: Envoy) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}") as client:
        page = await client.get("/")
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-frame-options"] == "DENY" and page.headers["referrer-policy"] == "no-referrer"


@pytest.mark.asyncio(loop_scope="module")
async def test_overload_manager_answers_503_when_the_heap_budget_is_spent(envoy: Envoy) -> None:
    # A budget Envoy's heap exceeds from the start: every new request is shed, none reaches a server.
    upstream = int(envoy.settings.img2img_upstreams[0].rpartition(":")[2])
    async with envoy_running([upstream], hardening={"max_heap_bytes": 1 << 20}) as starved:
        deadline = asyncio.get_running_loop().time() + 20
        while (status := await _curl_status(starved.port, INFO_PATH)) != 503:
            assert asyncio.get_running_loop().time() < deadline, status
            await asyncio.sleep(0.1)
        assert "overload.envoy.overload_actions.stop_accepting_requests.active: 1" in starved.admin(
            "/stats?filter=stop_accepting_requests.active"
        )
