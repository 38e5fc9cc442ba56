"""The gateway's container config: committed, fresh, accepted by Envoy, and served by its image.

deploy/k8s/base/envoy.yaml is rendered from the `make up` template with the container's layout
(/etc/kiln/...). Envoy reads the descriptor and the static files when it loads a config, so
`--mode validate` runs on a copy whose /etc/kiln points at a folder holding those files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
import yaml  # type: ignore[import-untyped]

from deploy.dev_ca import issue, make_ca
from gateway.kiln_gateway import Envoy, EnvoyError, GatewaySettings, validate_config
from gateway.kiln_gateway.container import (
    API_KEYS_FILE,
    CONFIG_PATH,
    CONTAINER_ROOT,
    TLS_CONFIG_PATH,
    WEB_FILES,
    container_settings,
    render_container_config,
    tls_fields,
)
from gateway.kiln_gateway.render import HEALTH_PATH
from tests.deploy.support import DOCKERFILES, ROOT, read_dockerfile, stages

DESCRIPTOR = ROOT / "gateway" / "kiln.binpb"


def stage_container_root(root: Path) -> None:
    """Lay out what the gateway image holds under /etc/kiln: the descriptor and the web bundle."""
    (root / "web").mkdir(parents=True)
    shutil.copy(DESCRIPTOR, root / "kiln.binpb")
    for name in WEB_FILES:
        (root / "web" / name).write_text(f"/* {name} */\n")


def named_paths(config_text: str) -> set[str]:
    """Every file the config makes Envoy read: the descriptor and each static file."""
    config = yaml.safe_load(config_text)
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    files = {r["direct_response"]["body"]["filename"] for r in routes if "direct_response" in r}
    transcoder = next(f for f in manager["http_filters"] if f["name"].endswith("grpc_json_transcoder"))
    return files | {transcoder["typed_config"]["proto_descriptor"]}


def test_committed_config_is_fresh() -> None:
    assert CONFIG_PATH.read_text() == render_container_config(), "run: python deploy/render_gateway.py"


def test_render_script_check_mode() -> None:
    script = ROOT / "deploy" / "render_gateway.py"
    fresh = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, check=False)
    assert fresh.returncode == 0, fresh.stderr


def test_the_render_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The committed file must not depend on who rendered it.
    monkeypatch.setenv("KILN_GATEWAY__PORT", "1234")
    monkeypatch.setenv("KILN_GATEWAY__IMG2IMG_UPSTREAMS", "elsewhere:1")
    assert render_container_config() == CONFIG_PATH.read_text()


def test_committed_config_passes_envoy_validate(tmp_path: Path) -> None:
    stage_container_root(tmp_path)
    text = CONFIG_PATH.read_text().replace(f"{CONTAINER_ROOT}/", f"{tmp_path}/")
    assert str(CONTAINER_ROOT) not in text
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    validate_config(path)


def test_validate_catches_a_missing_bundle_file(tmp_path: Path) -> None:
    # What validation proves: an image without app.css would not start.
    stage_container_root(tmp_path)
    (tmp_path / "web" / "app.css").unlink()
    path = tmp_path / "envoy.yaml"
    path.write_text(CONFIG_PATH.read_text().replace(f"{CONTAINER_ROOT}/", f"{tmp_path}/"))
    with pytest.raises(EnvoyError):
        validate_config(path)


def test_the_image_holds_every_file_the_config_names() -> None:
    instructions = read_dockerfile(DOCKERFILES["gateway"])
    final = stages(instructions)[""]
    provided: set[str] = set()
    for instruction in final:
        if instruction.keyword != "COPY":
            continue
        words = [w for w in instruction.words() if not w.startswith("--")]
        *sources, destination = words
        if destination.endswith("/"):
            provided |= {str(PurePosixPath(destination) / PurePosixPath(s).name) for s in sources}
        else:
            provided.add(destination)
    assert named_paths(CONFIG_PATH.read_text()) <= provided
    assert "/etc/envoy/envoy.yaml" in provided
    # The web files come from the web client's build, exactly the names the config serves.
    web_copy = next(i for i in final if i.keyword == "COPY" and "--from=web" in i.args)
    assert [PurePosixPath(w).name for w in web_copy.words()[1:-1]] == list(WEB_FILES)
    # ...and the config is the committed file.
    config_copy = next(i for i in final if i.keyword == "COPY" and i.words()[-1] == "/etc/envoy/envoy.yaml")
    assert ROOT / config_copy.words()[0] == CONFIG_PATH


@pytest.fixture
def envoy(tmp_path: Path) -> Iterator[Envoy]:
    settings = GatewaySettings(
        _env_file=None,
        port=0,
        admin_port=0,
        img2img_upstreams=["127.0.0.1:1"],
        mesh_upstreams=["127.0.0.1:2"],
    )
    with Envoy(settings, state_dir=tmp_path / "envoy") as running:
        yield running


def gateway_script(envoy: Envoy, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KILN_GATEWAY_PORT": str(envoy.port), "KILN_GATEWAY_ADMIN_PORT": str(envoy.admin_port)}
    return subprocess.run(
        ["bash", str(ROOT / "deploy" / "docker" / "gateway.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_healthz_and_the_prestop_drain_against_envoy(envoy: Envoy) -> None:
    # What the Docker HEALTHCHECK, the readiness probe and preStop do, against a real Envoy.
    healthy = gateway_script(envoy, "health")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert " 200" in healthy.stdout
    drain = gateway_script(envoy, "drain", "0")
    assert drain.returncode == 0, drain.stderr
    draining = gateway_script(envoy, "health")
    assert draining.returncode == 1
    assert " 503" in draining.stdout
    assert HEALTH_PATH == "/healthz"  # the path the script asks for


def test_gateway_script_rejects_unknown_commands(envoy: Envoy) -> None:
    assert gateway_script(envoy, "restart").returncode == 2


def filenames(node: object) -> Iterator[str]:
    """Every `filename` value anywhere in a config (data sources Envoy reads from disk)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "filename" and isinstance(value, str):
                yield value
            else:
                yield from filenames(value)
    elif isinstance(node, list):
        for item in node:
            yield from filenames(item)


