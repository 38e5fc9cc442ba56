"""`python -m kiln_runtime.healthcheck`: exit 0 only when a server answers SERVING on grpc.health.v1.

The container images' Docker HEALTHCHECK runs it: Docker has no gRPC probe, and a
grpc_health_probe binary would be one more download to pin. Kubernetes does not need it (its
native `grpc` probe asks the same question). It asks once, with a deadline, and never waits
for the server: a loading model (NOT_SERVING), a draining server (NOT_SERVING, then
connection refused), an unknown service name (NOT_FOUND) and silence all exit 1, with one
line saying which on stdout (Docker keeps it in `docker inspect`).

    python -m kiln_runtime.healthcheck --port 50051 --service kiln.img2img.v1.Img2ImgProvider
"""

from __future__ import annotations

import argparse
import sys
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

HEALTHY = 0
UNHEALTHY = 1  # Docker reserves 2; Kubernetes exec probes treat any non-zero alike


def check(target: str, service: str, timeout_s: float) -> tuple[bool, str]:
    """Ask `target`'s health service about `service` once.

    Args:
        target: host:port of the gRPC server.
        service: The service name to ask about; "" is the server as a whole.
        timeout_s: Deadline of the one call, in seconds.

    Returns:
        Whether the answer was SERVING, and a one-line description of the answer.
    """
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            # The errors a blocking call raises are also grpc.Call (code and details).
            call = cast(grpc.Call, err)
            code = call.code().name if hasattr(err, "code") else "ERROR"
            details = call.details() if hasattr(err, "details") else str(err)
            return False, f"{target} {service or '(server)'}: {code}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return response.status == health_pb2.HealthCheckResponse.SERVING, f"{target} {service or '(server)'}: {status}"


def main(argv: list[str] | None = None) -> int:
    """Check once and return the exit status (0 SERVING, 1 anything else)."""
    parser = argparse.ArgumentParser(prog="python -m kiln_runtime.healthcheck", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, required=True, help="the server's gRPC port")
    parser.add_argument("--service", default="", help='service name to ask about; "" (default) is the whole server')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    args = parser.parse_args(argv)
    serving, line = check(f"{args.host}:{args.port}", args.service, args.timeout)
    print(line, flush=True)
    return HEALTHY if serving else UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
