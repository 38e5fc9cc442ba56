"""`python -m gateway.kiln_gateway` (from the repository root): run the gateway in the foreground.

Reads `GatewaySettings` from the environment (`KILN_GATEWAY__...`) and `.env`, renders and
validates the config, runs Envoy until SIGINT/SIGTERM, then stops it. `--print-config`
prints the rendered YAML and exits; `--state-dir` keeps the config and log in a folder.

Settings that would expose an unauthenticated gateway (auth mode none off loopback) or a broken
keys file stop it before Envoy starts, with exit status 2. The rendered config never holds API
keys (Envoy reads the keys file itself), so `--print-config` shows nothing secret.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from pydantic import ValidationError

from .auth import check_api_keys_file
from .launcher import Envoy, EnvoyError
from .render import render_config
from .settings import GatewaySettings, is_loopback


def auth_banner(settings: GatewaySettings, port: int) -> str:
    """One line saying who may call the gateway."""
    auth = settings.auth
    if auth.mode == "api_key":
        return f"auth: api_key (keys from {auth.api_keys_file}, read again within seconds of a change)"
    if auth.mode == "jwt":
        source = auth.jwt.jwks_file or auth.jwt.jwks_uri
        return f"auth: jwt (issuer {auth.jwt.issuer}, audiences {', '.join(auth.jwt.audiences)}, keys from {source})"
    where = f"{settings.host}:{port}"
    if is_loopback(settings.host):
        return (
            f"auth: none — anyone who can reach {where} may run jobs; "
            "set KILN_GATEWAY__AUTH__MODE=api_key and KILN_GATEWAY__AUTH__API_KEYS_FILE to require keys"
        )
    return f"auth: none on {where} (KILN_GATEWAY__AUTH__ALLOW_ANONYMOUS) — anyone who can reach it may run jobs"


def main(argv: list[str] | None = None) -> int:
    """Run the gateway until interrupted.

    Args:
        argv: Command-line arguments (default `sys.argv[1:]`).

    Returns:
        The process exit status.
    """
    parser = argparse.ArgumentParser(prog="kiln_gateway", description=__doc__)
    parser.add_argument("--print-config", action="store_true", help="print the rendered Envoy YAML and exit")
    parser.add_argument("--state-dir", type=Path, default=None, help="folder for envoy.yaml and envoy.log")
    args = parser.parse_args(argv)
    try:
        settings = GatewaySettings()
    except ValidationError as error:
        reasons = "\n".join(f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in error.errors())
        print(f"kiln_gateway: invalid settings:\n{reasons}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(render_config(settings))
        return 0

    # A keys file Envoy could not read would only show as 503s later: say it now.
    try:
        for warning in check_api_keys_file(settings):
            print(f"kiln_gateway: warning: {warning}", file=sys.stderr)
    except ValueError as error:
        print(f"kiln_gateway: {error}", file=sys.stderr)
        return 2

    stopping = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    envoy = Envoy(settings, state_dir=args.state_dir)
    try:
        envoy.start()
    except EnvoyError as error:
        print(error, file=sys.stderr)
        return 1
    try:
        print(
            f"gateway on {settings.host}:{envoy.port} (admin 127.0.0.1:{envoy.admin_port}); "
            f"config {envoy.config_path}, log {envoy.log_path}",
            flush=True,
        )
        print(auth_banner(settings, envoy.port), flush=True)
        while not stopping.wait(0.5):
            if envoy.process is None or envoy.process.poll() is not None:
                print(f"envoy exited; see {envoy.log_path}", file=sys.stderr)
                return 1
        return 0
    finally:
        envoy.stop()


if __name__ == "__main__":
    sys.exit(main())