def test_committed_tls_config_is_fresh() -> None:
    assert TLS_CONFIG_PATH.read_text() == render_container_config(tls=True), "run: python deploy/render_gateway.py"


def test_committed_tls_config_passes_envoy_validate(tmp_path: Path) -> None:
    # Envoy loads certificates with the config: stage them where the Secrets would be mounted.
    stage_container_root(tmp_path)
    ca = make_ca(tmp_path / "ca")
    for folder, name, client in (("gateway", "gateway", False), ("upstream", "gateway-client", True)):
        files = issue(ca, tmp_path / "ca", name, client=client)
        target = tmp_path / "tls" / folder
        target.mkdir(parents=True)
        shutil.copy(files.cert, target / "tls.crt")
        shutil.copy(files.key, target / "tls.key")
    shutil.copy(ca.cert, tmp_path / "tls" / "upstream" / "ca.crt")
    text = TLS_CONFIG_PATH.read_text().replace(f"{CONTAINER_ROOT}/", f"{tmp_path}/")
    assert str(CONTAINER_ROOT) not in text
    # Every certificate file of the TLS settings is one the config makes Envoy read.
    assert {str(path) for path in tls_fields(tmp_path).values()} <= set(filenames(yaml.safe_load(text)))
    path = tmp_path / "envoy.yaml"
    path.write_text(text)
    validate_config(path)
    # ...and validation is what would stop a gateway whose Secret lacks the client key.
    (tmp_path / "tls" / "upstream" / "tls.key").unlink()
    with pytest.raises(EnvoyError):
        validate_config(path)


def test_the_containers_check_api_keys_from_the_mounted_file() -> None:
    settings = container_settings()
    assert settings.auth.mode == "api_key"
    assert str(settings.auth.api_keys_file) == str(CONTAINER_ROOT / API_KEYS_FILE)
    assert str(CONTAINER_ROOT / API_KEYS_FILE) in CONFIG_PATH.read_text()
