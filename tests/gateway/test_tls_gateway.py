"""TLS at the gateway: HTTPS with ALPN towards clients, mutual TLS towards a real model server.

Certificates come from the development CA (deploy/dev_ca.py). One Envoy serves the module: TLS on
its listener, TLS with a client certificate towards an img2img server that accepts only clients
with a certificate from the same CA (the server side of that is the runtime's own test).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
import yaml  # type: ignore[import-untyped]
from pydantic import ValidationError

from deploy.dev_ca import CertFiles, issue, make_ca
from gateway.kiln_gateway import Envoy, GatewaySettings, render_config
from gateway.kiln_gateway.tls import DOWNSTREAM_ALPN, UPSTREAM_ALPN
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_client import AsyncImg2ImgClient
from kiln_client.errors import UnavailableError
from kiln_runtime.server import KilnServer
from tests.gateway.conftest import envoy_running, img2img_request, kiln_server, kinds


@dataclass(frozen=True)
class Pki:
    ca: CertFiles
    gateway: CertFiles  # the listener's server certificate (localhost, 127.0.0.1)
    server: CertFiles  # the img2img server's certificate
    gateway_client: CertFiles  # what the gateway presents to the servers


def make_pki(folder: Path) -> Pki:
    ca = make_ca(folder)
    return Pki(
        ca=ca,
        gateway=issue(ca, folder, "gateway"),
        server=issue(ca, folder, "img2img"),
        gateway_client=issue(ca, folder, "gateway-client", client=True),
    )


def tls_settings(pki: Pki, **overrides: Any) -> dict[str, Any]:
    return {
        "cert_file": pki.gateway.cert,
        "key_file": pki.gateway.key,
        "upstream_ca_file": pki.ca.cert,
        "upstream_client_cert_file": pki.gateway_client.cert,
        "upstream_client_key_file": pki.gateway_client.key,
        **overrides,
    }


# --- rendering ----------------------------------------------------------------------------------


def test_plaintext_by_default() -> None:
    config = yaml.safe_load(render_config(GatewaySettings(_env_file=None)))
    assert "transport_socket" not in config["static_resources"]["listeners"][0]["filter_chains"][0]
    assert all("transport_socket" not in cluster for cluster in config["static_resources"]["clusters"])


def test_tls_sockets_from_settings(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    settings = GatewaySettings(
        _env_file=None,
        img2img_upstreams=["kiln-img2img:50051"],
        mesh_upstreams=["10.0.0.7:50052", "10.0.0.8:50052"],
        tls=tls_settings(pki),
    )
    config = yaml.safe_load(render_config(settings))
    listener_tls = config["static_resources"]["listeners"][0]["filter_chains"][0]["transport_socket"]["typed_config"]
    common = listener_tls["common_tls_context"]
    assert common["alpn_protocols"] == DOWNSTREAM_ALPN == ["h2", "http/1.1"]
    assert common["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    # The codec still follows ALPN: h2 or http/1.1 on the one port.
    manager = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert manager["codec_type"] == "AUTO"
    clusters = {
        cluster["name"]: cluster["transport_socket"]["typed_config"]
        for cluster in config["static_resources"]["clusters"]
    }
    img2img = clusters["img2img"]
    assert img2img["sni"] == "kiln-img2img"
    assert img2img["common_tls_context"]["alpn_protocols"] == UPSTREAM_ALPN
    validation = img2img["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"]["filename"] == str(pki.ca.cert.resolve())
    assert validation["match_typed_subject_alt_names"] == [{"san_type": "DNS", "matcher": {"exact": "kiln-img2img"}}]
    assert img2img["common_tls_context"]["tls_certificates"][0]["certificate_chain"]["filename"] == str(
        pki.gateway_client.cert.resolve()
    )
    # IP addresses: no SNI, IP SANs, any of the cluster's replicas.
    mesh = clusters["mesh"]
    assert "sni" not in mesh
    assert [
        m["matcher"]["exact"] for m in mesh["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    ] == [
        "10.0.0.7",
        "10.0.0.8",
    ]


@pytest.mark.parametrize(
    "fields",
    [
        {"cert_file": "gateway.pem"},
        {"key_file": "gateway.key"},
        {"upstream_ca_file": "ca.pem", "upstream_client_cert_file": "client.pem"},
        {"upstream_client_cert_file": "client.pem", "upstream_client_key_file": "client.key"},
    ],
)
def test_tls_files_come_in_pairs(fields: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        GatewaySettings(_env_file=None, tls=fields)


# --- a real Envoy over TLS in front of a real server over mutual TLS -------------------------------


@dataclass
class Stack:
    pki: Pki
    envoy: Envoy
    server: KilnServer


def _healthy(envoy: Envoy, port: int) -> bool:
    prefix = f"img2img::127.0.0.1:{port}::health_flags::"
    return any(line == prefix + "healthy" for line in envoy.admin("/clusters").splitlines())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    folder = tmp_path_factory.mktemp("tls")
    pki = make_pki(folder / "pki")
    server_tls = {
        "tls_cert_file": pki.server.cert,
        "tls_key_file": pki.server.key,
        "tls_client_ca_file": pki.ca.cert,
    }
    async with (
        kiln_server("img2img", folder / "img2img", server=server_tls) as server,
        envoy_running([server.port], tls=tls_settings(pki)) as envoy,
    ):
        yield Stack(pki, envoy, server)


async def _curl(stack: Stack, *args: str, scheme: str = "https") -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_version} %{http_code}", "--max-time", "10", *args,
        f"{scheme}://127.0.0.1:{stack.envoy.port}/healthz",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@pytest.mark.asyncio(loop_scope="module")
async def test_curl_negotiates_h2_and_http1(stack: Stack) -> None:
    ca = str(stack.pki.ca.cert)
    assert await _curl(stack, "--http2", "--cacert", ca) == (0, "2 200", "")
    assert await _curl(stack, "--http1.1", "--cacert", ca) == (0, "1.1 200", "")


@pytest.mark.asyncio(loop_scope="module")
async def test_plaintext_and_unknown_ca_are_refused(stack: Stack) -> None:
    code, out, _ = await _curl(stack, scheme="http")
    assert code != 0 and not out.endswith("200")  # nothing is served unencrypted, not even a redirect
    code, _, err = await _curl(stack)  # the system's CAs do not know the development CA
    assert code == 60, err  # curl: peer certificate cannot be authenticated


@pytest.mark.asyncio(loop_scope="module")
async def test_python_client_with_the_ca_through_mutual_tls(stack: Stack) -> None:
    # Health checks pass over the same mutual-TLS socket as the calls.
    deadline = time.monotonic() + 20
    while not _healthy(stack.envoy, stack.server.port):
        assert time.monotonic() < deadline, stack.envoy.admin("/clusters")
        await asyncio.sleep(0.1)
    credentials = grpc.ssl_channel_credentials(stack.pki.ca.cert.read_bytes())
    async with AsyncImg2ImgClient(f"127.0.0.1:{stack.envoy.port}", credentials=credentials) as client:
        info = await client.get_info(timeout=10)
    assert info.HasField("model") and info.limits.max_image_bytes > 0


@pytest.mark.asyncio(loop_scope="module")
async def test_generate_streams_over_tls_both_ways(stack: Stack) -> None:
    credentials = grpc.ssl_channel_credentials(stack.pki.ca.cert.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{stack.envoy.port}", credentials) as channel:
        events = [event async for event in img2img_grpc.Img2ImgProviderStub(channel).Generate(img2img_request())]
    assert kinds(events)[-1] == "result"


@pytest.mark.asyncio(loop_scope="module")
async def test_python_client_without_the_ca_fails(stack: Stack) -> None:
    async with AsyncImg2ImgClient(f"127.0.0.1:{stack.envoy.port}", tls=True) as client:
        with pytest.raises(UnavailableError):
            await client.get_info(timeout=10)


@pytest.mark.asyncio(loop_scope="module")
async def test_server_certificate_for_another_name_is_refused(stack: Stack) -> None:
    # Same CA, but the gateway expects another name: the server is not who it should be.
    settings = tls_settings(stack.pki, upstream_server_name="someone-else.example")
    async with envoy_running([stack.server.port], tls=settings) as envoy:
        credentials = grpc.ssl_channel_credentials(stack.pki.ca.cert.read_bytes())
        async with AsyncImg2ImgClient(f"127.0.0.1:{envoy.port}", credentials=credentials) as client:
            with pytest.raises(UnavailableError):
                await client.get_info(timeout=10)
