"""The gateway's per-caller rate limit, through a real Envoy in front of a real img2img server.

The rate is tiny (one request per 10 s, burst 2), so a bucket emptied by one test stays empty
for the next ones; each test therefore sends requests until one is refused, and checks that no
more than the burst got through first. Auth mode is `none`: callers are told apart by address.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.rpc import code_pb2
from grpc_status import rpc_status

from gateway.kiln_gateway import Envoy
from gateway.kiln_gateway.edge import RATE_LIMITED_DOMAIN, RATE_LIMITED_MESSAGE, RATE_LIMITED_REASON
from gateway.kiln_gateway.render import RETRY_ON
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln_client import AsyncImg2ImgClient
from kiln_client.errors import KilnError, ResourceExhaustedError
from tests.gateway.conftest import envoy_running, json_error_reason, kiln_server, upstream_requests
from tests.gateway.grpc_web import GrpcWebCall, GrpcWebError

pytestmark = pytest.mark.asyncio(loop_scope="module")
RATE, BURST = 0.1, 2
RETRY_AFTER_S = 10  # 1 / RATE
INFO_PATH = "/v1/img2img/info"
GET_INFO = "/kiln.img2img.v1.Img2ImgProvider/GetInfo"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def envoy(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Envoy]:
    async with (
        kiln_server("img2img", tmp_path_factory.mktemp("rate") / "img2img") as server,
        envoy_running([server.port], rate_limit={"requests_per_s": RATE, "burst": BURST}) as running,
    ):
        yield running


async def _until_limited(send: Any, limit: int = BURST + 1) -> tuple[int, Any]:
    """Call `send()` until it returns a refusal (not None); (calls that passed, the refusal)."""
    for passed in range(limit):
        refusal = await send()
        if refusal is not None:
            return passed, refusal
    raise AssertionError(f"{limit} calls in a row passed a limit of burst {BURST}")


async def _curl(port: int, *args: str) -> tuple[int, dict[str, str], str]:
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-D", "-", "--max-time", "10", *args, f"http://127.0.0.1:{port}{INFO_PATH}",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    assert process.returncode == 0
    head, _, body = out.decode().partition("\r\n\r\n")
    lines = head.splitlines()
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def test_json_burst_gets_429_with_retry_after(envoy: Envoy) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}") as client:

        async def send() -> httpx.Response | None:
            response = await client.get(INFO_PATH)
            return None if response.status_code == 200 else response

        before = upstream_requests(envoy, "img2img")
        passed, refused = await _until_limited(send)
        assert passed <= BURST
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == str(RETRY_AFTER_S)
        body = refused.json()  # a google.rpc.Status, like the transcoder's errors
        assert body["code"] == code_pb2.RESOURCE_EXHAUSTED and body["message"] == RATE_LIMITED_MESSAGE
        assert json_error_reason(body) == RATE_LIMITED_REASON
        retry = next(detail for detail in body["details"] if detail["@type"].endswith("google.rpc.RetryInfo"))
        assert retry["retryDelay"] == f"{RETRY_AFTER_S}s"
        # The refused call never reached the server, so there was nothing to retry either.
        assert upstream_requests(envoy, "img2img") == before + passed
        for condition in ("retriable-4xx", "resource-exhausted", "retriable-status-codes"):
            assert condition not in RETRY_ON


async def test_grpc_burst_gets_resource_exhausted_with_retry_info(envoy: Envoy) -> None:
    async with AsyncImg2ImgClient(f"127.0.0.1:{envoy.port}") as client:

        async def send() -> KilnError | None:
            try:
                await client.get_info(timeout=10)
            except KilnError as error:
                return error
            return None

        passed, refused = await _until_limited(send)
    assert passed <= BURST
    assert isinstance(refused, ResourceExhaustedError), refused
    assert refused.reason == RATE_LIMITED_REASON and refused.domain == RATE_LIMITED_DOMAIN
    assert refused.retry_delay_s == pytest.approx(RETRY_AFTER_S)


async def test_grpc_web_burst_gets_resource_exhausted_with_retry_info(envoy: Envoy) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}") as client:

        async def send() -> GrpcWebError | None:
            try:
                async for _ in GrpcWebCall(client, GET_INFO, img2img.GetInfoRequest(), img2img.GetInfoResponse):
                    pass
            except GrpcWebError as error:
                return error
            return None

        passed, refused = await _until_limited(send)
    assert passed <= BURST
    # RESOURCE_EXHAUSTED in grpc-status itself (not UNAVAILABLE, the grpc_web filter's mapping of
    # HTTP 429), which browser clients read before any details.
    assert refused.code == code_pb2.RESOURCE_EXHAUSTED and refused.message == RATE_LIMITED_MESSAGE
    assert refused.status is not None and refused.status.code == code_pb2.RESOURCE_EXHAUSTED
    assert any(detail.type_url.endswith("google.rpc.RetryInfo") for detail in refused.status.details)


async def test_buckets_are_per_client_address_and_a_spoofed_principal_gets_none(envoy: Envoy) -> None:
    async def send_from_first() -> int | None:
        # In mode none the principal header is no key: a made-up name per call changes nothing.
        status, _, _ = await _curl(envoy.port, "-H", f"x-kiln-principal: someone-{id(object())}")
        return None if status == 200 else status

    _, refused = await _until_limited(send_from_first)
    assert refused == 429
    # Another client address (any 127/8 address reaches the loopback listener) has its own bucket.
    status, _, _ = await _curl(envoy.port, "--interface", "127.0.0.2")
    assert status == 200


async def test_page_health_and_preflight_are_not_limited(envoy: Envoy) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{envoy.port}") as client:
        await _until_limited(lambda: _refused(client.get(INFO_PATH)))
        for _ in range(BURST + 2):
            assert (await client.get("/")).status_code == 200
            assert (await client.get("/healthz")).status_code == 200
            preflight = await client.options(
                INFO_PATH,
                headers={"origin": "https://elsewhere.example", "access-control-request-method": "GET"},
            )
            assert preflight.status_code != 429
        assert (await client.get(INFO_PATH)).status_code == 429


async def _refused(request: Any) -> httpx.Response | None:
    response: httpx.Response = await request
    return None if response.status_code == 200 else response


async def test_grpc_details_match_the_status_the_client_sees(envoy: Envoy) -> None:
    # The details are only decoded when their code and message equal the call's own.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{envoy.port}") as channel:
        method = channel.unary_unary(
            GET_INFO,
            request_serializer=img2img.GetInfoRequest.SerializeToString,
            response_deserializer=img2img.GetInfoResponse.FromString,
        )

        async def send() -> grpc.aio.AioRpcError | None:
            try:
                await method(img2img.GetInfoRequest(), timeout=10)
            except grpc.aio.AioRpcError as error:
                return error
            return None

        _, refused = await _until_limited(send)
    status = rpc_status.from_call(refused)  # raises ValueError on a mismatch
    assert status is not None and status.code == code_pb2.RESOURCE_EXHAUSTED
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_buckets_are_per_principal_with_api_keys(envoy: Envoy, tmp_path_factory: pytest.TempPathFactory) -> None:
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text("alice kiln_alice_0123456789abcdef\nbob kiln_bob_0123456789abcdef\n")
    keys.chmod(0o600)
    upstream = int(envoy.settings.img2img_upstreams[0].rpartition(":")[2])
    auth = {"mode": "api_key", "api_keys_file": keys}
    async with (
        envoy_running([upstream], auth=auth, rate_limit={"requests_per_s": RATE, "burst": BURST}) as keyed,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{keyed.port}") as client,
    ):

        def as_(name: str) -> dict[str, str]:
            return {"authorization": f"Bearer kiln_{name}_0123456789abcdef"}

        passed, refused = await _until_limited(lambda: _refused(client.get(INFO_PATH, headers=as_("alice"))))
        assert passed <= BURST and refused.status_code == 429
        # Bob, from the same address, has his own bucket; alice stays limited.
        assert (await client.get(INFO_PATH, headers=as_("bob"))).status_code == 200
        assert (await client.get(INFO_PATH, headers=as_("alice"))).status_code == 429
