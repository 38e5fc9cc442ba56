"""Real Envoy in front of real grpc.aio servers (fake provider) on free loopback ports.

The gateway package is imported as `gateway.kiln_gateway`: pytest puts the repository root on
sys.path (as for `tests.support`), and `gateway/` is a namespace package.

Servers and Envoy are started once per module (`loop_scope="module"`: grpc.aio objects belong
to the loop that made them, so the module's tests share that loop). Envoy gets ports 0 and a
dynamic base id, so modules and other sessions on the machine never collide.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from gateway.kiln_gateway import Envoy, GatewaySettings
from kiln.img2img.v1 import img2img_service_pb2 as img2img
from kiln.mesh.v1 import mesh_service_pb2 as mesh
from kiln_img2img.server import create_server as create_img2img_server
from kiln_mesh.server import create_server as create_mesh_server
from kiln_runtime.server import KilnServer
from tests.support import img2img_request as img2img_request  # re-exported: the gateway tests import it from here
from tests.support import img2img_settings, mesh_settings, png_bytes

CLIENT_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]
UNUSED_UPSTREAM = "127.0.0.1:1"  # a cluster no test of the module calls


@asynccontextmanager
async def kiln_server(kind: str, data_dir: Path, **options: Any) -> AsyncIterator[KilnServer]:
    """An img2img or mesh server with the fake provider, loaded and serving."""
    if kind == "img2img":
        server = create_img2img_server(img2img_settings(data_dir, **options))
    else:
        server = create_mesh_server(mesh_settings(data_dir, **options))
    await server.start()
    try:
        await server.runtime.manager.wait_loaded()
        yield server
    finally:
        await server.stop(grace=0)


@contextmanager
def envoy_for(
    img2img_ports: list[int] | None = None, mesh_ports: list[int] | None = None, **settings: Any
) -> Iterator[Envoy]:
    """Envoy on free ports in front of the given server ports."""
    gateway = GatewaySettings(
        _env_file=None,
        port=0,
        admin_port=0,
        img2img_upstreams=[f"127.0.0.1:{port}" for port in img2img_ports or []] or [UNUSED_UPSTREAM],
        mesh_upstreams=[f"127.0.0.1:{port}" for port in mesh_ports or []] or [UNUSED_UPSTREAM],
        **settings,
    )
    with Envoy(gateway) as envoy:
        yield envoy


def channel_to(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CLIENT_OPTIONS)


def img2img_json(**fields: Any) -> dict[str, Any]:
    """The JSON body of POST /v1/img2img:generate (camelCase, bytes as base64)."""
    body: dict[str, Any] = {
        "image": base64.b64encode(png_bytes()).decode(),
        "prompt": "a red fox in snow",
        "seed": 7,
        "scheduler": "SCHEDULER_EULER",
        "outputFormat": "IMAGE_FORMAT_PNG",
    }
    body.update(fields)
    return body


def mesh_request(**fields: Any) -> mesh.GenerateRequest:
    return mesh.GenerateRequest(image=png_bytes(), output_format=mesh.MESH_FORMAT_GLB, **fields)


async def read_rest(call: Any) -> list[Any]:
    """The remaining messages of a grpc.aio stream that was read with `read()` (grpc refuses
    `async for` on such a call), up to its end; how it ended is `await call.code()`."""
    messages = []
    try:
        while (message := await call.read()) is not grpc.aio.EOF:
            messages.append(message)
    except grpc.aio.AioRpcError:
        pass
    return messages


def kinds(events: list[Any]) -> list[str]:
    return [event.WhichOneof("event") or "" for event in events]


def sse_event(line: str) -> img2img.GenerateResponse | None:
    """One `data: {...}` line of the SSE stream as a message (strict parse); None for blank lines."""
    if not line.strip():
        return None
    assert line.startswith("data: "), line
    return json_format.Parse(line.removeprefix("data: "), img2img.GenerateResponse())


def requests_total(server: KilnServer) -> float:
    """Sum of `kiln_requests_total` over all labels: every RPC that reached the servicer."""
    total = 0.0
    for family in server.runtime.metrics.registry.collect():
        if family.name == "kiln_requests":
            total += sum(sample.value for sample in family.samples if sample.name == "kiln_requests_total")
    return total


def upstream_requests(envoy: Envoy, cluster: str) -> int:
    """Requests Envoy sent to a cluster (`cluster.<name>.upstream_rq_total`; health checks excluded)."""
    for line in envoy.admin(f"/stats?filter=^cluster\\.{cluster}\\.upstream_rq_total$").splitlines():
        name, _, value = line.partition(": ")
        if name == f"cluster.{cluster}.upstream_rq_total":
            return int(value)
    raise AssertionError(f"no upstream_rq_total for {cluster}")


def error_reason(status: status_pb2.Status) -> str:
    """The `google.rpc.ErrorInfo` reason in a status's details; "" when it has none."""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason: str = info.reason
            return reason
    return ""


def json_error_reason(body: dict[str, Any]) -> str:
    """`error_reason` of a transcoded JSON error body."""
    return error_reason(json_format.ParseDict(body, status_pb2.Status()))


def session_replica(value: str) -> str:
    """The upstream (`host:port`) a session header value names.

    Clients treat the value as opaque; tests decode it (Envoy's header-based session state writes
    the base64 of the upstream address) to tell which replica answered.
    """
    return base64.b64decode(value).decode()


def bad_request_violations(body: dict[str, Any]) -> list[dict[str, Any]]:
    for detail in body.get("details", []):
        if detail.get("@type") == "type.googleapis.com/google.rpc.BadRequest":
            violations: list[dict[str, Any]] = detail["fieldViolations"]
            return violations
    raise AssertionError(f"no BadRequest in {json.dumps(body)[:500]}")


@asynccontextmanager
async def envoy_running(
    img2img_ports: list[int] | None = None, mesh_ports: list[int] | None = None, **settings: Any
) -> AsyncIterator[Envoy]:
    """`envoy_for`, but Envoy starts and stops in a thread, so the event loop stays free.

    Envoy's first health checks go out while it starts; the in-process servers run on this
    loop and can only answer them if `Envoy.start` does not block it. Under `envoy_for` they time
    out and every host starts as `/failed_active_hc/active_hc_timeout` (traffic still flows,
    in panic mode) until the next check `health_check_no_traffic_interval_s` later.
    """
    gateway = GatewaySettings(
        _env_file=None,
        port=0,
        admin_port=0,
        img2img_upstreams=[f"127.0.0.1:{port}" for port in img2img_ports or []] or [UNUSED_UPSTREAM],
        mesh_upstreams=[f"127.0.0.1:{port}" for port in mesh_ports or []] or [UNUSED_UPSTREAM],
        **settings,
    )
    envoy = Envoy(gateway)
    await asyncio.to_thread(envoy.start)
    try:
        yield envoy
    finally:
        await asyncio.to_thread(envoy.stop)
