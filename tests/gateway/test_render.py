"""Every rendered config passes `envoy --mode validate`; settings parse like the servers' settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

import kiln_client
from gateway.kiln_gateway import Envoy, EnvoyError, GatewaySettings, render_config, validate_config
from gateway.kiln_gateway.render import HEALTH_PATH, SESSION_FILTER, SESSION_HEADER
from gateway.kiln_gateway.settings import PLACEHOLDER_WEB_ROOT


def settings(**fields: object) -> GatewaySettings:
    return GatewaySettings(_env_file=None, **fields)  # type: ignore[arg-type]


def http_filters(config: dict[str, Any]) -> list[dict[str, Any]]:
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    filters: list[dict[str, Any]] = manager["http_filters"]
    return filters


def http_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The typed_config of the HTTP filter named `envoy.filters.http.<name>`."""
    (found,) = [f["typed_config"] for f in http_filters(config) if f["name"] == f"envoy.filters.http.{name}"]
    typed: dict[str, Any] = found
    return typed


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {
                "img2img_upstreams": ["127.0.0.1:50051", "127.0.0.1:50061", "localhost:50071"],
                "mesh_upstreams": ["10.0.0.7:50052", "kiln-mesh.default.svc.cluster.local:50052"],
            },
            id="replicas",
        ),
        pytest.param(
            {"cors_allowed_origins": ["http://127.0.0.1:8081", "https://app.example.com", "http://localhost:3000"]},
            id="cors-origins",
        ),
        pytest.param(
            {
                "host": "0.0.0.0",
                "auth": {"allow_anonymous": True},  # off loopback, mode none must be asked for
                "port": 0,
                "admin_port": 0,
                "stream_idle_timeout_s": 0.5,
                "num_retries": 0,
            },
            id="edges",
        ),
    ],
)
def test_rendered_config_validates(tmp_path: Path, fields: dict[str, object]) -> None:
    path = tmp_path / "envoy.yaml"
    path.write_text(render_config(settings(**fields)))
    validate_config(path)


