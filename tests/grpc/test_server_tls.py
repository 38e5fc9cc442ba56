"""A model server's gRPC port over TLS and mutual TLS (server.tls_* settings), on real servers.

Certificates come from the development CA (deploy/dev_ca.py): a server certificate for
localhost/127.0.0.1, the gateway's client certificate from the same CA, and a client certificate
from another CA that must be refused.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.dev_ca import CertFiles, issue, make_ca
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_img2img import SERVICE_NAME as IMG2IMG
from kiln_img2img.server import create_server
from kiln_runtime import healthcheck
from kiln_runtime.server import KilnServer
from kiln_runtime.server_tls import TlsFileError
from tests.support import img2img_settings


@dataclass(frozen=True)
class Pki:
    ca: CertFiles
    server: CertFiles
    gateway: CertFiles  # client certificate issued by `ca`
    stranger: CertFiles  # client certificate issued by another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder / "ca")
    other = make_ca(folder / "other", name="Some other CA")
    return Pki(
        ca=ca,
        server=issue(ca, folder / "ca", "img2img"),
        gateway=issue(ca, folder / "ca", "gateway-client", client=True),
        stranger=issue(other, folder / "other", "stranger", client=True),
    )


async def start(tmp_path: Path, **server: object) -> KilnServer:
    kiln_server = create_server(img2img_settings(tmp_path / "data", server={"metrics_enabled": False, **server}))
    await kiln_server.start()
    await kiln_server.runtime.manager.wait_loaded()
    return kiln_server


def credentials(pki: Pki, client: CertFiles | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )


async def get_info(channel: grpc.aio.Channel) -> pb.GetInfoResponse:
    response: pb.GetInfoResponse = await pb_grpc.Img2ImgProviderStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
    return response


async def refused(channel: grpc.aio.Channel) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get_info(channel)
    return caught.value.code()


async def test_tls_port_serves_tls_clients_and_refuses_plaintext(tmp_path: Path, pki: Pki) -> None:
    server = await start(tmp_path, tls_cert_file=pki.server.cert, tls_key_file=pki.server.key)
    try:
        async with grpc.aio.secure_channel(f"localhost:{server.port}", credentials(pki)) as channel:
            info = await get_info(channel)
            assert info.model.provider == "fake"
            health = health_pb2_grpc.HealthStub(channel)
            answer = await health.Check(health_pb2.HealthCheckRequest(service=IMG2IMG), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await refused(channel) == grpc.StatusCode.UNAVAILABLE
        # The Docker HEALTHCHECK module: over TLS it answers, in plaintext it does not.
        tls = healthcheck.TlsFiles(pki.ca.cert, server_name="localhost")
        serving, line = await asyncio.to_thread(healthcheck.check, f"127.0.0.1:{server.port}", IMG2IMG, 5.0, tls)
        assert serving, line
        serving, _ = await asyncio.to_thread(healthcheck.check, f"127.0.0.1:{server.port}", IMG2IMG, 5.0)
        assert not serving
    finally:
        await server.stop(grace=0)


async def test_mutual_tls_accepts_only_the_gateways_certificate(tmp_path: Path, pki: Pki) -> None:
    server = await start(
        tmp_path, tls_cert_file=pki.server.cert, tls_key_file=pki.server.key, tls_client_ca_file=pki.ca.cert
    )
    target = f"localhost:{server.port}"
    try:
        async with grpc.aio.secure_channel(target, credentials(pki, pki.gateway)) as channel:
            assert (await get_info(channel)).model.provider == "fake"
        async with grpc.aio.secure_channel(target, credentials(pki)) as channel:  # no client certificate
            assert await refused(channel) == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.secure_channel(target, credentials(pki, pki.stranger)) as channel:
            assert await refused(channel) == grpc.StatusCode.UNAVAILABLE
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await refused(channel) == grpc.StatusCode.UNAVAILABLE
        # Health over mutual TLS (a probe presents a client certificate from the CA; without, it fails).
        address = f"127.0.0.1:{server.port}"
        probe = healthcheck.TlsFiles(pki.ca.cert, pki.gateway.cert, pki.gateway.key, server_name="localhost")
        serving, line = await asyncio.to_thread(healthcheck.check, address, "", 5.0, probe)
        assert serving, line
        anonymous = healthcheck.TlsFiles(pki.ca.cert, server_name="localhost")
        serving, _ = await asyncio.to_thread(healthcheck.check, address, "", 5.0, anonymous)
        assert not serving
    finally:
        await server.stop(grace=0)


async def test_a_missing_certificate_file_is_a_clear_startup_error(tmp_path: Path, pki: Pki) -> None:
    missing = tmp_path / "nowhere.pem"
    server = create_server(
        img2img_settings(
            tmp_path / "data",
            server={"metrics_enabled": False, "tls_cert_file": pki.server.cert, "tls_key_file": missing},
        )
    )
    try:
        with pytest.raises(TlsFileError, match=r"server\.tls_key_file .*nowhere\.pem"):
            await server.start()
    finally:
        await server.stop(grace=0)


async def test_a_file_that_is_no_certificate_is_refused(tmp_path: Path, pki: Pki) -> None:
    server = create_server(
        img2img_settings(
            tmp_path / "data",
            # A key where the client CA should be: caught at startup, not at the first handshake.
            server={
                "metrics_enabled": False,
                "tls_cert_file": pki.server.cert,
                "tls_key_file": pki.server.key,
                "tls_client_ca_file": pki.server.key,
            },
        )
    )
    try:
        with pytest.raises(TlsFileError, match="tls_client_ca_file"):
            await server.start()
    finally:
        await server.stop(grace=0)


def test_cert_and_key_come_together(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ValueError, match="both tls_cert_file and tls_key_file"):
        img2img_settings(tmp_path, server={"tls_cert_file": pki.server.cert})
    with pytest.raises(ValueError, match="needs tls_cert_file"):
        img2img_settings(tmp_path, server={"tls_client_ca_file": pki.ca.cert})
