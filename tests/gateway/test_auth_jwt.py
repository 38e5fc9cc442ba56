"""JWTs at the gateway (auth.mode=jwt): Envoy's jwt_authn with a remote JWKS served on loopback, in
front of a real img2img server (fake provider). Good, expired, wrong audience, wrong issuer, foreign
signature, no subject, and a token limited to one service, on gRPC, gRPC-Web and JSON; then a gateway
with a local JWKS file; and no token in any log.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from google.rpc import code_pb2

from gateway.kiln_gateway import Envoy
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_runtime.principal import PRINCIPAL_HEADER
from kiln_runtime.server import KilnServer
from tests.gateway.auth_support import (
    AUDIENCE,
    ISSUER,
    Issuer,
    Outcome,
    bearer,
    grpc_info,
    grpc_web_info,
    json_info,
    jwks_server,
    log_file,
)
from tests.gateway.conftest import channel_to, envoy_running, img2img_request, kiln_server
from tests.jobs_support import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROTOCOLS = ["grpc", "grpc-web", "json"]


@dataclass
class Stack:
    server: KilnServer
    envoy: Envoy
    issuer: Issuer
    server_log: Path
    root: Path
    tokens: list[str] = field(default_factory=list)  # every token sent, for the log check

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.envoy.port}"

    def token(self, *args: object, **claims: object) -> str:
        token = self.issuer.token(*args, **claims)  # type: ignore[arg-type]
        self.tokens.append(token)
        return token

    async def info(self, protocol: str, token: str | None, service: str = "img2img") -> Outcome:
        if protocol == "grpc":
            return await grpc_info(self.envoy.port, service, token)
        if protocol == "grpc-web":
            return await grpc_web_info(self.base_url, service, token)
        return await json_info(self.base_url, service, token)


def jwt_auth(**source: str) -> dict[str, object]:
    return {"mode": "jwt", "jwt": {"issuer": ISSUER, "audiences": [AUDIENCE, "other-gateway"], **source}}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root: Path = tmp_path_factory.mktemp("auth-jwt")
    issuer = Issuer.new()
    with jwks_server(issuer.jwks()) as uri, log_file(root / "servers.log") as server_log:
        async with (
            kiln_server("img2img", root, fake={"steps": 2, "step_delay_s": 0.0}) as server,
            envoy_running([server.port], auth=jwt_auth(jwks_uri=uri)) as envoy,
        ):
            yield Stack(server, envoy, issuer, server_log, root)


async def test_good_token_on_every_protocol(stack: Stack) -> None:
    token = stack.token("alice")

    async def passes(protocol: str) -> bool:
        # Envoy fetches the JWKS in the background right after it starts.
        return (await stack.info(protocol, token)).code == code_pb2.OK

    await eventually(lambda: passes("json"), within=30)
    for protocol in PROTOCOLS:
        assert await passes(protocol), protocol


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_missing_and_expired_tokens(stack: Stack, protocol: str) -> None:
    missing = await stack.info(protocol, None)
    assert missing.code == code_pb2.UNAUTHENTICATED
    assert "this gateway needs a token (JWT)" in missing.message and "authorization: Bearer <token>" in missing.message
    expired = await stack.info(protocol, stack.token("alice", lifetime_s=-600))
    assert expired.code == code_pb2.UNAUTHENTICATED
    assert "expired" in expired.message.lower() and ISSUER in expired.message
    if protocol == "json":
        assert (missing.http_status, expired.http_status) == (401, 401)
        assert missing.challenge == "Bearer" and "invalid_token" in expired.challenge


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"aud": "someone-else"}, "(Audiences in Jwt are not allowed)"),
        ({"iss": "https://elsewhere.test"}, "(Jwt issuer is not configured)"),
        ({"sub": None}, "`sub` claim"),
    ],
    ids=["wrong-audience", "wrong-issuer", "no-subject"],
)
async def test_refused_tokens(stack: Stack, claims: dict[str, object], reason: str) -> None:
    subject = claims.pop("sub", "alice")
    outcome = await stack.info("json", stack.token(subject, **claims))
    assert (outcome.http_status, outcome.code) == (401, code_pb2.UNAUTHENTICATED)
    assert reason in outcome.message, outcome.message
    # The same on gRPC-Web, where a browser's page reads it.
    assert (await stack.info("grpc-web", stack.token(subject, **claims))).code == code_pb2.UNAUTHENTICATED


async def test_foreign_signature_is_refused(stack: Stack) -> None:
    forged = Issuer.new().token("alice")  # same kid, another key
    stack.tokens.append(forged)
    assert (await stack.info("grpc", forged)).code == code_pb2.UNAUTHENTICATED


async def test_token_only_from_the_header(stack: Stack) -> None:
    """Not from Envoy's default `access_token` query parameter: tokens stay out of URLs."""
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        response = await client.get("/v1/img2img/info", params={"access_token": stack.token("alice")})
    assert response.status_code == 401


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_services_claim(stack: Stack, protocol: str) -> None:
    limited = stack.token("bob", kiln_services=["img2img"])
    assert (await stack.info(protocol, limited)).code == code_pb2.OK
    denied = await stack.info(protocol, limited, "mesh")
    assert denied.code == code_pb2.PERMISSION_DENIED
    assert "bob may not use the mesh service" in denied.message
    if protocol == "json":
        assert denied.http_status == 403


async def test_principal_is_the_subject_never_the_clients_header(stack: Stack) -> None:
    metadata = ((PRINCIPAL_HEADER, "mallory"), *bearer(stack.token("carol")).items())
    async with channel_to(stack.envoy.port) as channel:
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        events = [event async for event in stub.Generate(img2img_request(), metadata=metadata, timeout=30)]
        job = (
            await stub.GetJob(img2img.GetJobRequest(job_id=events[0].accepted.job_id), metadata=metadata, timeout=30)
        ).job
    assert job.status.owner == "carol", job.status
    await eventually(lambda: 'principal="carol"' in stack.envoy.log_path.read_text())
    assert "mallory" not in stack.envoy.log_path.read_text()


async def test_local_jwks_file(stack: Stack) -> None:
    """A second gateway reading the issuer's keys from a file (a mounted Secret)."""
    jwks = stack.issuer.write_jwks(stack.root / "jwks.json")
    async with (
        envoy_running([stack.server.port], auth=jwt_auth(jwks_file=str(jwks))) as envoy,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}", timeout=30) as client,
    ):
        good = await client.get("/v1/img2img/info", headers=bearer(stack.token("alice")))
        assert good.status_code == 200, good.text
        wrong = await client.get("/v1/img2img/info", headers=bearer(stack.token("alice", aud="nope")))
        assert wrong.status_code == 401
        assert wrong.json()["code"] == code_pb2.UNAUTHENTICATED


async def test_zz_no_token_in_any_log(stack: Stack) -> None:
    """Last in the module: every token above was sent by now."""
    envoy_log = stack.envoy.log_path.read_text()
    server_log = stack.server_log.read_text()
    assert "principal=" in envoy_log and server_log
    assert len(stack.tokens) > 10
    for token in stack.tokens:
        # The signature is what makes each token unique (and usable).
        signature = token.rpartition(".")[2]
        assert signature not in envoy_log and signature not in server_log
