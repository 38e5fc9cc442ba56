"""TLS channels and the API-key option, against a real TLS gRPC server on a loopback port.

The Kiln servers speak plaintext (TLS ends at the gateway or a mesh sidecar), so this server is
a minimal Img2ImgProvider whose GetInfo reports the `authorization` metadata it received.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from kiln.common.v1 import service_info_pb2
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_client import AsyncImg2ImgClient, Img2ImgClient, UnavailableError


class _EchoAuthorization(pb_grpc.Img2ImgProviderServicer):
    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:  # noqa: N802
        received = dict(context.invocation_metadata())
        return pb.GetInfoResponse(
            model=service_info_pb2.ModelInfo(
                provider="echo", model_id=str(received.get("authorization", "")), device=str(received.get("x-team", ""))
            )
        )


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("openssl is needed to make a test certificate (Debian package openssl)")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return key.read_bytes(), cert.read_bytes()


@pytest.fixture(scope="module")
def tls_port(certificate: tuple[bytes, bytes]) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_Img2ImgProviderServicer_to_server(_EchoAuthorization(), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([certificate]))
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def test_tls_channel_with_a_custom_root_and_api_key(certificate: tuple[bytes, bytes], tls_port: int) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate[1])
    with Img2ImgClient(
        f"localhost:{tls_port}", credentials=credentials, api_key="k-123", metadata=[("X-Team", "blue")], timeout=10
    ) as client:
        info = client.get_info()
    assert info.model.model_id == "Bearer k-123"
    assert info.model.device == "blue"  # extra metadata, lower-cased as gRPC requires


async def test_async_tls_channel(certificate: tuple[bytes, bytes], tls_port: int) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate[1])
    async with AsyncImg2ImgClient(
        f"localhost:{tls_port}", credentials=credentials, api_key="k-9", timeout=10
    ) as client:
        info = await client.get_info()
    assert info.model.model_id == "Bearer k-9"


def test_plaintext_client_cannot_talk_to_a_tls_server(tls_port: int) -> None:
    with Img2ImgClient(f"127.0.0.1:{tls_port}", timeout=5) as client, pytest.raises(UnavailableError):
        client.get_info()


def test_tls_with_system_roots_rejects_a_self_signed_server(tls_port: int) -> None:
    with Img2ImgClient(f"localhost:{tls_port}", tls=True, timeout=5) as client, pytest.raises(UnavailableError):
        client.get_info()


def test_without_api_key_no_authorization_is_sent(certificate: tuple[bytes, bytes], tls_port: int) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate[1])
    with Img2ImgClient(f"localhost:{tls_port}", credentials=credentials, timeout=10) as client:
        assert client.get_info().model.model_id == ""
