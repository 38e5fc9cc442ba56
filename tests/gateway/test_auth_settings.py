"""Auth settings, the keys file check and the rendered auth config, without a running gateway:
the refusal of an anonymous gateway off loopback, incomplete modes, the keys file format, and a
config that names a keys file or JWKS only the machine running Envoy has."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml  # type: ignore[import-untyped]
from pydantic import ValidationError

from gateway.kiln_gateway import auth
from gateway.kiln_gateway.launcher import validate_config
from gateway.kiln_gateway.render import render_config
from gateway.kiln_gateway.settings import GatewaySettings, is_loopback
from tests.gateway.auth_support import ISSUER, Issuer, write_keys_file

ROOT = Path(__file__).resolve().parents[2]


def settings(**fields: object) -> GatewaySettings:
    return GatewaySettings(_env_file=None, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_may_run_without_auth(host: str) -> None:
    assert is_loopback(host)
    assert settings(host=host).auth.mode == "none"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "gateway.example.com"])
def test_anonymous_gateway_off_loopback_is_refused(host: str) -> None:
    with pytest.raises(ValidationError, match="ALLOW_ANONYMOUS"):
        settings(host=host)
    assert settings(host=host, auth={"allow_anonymous": True}).auth.mode == "none"
    assert settings(host=host, auth={"mode": "api_key", "api_keys_file": "/etc/kiln/auth/api-keys"})


def test_module_refuses_anonymous_on_every_interface() -> None:
    env = {**os.environ, "KILN_GATEWAY__HOST": "0.0.0.0", "KILN_GATEWAY__AUTH__MODE": "none", "KILN_GATEWAY__PORT": "0"}
    result = subprocess.run(
        [sys.executable, "-m", "gateway.kiln_gateway"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "anyone who can reach it could run jobs" in result.stderr
    assert "Traceback" not in result.stderr


def test_module_refuses_a_missing_keys_file(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KILN_GATEWAY__PORT": "0",
        "KILN_GATEWAY__ADMIN_PORT": "0",
        "KILN_GATEWAY__AUTH__MODE": "api_key",
        "KILN_GATEWAY__AUTH__API_KEYS_FILE": str(tmp_path / "absent"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "gateway.kiln_gateway"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "cannot read the API keys file" in result.stderr


def test_modes_need_their_settings() -> None:
    with pytest.raises(ValidationError, match="API_KEYS_FILE"):
        settings(auth={"mode": "api_key"})
    with pytest.raises(ValidationError, match="ISSUER"):
        settings(auth={"mode": "jwt", "jwt": {"audiences": ["a"], "jwks_file": "/x"}})
    with pytest.raises(ValidationError, match="AUDIENCES"):
        settings(auth={"mode": "jwt", "jwt": {"issuer": ISSUER, "jwks_file": "/x"}})
    with pytest.raises(ValidationError, match="exactly one"):
        settings(auth={"mode": "jwt", "jwt": {"issuer": ISSUER, "audiences": ["a"]}})
    with pytest.raises(ValidationError, match="http"):
        settings(auth={"mode": "jwt", "jwt": {"issuer": ISSUER, "audiences": ["a"], "jwks_uri": "file:///x"}})


def test_environment_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_GATEWAY__AUTH__MODE", "jwt")
    monkeypatch.setenv("KILN_GATEWAY__AUTH__JWT__ISSUER", ISSUER)
    monkeypatch.setenv("KILN_GATEWAY__AUTH__JWT__AUDIENCES", "one,two")
    monkeypatch.setenv("KILN_GATEWAY__AUTH__JWT__JWKS_URI", "https://issuer.kiln.test/jwks.json")
    monkeypatch.setenv("KILN_GATEWAY__AUTH__JWT__PRINCIPAL_CLAIM", "email")
    jwt = GatewaySettings(_env_file=None).auth.jwt
    assert (jwt.audiences, jwt.principal_claim, jwt.services_claim) == (["one", "two"], "email", "kiln_services")


def test_keys_file_format() -> None:
    keys = auth.parse_api_keys("# comment\n\nalice k1\n  bob k2 img2img\n  # indented comment\ncarol k3 img2img,mesh\n")
    assert [(key.name, key.services) for key in keys] == [
        ("alice", None),
        ("bob", frozenset({"img2img"})),
        ("carol", frozenset({"img2img", "mesh"})),
    ]
    for text, error in [
        ("alice\n", "line 1: expected"),
        ("alice k1 img2img extra\n", "expected"),
        ("alice k1 video\n", "services must be from"),
        ("alice k1\nalice k2\n", "line 2: the name 'alice'"),
        ("alice k1\nbob k1\n", "a key is used twice"),
    ]:
        with pytest.raises(ValueError, match=error) as caught:
            auth.parse_api_keys(text)
        assert "k1" not in str(caught.value)  # a key is never echoed


def test_keys_file_check(tmp_path: Path) -> None:
    path = write_keys_file(tmp_path / "keys", ["alice k1"])
    assert auth.check_api_keys_file(settings(auth={"mode": "api_key", "api_keys_file": path})) == []
    path.chmod(0o644)
    warnings = auth.check_api_keys_file(settings(auth={"mode": "api_key", "api_keys_file": path}))
    assert warnings and "chmod 600" in warnings[0]
    path.write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        auth.check_api_keys_file(settings(auth={"mode": "api_key", "api_keys_file": path}))


def _filters(config: str) -> list[str]:
    listener = yaml.safe_load(config)["static_resources"]["listeners"][0]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return [entry["name"] for entry in manager["http_filters"]]


def test_api_key_config_names_a_file_it_does_not_read(tmp_path: Path) -> None:
    """The container render: the keys file exists only where Envoy runs (a mounted Secret)."""
    path = tmp_path / "envoy.yaml"
    config = render_config(
        settings(host="0.0.0.0", auth={"mode": "api_key", "api_keys_file": "/etc/kiln/auth/api-keys"})
    )
    path.write_text(config)
    validate_config(path)
    assert "/etc/kiln/auth/api-keys" in config
    assert auth.AUTH_FILTER in _filters(config) and auth.JWT_FILTER not in _filters(config)


def test_no_query_string_in_the_access_log_format() -> None:
    config = render_config(settings())
    assert "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%" in config
    assert "%REQ(:PATH)%" not in auth.ACCESS_LOG_FORMAT and "AUTHORIZATION" not in auth.ACCESS_LOG_FORMAT.upper()


@pytest.mark.parametrize(
    "jwks", ["file", "https://issuer.kiln.test/.well-known/jwks.json", "http://127.0.0.1:9/jwks.json"]
)
def test_jwt_configs_validate(tmp_path: Path, jwks: str) -> None:
    source = (
        {"jwks_file": str(Issuer.new().write_jwks(tmp_path / "jwks.json"))} if jwks == "file" else {"jwks_uri": jwks}
    )
    config = render_config(settings(auth={"mode": "jwt", "jwt": {"issuer": ISSUER, "audiences": ["kiln"], **source}}))
    path = tmp_path / "envoy.yaml"
    path.write_text(config)
    validate_config(path)
    filters = _filters(config)
    assert filters.index(auth.JWT_FILTER) + 1 == filters.index(auth.AUTH_FILTER)
    clusters = [cluster["name"] for cluster in yaml.safe_load(config)["static_resources"]["clusters"]]
    assert (auth.JWKS_CLUSTER in clusters) == (jwks != "file")


def test_banner_says_anyone_may_run_jobs(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KILN_GATEWAY__PORT": "0",
        "KILN_GATEWAY__ADMIN_PORT": "0",
        "KILN_GATEWAY__IMG2IMG_UPSTREAMS": "127.0.0.1:1",
        "KILN_GATEWAY__MESH_UPSTREAMS": "127.0.0.1:2",
        "KILN_GATEWAY__AUTH__MODE": "none",
    }
    with subprocess.Popen(
        [sys.executable, "-m", "gateway.kiln_gateway", "--state-dir", str(tmp_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline().startswith("gateway on 127.0.0.1:")
            banner = process.stdout.readline()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=20) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert banner.startswith("auth: none — anyone who can reach 127.0.0.1:"), banner
    assert "may run jobs" in banner and "KILN_GATEWAY__AUTH__MODE=api_key" in banner