def test_config_has_the_recipe_must_haves() -> None:
    config = yaml.safe_load(render_config(settings(img2img_upstreams=["127.0.0.1:1", "127.0.0.1:2"])))
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    (listener,) = config["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"].rsplit(".", 1)[1] for f in manager["http_filters"]]
    assert names == [
        "health_check",
        "compressor",
        "cors",
        "stateful_session",
        "grpc_web",
        "auth",  # kiln.auth: removes a client's principal header (and checks credentials when on)
        "lua",
        "buffer",
        "grpc_json_transcoder",
        "router",
    ]
    health_check = manager["http_filters"][0]["typed_config"]
    assert health_check["pass_through_mode"] is False
    assert health_check["headers"] == [{"name": ":path", "string_match": {"exact": HEALTH_PATH}}]
    transcoder = http_filter(config, "grpc_json_transcoder")
    assert transcoder["max_response_body_size"] == 16 << 20
    assert transcoder["print_options"]["stream_sse_style_delimited"] is True
    assert Path(transcoder["proto_descriptor"]).is_absolute()
    all_routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    pages = [r for r in all_routes if "direct_response" in r]
    routes = [r for r in all_routes if "direct_response" not in r]
    assert pages[0]["match"] == {"path": "/"} and pages[0]["direct_response"]["body"]["filename"].endswith("index.html")
    prefixes = [r["match"]["prefix"] for r in routes]
    assert prefixes == [
        "/kiln.img2img.v1.Img2ImgProvider/",
        "/v1/img2img",
        "/kiln.mesh.v1.MeshProvider/",
        "/v1/mesh",
        "/kiln.artifacts.v1.ArtifactProvider/",
        "/v1/artifacts/",  # with a `signature` query parameter: a signed link, no credentials needed
        "/v1/artifacts",
    ]
    for route in routes:
        assert route["route"]["timeout"] == "0s"
        assert "max_stream_duration" not in route["route"]
    img2img = config["static_resources"]["clusters"][0]
    assert len(img2img["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2
    assert img2img["health_checks"][0]["no_traffic_interval"] == "5s"


def test_session_header_picks_the_replica_but_never_strictly() -> None:
    config = yaml.safe_load(render_config(settings(img2img_upstreams=["127.0.0.1:1", "127.0.0.1:2"])))
    session = http_filter(config, SESSION_FILTER.rsplit(".", 1)[1])
    state = session["session_state"]
    assert state["name"] == "envoy.http.stateful_session.header"
    assert state["typed_config"]["name"] == SESSION_HEADER == "x-kiln-session"
    # A request naming a replica that is gone goes to another one (which answers from the store).
    assert session["strict"] is False
    # Balancing of requests without the header is unchanged.
    assert {cluster["lb_policy"] for cluster in config["static_resources"]["clusters"]} == {"LEAST_REQUEST"}
    # Jobs live on one replica; downloads come from the shared store on any, so no affinity there.
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = [r for r in manager["route_config"]["virtual_hosts"][0]["routes"] if "route" in r]
    off = {r["match"]["prefix"] for r in routes if r.get("typed_per_filter_config", {}).get(SESSION_FILTER)}
    # "/v1/artifacts/": the signed-link route (auth.apply_to_routes), a copy of the artifacts route.
    assert off == {"/kiln.artifacts.v1.ArtifactProvider/", "/v1/artifacts", "/v1/artifacts/"}
    for route in routes:
        if route["match"]["prefix"] in off:
            assert route["typed_per_filter_config"][SESSION_FILTER]["disabled"] is True


def test_session_header_is_the_clients() -> None:
    """The Python client keeps its own copy of the name (it does not import the gateway)."""
    assert kiln_client.SESSION_HEADER == SESSION_HEADER


def test_browsers_may_send_and_read_the_session_header() -> None:
    config = yaml.safe_load(render_config(settings(cors_allowed_origins=["https://app.example.com"])))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    policy = manager["route_config"]["virtual_hosts"][0]["typed_per_filter_config"]["envoy.filters.http.cors"]
    assert SESSION_HEADER in policy["allow_headers"].split(",")
    assert SESSION_HEADER in policy["expose_headers"].split(",")


def test_lists_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_GATEWAY__IMG2IMG_UPSTREAMS", "a:1, b:2")
    monkeypatch.setenv("KILN_GATEWAY__MESH_UPSTREAMS", '["c:3"]')
    monkeypatch.setenv("KILN_GATEWAY__CORS_ALLOWED_ORIGINS", "http://x:1,https://y")
    monkeypatch.setenv("KILN_GATEWAY__PORT", "8181")
    parsed = settings()
    assert parsed.img2img_upstreams == ["a:1", "b:2"]
    assert parsed.mesh_upstreams == ["c:3"]
    assert parsed.cors_allowed_origins == ["http://x:1", "https://y"]
    assert parsed.port == 8181


@pytest.mark.parametrize("upstream", ["nohost", "h:", "h:0", "h:70000", ":50051"])
def test_bad_upstream_rejected(upstream: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        settings(img2img_upstreams=[upstream])


def test_every_field_has_a_description() -> None:
    for name, field in GatewaySettings.model_fields.items():
        assert field.description, name


def test_invalid_config_raises_with_envoys_reason(tmp_path: Path) -> None:
    broken = settings(port=0, admin_port=0, descriptor_path=tmp_path / "missing.binpb")
    with pytest.raises(EnvoyError, match=r"missing\.binpb"):
        Envoy(broken, state_dir=tmp_path).start()


@pytest.mark.parametrize(
    ("stream_format", "sse", "ndjson"), [("sse", True, False), ("ndjson", False, True), ("array", False, False)]
)
def test_json_stream_format(stream_format: str, sse: bool, ndjson: bool) -> None:
    config = yaml.safe_load(render_config(settings(json_stream_format=stream_format)))
    options = http_filter(config, "grpc_json_transcoder")["print_options"]
    assert options["stream_sse_style_delimited"] is sse
    assert options["stream_newline_delimited"] is ndjson


def test_web_root_files_are_served_with_their_media_types(tmp_path: Path) -> None:
    (tmp_path / "index.html").write_text("<!doctype html><title>t</title>")
    (tmp_path / "app.js").write_text("console.log(1)")
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "big.bin").write_bytes(b"x" * (3 << 20))
    config = yaml.safe_load(render_config(settings(web_root=tmp_path)))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    served = {
        r["match"]["path"]: {h["header"]["key"]: h["header"]["value"] for h in r["response_headers_to_add"]}
        for r in manager["route_config"]["virtual_hosts"][0]["routes"]
        if "direct_response" in r
    }
    assert set(served) == {"/", "/index.html", "/app.js", "/assets/big.bin"}
    assert served["/"]["content-type"] == "text/html; charset=utf-8"
    assert served["/app.js"]["content-type"].startswith(("application/javascript", "text/javascript"))
    assert served["/assets/big.bin"]["content-type"] == "application/octet-stream"
    # The direct-response cap grows to the largest file, or Envoy would refuse the config.
    assert manager["route_config"]["max_direct_response_body_size_bytes"] >= 3 << 20


def test_web_root_without_index_serves_the_placeholder(tmp_path: Path) -> None:
    config = yaml.safe_load(render_config(settings(web_root=tmp_path)))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    (page,) = [r for r in manager["route_config"]["virtual_hosts"][0]["routes"] if r["match"].get("path") == "/"]
    assert Path(page["direct_response"]["body"]["filename"]) == PLACEHOLDER_WEB_ROOT.resolve() / "index.html"


def test_named_web_files_are_served_without_reading_the_disk(tmp_path: Path) -> None:
    # A container render names the files the image will hold; none of them exists here.
    web_root = tmp_path / "not-here"
    config = yaml.safe_load(render_config(settings(web_root=web_root), web_files=["index.html", "app.js"]))
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    served = {
        r["match"]["path"]: r["direct_response"]["body"]["filename"]
        for r in manager["route_config"]["virtual_hosts"][0]["routes"]
        if "direct_response" in r
    }
    assert served == {
        "/": str(web_root / "index.html"),
        "/index.html": str(web_root / "index.html"),
        "/app.js": str(web_root / "app.js"),
    }
    assert manager["route_config"]["max_direct_response_body_size_bytes"] == 4 << 20


def test_named_web_files_need_an_index() -> None:
    with pytest.raises(ValueError, match=r"index\.html"):
        render_config(settings(), web_files=["app.js"])
