"""TLS channels, the API-key and the bearer-token options, against a real TLS gRPC server on a loopback port.

The server is a minimal Img2ImgProvider whose GetInfo reports the `authorization` metadata it
received, so the tests see exactly what a gateway would get (the Kiln servers' own TLS is
tests/grpc/test_server_tls.py).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import jwt
import pytest

from kiln.common.v1 import service_info_pb2
from kiln.img2img.v1 import img2img_service_pb2 as pb
from kiln.img2img.v1 import img2img_service_pb2_grpc as pb_grpc
from kiln_client import AsyncImg2ImgClient, Img2ImgClient, UnavailableError
from kiln_client.cli import main as kiln


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


def a_jwt() -> str:
    # Any compact JWS will do: the client passes it on unread; the gateway is what verifies it.
    return jwt.encode({"sub": "alice", "aud": "kiln"}, "not-a-real-secret-at-least-32-bytes!", algorithm="HS256")


def test_bearer_token_is_sent_as_authorization(certificate: tuple[bytes, bytes], tls_port: int) -> None:
    token = a_jwt()
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate[1])
    with Img2ImgClient(f"localhost:{tls_port}", credentials=credentials, token=token, timeout=10) as client:
        assert client.get_info().model.model_id == f"Bearer {token}"


async def test_async_bearer_token(certificate: tuple[bytes, bytes], tls_port: int) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=certificate[1])
    async with AsyncImg2ImgClient(f"localhost:{tls_port}", credentials=credentials, token="t-1", timeout=10) as client:
        assert (await client.get_info()).model.model_id == "Bearer t-1"


def test_api_key_and_token_together_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        Img2ImgClient("localhost:1", api_key="k", token="t")


@pytest.fixture
def ca_file(certificate: tuple[bytes, bytes], tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(certificate[1])
    return path


def cli_info(tls_port: int, ca_file: Path, *options: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    argv = ["info", "--service", "img2img", "--json", "--target", f"localhost:{tls_port}", "--ca-file", str(ca_file)]
    status = kiln([*argv, *options], stdout=stdout, stderr=stderr)
    return status, stdout.getvalue(), stderr.getvalue()


def received_authorization(stdout: str) -> str:
    answer: str = json.loads(stdout.splitlines()[0])["model"].get("modelId", "")
    return answer


@pytest.mark.usefixtures("clean_auth_env")
def test_cli_token_option_and_environment(tls_port: int, ca_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = a_jwt()
    status, stdout, stderr = cli_info(tls_port, ca_file, "--token", token)
    assert status == 0, stderr
    assert received_authorization(stdout) == f"Bearer {token}"
    monkeypatch.setenv("KILN_TOKEN", "from-env")
    status, stdout, stderr = cli_info(tls_port, ca_file)
    assert status == 0, stderr
    assert received_authorization(stdout) == "Bearer from-env"
    # And the API key still goes out the way it always did.
    monkeypatch.delenv("KILN_TOKEN")
    status, stdout, _ = cli_info(tls_port, ca_file, "--api-key", "k-7")
    assert received_authorization(stdout) == "Bearer k-7"


@pytest.mark.usefixtures("clean_auth_env")
def test_cli_refuses_an_api_key_with_a_token(
    tls_port: int, ca_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_info(tls_port, ca_file, "--api-key", "k", "--token", "t")
    assert exited.value.code == 2
    assert "not both" in capsys.readouterr().err
    monkeypatch.setenv("KILN_API_KEY", "k-env")  # the environment counts as much as a flag
    with pytest.raises(SystemExit):
        cli_info(tls_port, ca_file, "--token", "t")


@pytest.fixture
def clean_auth_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_API_KEY", raising=False)
    monkeypatch.delenv("KILN_TOKEN", raising=False)
