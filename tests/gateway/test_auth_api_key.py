"""API keys at the gateway (auth.mode=api_key): a real Envoy reading a keys file in front of a real
img2img server (fake provider). No key, a bad key, a good key and a key without access to a service,
on gRPC, gRPC-Web and JSON/SSE; the open paths; a spoofed principal header; a rotated keys file;
and no key in any log.

One server and one Envoy for the module; the last test reads their logs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from google.rpc import code_pb2

from gateway.kiln_gateway import Envoy
from gateway.kiln_gateway.auth import INVALID_KEY, MISSING_KEY, UNREADABLE_KEYS
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.img2img.v1 import img2img_service_pb2_grpc as img2img_grpc
from kiln_runtime.principal import ANONYMOUS, PRINCIPAL_HEADER
from kiln_runtime.server import KilnServer
from tests.gateway.auth_support import (
    bearer,
    grpc_info,
    grpc_web_info,
    json_info,
    log_file,
    write_keys_file,
)
from tests.gateway.conftest import (
    channel_to,
    envoy_running,
    img2img_json,
    img2img_request,
    kiln_server,
    sse_event,
    upstream_requests,
)
from tests.jobs_support import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: Shaped like a signed link's signature (64 lowercase hex digits), but signs nothing.
FAKE_SIGNATURE = "0f" * 32
ALICE_KEY = "kiln-test-alice-7f3c9e1d2b"
BOB_KEY = "kiln-test-bob-4a8e6c0f19"  # img2img only
CAROL_KEY = "kiln-test-carol-55d1b7a3e0"  # added while Envoy runs
WRONG_KEY = "kiln-test-wrong-000000000"
KEYS = [ALICE_KEY, BOB_KEY, CAROL_KEY, WRONG_KEY]
ORIGIN = "http://127.0.0.1:8081"


@dataclass
class Stack:
    server: KilnServer
    envoy: Envoy
    keys_file: Path
    server_log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.envoy.port}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    root: Path = tmp_path_factory.mktemp("auth-api-key")
    keys_file = write_keys_file(root / "api-keys", [f"alice {ALICE_KEY}", f"bob {BOB_KEY} img2img"])
    with log_file(root / "servers.log") as server_log:
        async with (
            kiln_server("img2img", root, fake={"steps": 2, "step_delay_s": 0.0}) as server,
            envoy_running(
                [server.port],
                cors_allowed_origins=[ORIGIN],
                auth={"mode": "api_key", "api_keys_file": keys_file},
            ) as envoy,
        ):
            yield Stack(server, envoy, keys_file, server_log)


@pytest.mark.parametrize("protocol", ["grpc", "grpc-web", "json"])
async def test_no_key_bad_key_good_key(stack: Stack, protocol: str) -> None:
    async def info(credential: str | None, service: str = "img2img"):  # type: ignore[no-untyped-def]
        if protocol == "grpc":
            return await grpc_info(stack.envoy.port, service, credential)
        if protocol == "grpc-web":
            return await grpc_web_info(stack.base_url, service, credential)
        return await json_info(stack.base_url, service, credential)

    missing = await info(None)
    assert (missing.code, missing.message) == (code_pb2.UNAUTHENTICATED, MISSING_KEY)
    wrong = await info(WRONG_KEY)
    assert (wrong.code, wrong.message) == (code_pb2.UNAUTHENTICATED, INVALID_KEY)
    assert (await info(ALICE_KEY)).code == code_pb2.OK
    assert (await info(BOB_KEY)).code == code_pb2.OK
    # A key without access to a service: 403 / PERMISSION_DENIED naming it, before any server is asked.
    denied = await info(BOB_KEY, "mesh")
    assert denied.code == code_pb2.PERMISSION_DENIED
    assert "bob may not use the mesh service" in denied.message
    if protocol == "json":
        assert (missing.http_status, wrong.http_status, denied.http_status) == (401, 401, 403)
        assert missing.challenge == "Bearer"
        assert wrong.challenge.startswith("Bearer")


async def test_json_stream_with_a_key(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        refused = await client.post("/v1/img2img:generate", json=img2img_json())
        assert refused.status_code == 401
        assert refused.json() == {"code": code_pb2.UNAUTHENTICATED, "message": MISSING_KEY}
        async with client.stream(
            "POST", "/v1/img2img:generate", json=img2img_json(), headers=bearer(ALICE_KEY)
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [event async for line in response.aiter_lines() if (event := sse_event(line)) is not None]
    assert events[-1].WhichOneof("event") == "result"


async def test_spoofed_principal_header_is_replaced(stack: Stack) -> None:
    async with channel_to(stack.envoy.port) as channel:
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        metadata = ((PRINCIPAL_HEADER, "mallory"), *bearer(BOB_KEY).items())
        events = [event async for event in stub.Generate(img2img_request(), metadata=metadata, timeout=30)]
        job_id = events[0].accepted.job_id
        job = (await stub.GetJob(img2img.GetJobRequest(job_id=job_id), metadata=metadata, timeout=30)).job
    # The job belongs to the key's name, never to the name the client sent.
    assert job.status.owner == "bob", job.status
    # What the servers received, as Envoy logged it after its filters ran.
    await eventually(lambda: 'principal="bob"' in stack.envoy.log_path.read_text())
    assert 'principal="mallory"' not in stack.envoy.log_path.read_text()


async def test_spoofed_principal_header_is_removed_without_auth(stack: Stack) -> None:
    """Mode none: a second gateway, same server; nobody is named, so the job is anonymous."""
    async with envoy_running([stack.server.port]) as envoy, channel_to(envoy.port) as channel:
        stub = img2img_grpc.Img2ImgProviderStub(channel)
        metadata = ((PRINCIPAL_HEADER, "mallory"),)
        events = [event async for event in stub.Generate(img2img_request(), metadata=metadata, timeout=30)]
        request = img2img.GetJobRequest(job_id=events[0].accepted.job_id)
        job = (await stub.GetJob(request, metadata=metadata, timeout=30)).job
    assert job.status.owner == ANONYMOUS, job.status


async def test_unreadable_keys_file_refuses_every_call(stack: Stack) -> None:
    missing = stack.keys_file.with_name("not-there")
    async with envoy_running([stack.server.port], auth={"mode": "api_key", "api_keys_file": missing}) as envoy:
        outcome = await grpc_info(envoy.port, "img2img", ALICE_KEY)
        assert outcome.code == code_pb2.UNAVAILABLE
        assert UNREADABLE_KEYS in outcome.message
        log = envoy.log_path.read_text()
    assert "cannot read the API keys file" in log and ALICE_KEY not in log


async def test_open_paths_need_no_key(stack: Stack) -> None:
    before = upstream_requests(stack.envoy, "img2img")
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        assert (await client.get("/healthz")).status_code == 200
        page = await client.get("/")
        assert page.status_code == 200 and "html" in page.headers["content-type"]
        preflight = await client.options(
            "/v1/img2img:generate",
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization,content-type",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        # A signed link reaches the artifact server, which judges the signature (this one is made up).
        expires = int(time.time()) + 60
        signed = await client.get(
            f"/v1/artifacts/01ARZ3NDEKTSV4RRFFQ69G5FAV/result.png?expires={expires}&signature={FAKE_SIGNATURE}"
        )
        assert signed.status_code in (403, 404), signed.text
        assert signed.json()["code"] != code_pb2.UNAUTHENTICATED
        # The same download without a signature needs a key, and so does one whose `signature` is
        # not shaped like one (an empty one would otherwise reach the server as `anonymous`).
        for query in ("", "?signature=", f"?expires={expires}&signature=not+hex"):
            unsigned = await client.get(f"/v1/artifacts/01ARZ3NDEKTSV4RRFFQ69G5FAV/result.png{query}")
            assert unsigned.status_code == 401, query
    assert upstream_requests(stack.envoy, "img2img") == before + 1  # only the signed link went upstream


async def test_unrouted_paths_need_a_key_too(stack: Stack) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, timeout=30) as client:
        assert (await client.get("/v1/nothing-here")).status_code == 401
        assert (await client.get("/v1/nothing-here", headers=bearer(ALICE_KEY))).status_code == 404


async def test_a_changed_keys_file_applies_without_restart(stack: Stack) -> None:
    assert (await json_info(stack.base_url, "img2img", CAROL_KEY)).code == code_pb2.UNAUTHENTICATED
    original = stack.keys_file.read_text()
    write_keys_file(stack.keys_file, [*original.splitlines()[1:], f"carol {CAROL_KEY}"])
    try:

        async def accepted_everywhere() -> bool:
            # Each call is a new connection, which may land on any worker; each worker reads the
            # file again within KEYS_RELOAD_S, so poll until several calls in a row pass.
            for _ in range(8):
                if (await json_info(stack.base_url, "img2img", CAROL_KEY)).code != code_pb2.OK:
                    return False
            return True

        await eventually(accepted_everywhere, within=30)
    finally:
        stack.keys_file.write_text(original)


async def test_grpc_trailers_carry_the_challenge(stack: Stack) -> None:
    async with channel_to(stack.envoy.port) as channel:
        call = img2img_grpc.Img2ImgProviderStub(channel).GetInfo(img2img.GetInfoRequest(), timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == MISSING_KEY


async def test_zz_no_key_in_any_log(stack: Stack) -> None:
    """Last in the module: every key above was sent by now."""
    envoy_log = stack.envoy.log_path.read_text()
    server_log = stack.server_log.read_text()
    assert "principal=" in envoy_log and server_log  # the logs were written at all
    for key in KEYS:
        assert key not in envoy_log
        assert key not in server_log
    assert "signature=" not in envoy_log and FAKE_SIGNATURE not in envoy_log
