"""`python -m kiln_runtime.healthcheck`: exit 0 only when a server answers SERVING on grpc.health.v1.

The container images' Docker HEALTHCHECK runs it: Docker has no gRPC probe, and a
grpc_health_probe binary would be one more download to pin. Kubernetes does not need it (its
native `grpc` probe asks the same question). It asks once, with a deadline, and never waits
for the server: a loading model (NOT_SERVING), a draining server (NOT_SERVING, then
connection refused), an unknown service name (NOT_FOUND) and silence all exit 1, with one
line saying which on stdout (Docker keeps it in `docker inspect`).

    python -m kiln_runtime.healthcheck --port 50051 --service kiln.img2img.v1.Img2ImgProvider

A server whose gRPC port speaks TLS is checked with `--ca-file` (the CA that issued the server's
certificate), and under mutual TLS with `--cert-file`/`--key-file` too (a client certificate from
the CA the server requires). Each option also comes from the environment (KILN_HEALTHCHECK_CA_FILE,
..._CERT_FILE, ..._KEY_FILE, ..._SERVER_NAME), so an image's HEALTHCHECK line stays the same.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

#: The environment the options default from (not server settings: the check is its own program).
ENVIRONMENT = {
    "ca_file": "KILN_HEALTHCHECK_CA_FILE",
    "cert_file": "KILN_HEALTHCHECK_CERT_FILE",
    "key_file": "KILN_HEALTHCHECK_KEY_FILE",
    "server_name": "KILN_HEALTHCHECK_SERVER_NAME",
}
HEALTHY = 0
UNHEALTHY = 1  # Docker reserves 2; Kubernetes exec probes treat any non-zero alike


@dataclass(frozen=True)
class TlsFiles:
    """What the check needs to reach a TLS port: the CA, and for mutual TLS a client certificate."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        """Channel credentials from the files (OSError when one cannot be read)."""
        client = None
        if self.cert_file is not None and self.key_file is not None:
            client = (self.key_file.read_bytes(), self.cert_file.read_bytes())
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca_file.read_bytes(),
            private_key=client[0] if client else None,
            certificate_chain=client[1] if client else None,
        )


def _channel(target: str, tls: TlsFiles | None) -> grpc.Channel:
    if tls is None:
        return grpc.insecure_channel(target)
    # The certificate names the server's DNS name, while the check dials an address (127.0.0.1).
    options = [("grpc.ssl_target_name_override", tls.server_name)] if tls.server_name else []
    return grpc.secure_channel(target, tls.credentials(), options=options)


def check(target: str, service: str, timeout_s: float, tls: TlsFiles | None = None) -> tuple[bool, str]:
    """Ask `target`'s health service about `service` once.

    Args:
        target: host:port of the gRPC server.
        service: The service name to ask about; "" is the server as a whole.
        timeout_s: Deadline of the one call, in seconds.
        tls: Connect with TLS (and a client certificate) when given; plaintext when None.

    Returns:
        Whether the answer was SERVING, and a one-line description of the answer.
    """
    try:
        channel = _channel(target, tls)
    except OSError as error:
        return False, f"{target} {service or '(server)'}: cannot read a TLS file: {error}"
    with channel:
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
    env = os.environ.get
    parser.add_argument(
        "--ca-file",
        default=env(ENVIRONMENT["ca_file"]),
        help="PEM CA of a TLS server",
    )
    parser.add_argument("--cert-file", default=env(ENVIRONMENT["cert_file"]), help="client certificate (mutual TLS)")
    parser.add_argument("--key-file", default=env(ENVIRONMENT["key_file"]), help="client key (mutual TLS)")
    parser.add_argument(
        "--server-name", default=env(ENVIRONMENT["server_name"], ""), help="name the server certificate must hold"
    )
    args = parser.parse_args(argv)
    if bool(args.cert_file) != bool(args.key_file) or (args.cert_file and not args.ca_file):
        parser.error("--cert-file and --key-file go together, and with --ca-file")
    tls = None
    if args.ca_file:
        tls = TlsFiles(
            Path(args.ca_file),
            Path(args.cert_file) if args.cert_file else None,
            Path(args.key_file) if args.key_file else None,
            args.server_name,
        )
    serving, line = check(f"{args.host}:{args.port}", args.service, args.timeout, tls)
    print(line, flush=True)
    return HEALTHY if serving else UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
