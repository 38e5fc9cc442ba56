"""`python -m gateway.kiln_gateway` (from the repository root): run the gateway in the foreground.

Reads `GatewaySettings` from the environment (`KILN_GATEWAY__...`) and `.env`, renders and
validates the config, runs Envoy until SIGINT/SIGTERM, then stops it. `--print-config`
prints the rendered YAML and exits; `--state-dir` keeps the config and log in a folder.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from .launcher import Envoy, EnvoyError
from .render import render_config
from .settings import GatewaySettings


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
    settings = GatewaySettings()
    if args.print_config:
        sys.stdout.write(render_config(settings))
        return 0

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
        while not stopping.wait(0.5):
            if envoy.process is None or envoy.process.poll() is not None:
                print(f"envoy exited; see {envoy.log_path}", file=sys.stderr)
                return 1
        return 0
    finally:
        envoy.stop()


if __name__ == "__main__":
    sys.exit(main())
