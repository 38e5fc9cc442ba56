"""Credentials for the gateway auth tests: a keys file, an EC P-256 JWKS and tokens signed with it,
a loopback HTTP server for a remote JWKS, and the three protocols' view of a refusal."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln.mesh.v1 import mesh_service_pb2 as mesh
from kiln.mesh.v1 import mesh_service_pb2_grpc as mesh_grpc
from tests.gateway.conftest import channel_to
from tests.gateway.grpc_web import GrpcWebCall, GrpcWebError

ISSUER = "https://issuer.kiln.test"
AUDIENCE = "kiln-gateway"
KID = "kiln-test-1"


def write_keys_file(path: Path, lines: list[str]) -> Path:
    """A keys file readable by its owner only, as the gateway expects."""
    path.write_text("# name key [services]\n" + "\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


@dataclass
class Issuer:
    """An EC P-256 signing key, its JWKS, and tokens signed with it."""

    key: ec.EllipticCurvePrivateKey
    kid: str = KID

    @classmethod
    def new(cls) -> Issuer:
        return cls(ec.generate_private_key(ec.SECP256R1()))

    def jwks(self) -> dict[str, Any]:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def token(self, subject: str | None = "alice", *, lifetime_s: float = 600, **claims: Any) -> str:
        """A token for `subject`; claims override the defaults (iss, aud, exp), None drops one."""
        now = int(time.time())
        payload: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + int(lifetime_s)}
        if subject is not None:
            payload["sub"] = subject
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        return jwt.encode(payload, self.key, algorithm="ES256", headers={"kid": self.kid})


@contextmanager
def jwks_server(document: dict[str, Any]) -> Iterator[str]:
    """A loopback HTTP server answering GET /jwks.json with `document`; yields its URL."""
    body = json.dumps(document).encode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/jwks.json" else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def log_file(path: Path) -> Iterator[Path]:
    """Everything the in-process servers log (Kiln's and grpc's loggers, DEBUG up) also goes to
    `path`; the test's own HTTP client logs (httpx prints the URLs it fetches) stay out."""
    handler = logging.FileHandler(path)
    handler.setLevel(logging.DEBUG)
    handler.addFilter(lambda record: record.name.startswith(("kiln", "grpc")))
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        handler.close()


def bearer(credential: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {credential}"} if credential is not None else {}


@dataclass
class Outcome:
    """How one call ended, as its protocol reports it."""

    code: int  # gRPC code (JSON: the body's `code`)
    message: str
    http_status: int = 200
    challenge: str = ""  # www-authenticate


async def grpc_info(port: int, service: str, credential: str | None, **headers: str) -> Outcome:
    """GetInfo of `service` (img2img or mesh) over native gRPC."""
    metadata = tuple({**bearer(credential), **headers}.items())
    async with channel_to(port) as channel:
        try:
            if service == "img2img":
                await img2img_grpc.Img2ImgProviderStub(channel).GetInfo(
                    img2img.GetInfoRequest(), metadata=metadata, timeout=30
                )
            else:
                await mesh_grpc.MeshProviderStub(channel).GetInfo(mesh.GetInfoRequest(), metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as error:
            return Outcome(error.code().value[0], error.details() or "")
    return Outcome(0, "")


GRPC_METHODS = {
    "img2img": ("/kiln.img2img.v1.Img2ImgProvider/GetInfo", img2img.GetInfoRequest(), img2img.GetInfoResponse),
    "mesh": ("/kiln.mesh.v1.MeshProvider/GetInfo", mesh.GetInfoRequest(), mesh.GetInfoResponse),
}


async def grpc_web_info(base_url: str, service: str, credential: str | None) -> Outcome:
    """GetInfo of `service` over gRPC-Web (HTTP/1.1, as a browser sends it)."""
    method, request, response_type = GRPC_METHODS[service]
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        call: GrpcWebCall[Any] = GrpcWebCall(client, method, request, response_type, metadata=bearer(credential))
        try:
            async for _ in call:
                pass
        except GrpcWebError as error:
            return Outcome(error.code, error.message, call.http_status, call.headers.get("www-authenticate", ""))
        return Outcome(0, "", call.http_status)


async def json_info(base_url: str, service: str, credential: str | None) -> Outcome:
    """GET /v1/<service>/info as a JSON client."""
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        response = await client.get(f"/v1/{service}/info", headers=bearer(credential))
    if response.status_code == 200:
        return Outcome(0, "", 200)
    body = response.json()
    return Outcome(body["code"], body["message"], response.status_code, response.headers.get("www-authenticate", ""))
