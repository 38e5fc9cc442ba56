"""tests/tools.py: grpcurl and the browser are found, or their tests skip (fail under CI) saying how to get them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import tools


def fake_program(folder: Path, name: str, output: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    # printf is a shell builtin: PATH holds only the fakes here.
    path.write_text(f"#!/bin/sh\nprintf '%s\\n' '{output}' >&2\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def bare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No wheel next to the interpreter, a PATH of one empty folder, no overrides, not CI."""
    monkeypatch.setattr(sys, "executable", str(tmp_path / "venv" / "bin" / "python"))
    for name in ("KILN_GRPCURL", "KILN_CHROMIUM", "CI"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "path"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    tools._grpcurl.cache_clear()
    yield folder
    tools._grpcurl.cache_clear()  # the rest of the session looks again, in the real environment


def test_parse_grpcurl_version() -> None:
    assert tools.parse_grpcurl_version("grpcurl v1.8.6\n") == (1, 8, 6)
    assert tools.parse_grpcurl_version("grpcurl v1.9.3") == (1, 9, 3)
    assert tools.parse_grpcurl_version("grpcurl dev build <no version set>") is None


def test_grpcurl_on_path_is_used(bare: Path) -> None:
    fake = fake_program(bare, "grpcurl", "grpcurl v1.9.3")
    assert tools.grpcurl_executable() == str(fake)


def test_missing_grpcurl_skips_with_the_install_command(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(pytest.skip.Exception, match="grpcurl not found") as skipped:
        tools.grpcurl_executable()
    assert tools.grpcurl_install_hint() in str(skipped.value)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run these tests"):
        tools.grpcurl_executable()


def test_an_old_grpcurl_is_not_used(bare: Path) -> None:
    fake_program(bare, "grpcurl", "grpcurl v1.8.5")
    with pytest.raises(pytest.skip.Exception, match=r"not grpcurl 1\.8\.6 or later"):
        tools.grpcurl_executable()


@pytest.mark.parametrize(("value", "ci"), [("true", True), ("1", True), ("false", False), ("0", False), ("", False)])
def test_under_ci(value: str, ci: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", value)
    assert tools.under_ci() is ci


def test_browser_from_kiln_chromium_or_path(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chrome = fake_program(bare, "google-chrome", "")
    assert tools.chromium_executable() == str(chrome)
    chosen = fake_program(bare.parent / "elsewhere", "my-chromium", "")
    monkeypatch.setenv("KILN_CHROMIUM", str(chosen))
    assert tools.chromium_executable() == str(chosen)


def test_no_browser_skips_with_the_platform_s_install_command(bare: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if sys.platform == "darwin" and any(Path(c).exists() for c in tools.chromium_candidates() if c.startswith("/")):
        pytest.skip("a browser app is installed in /Applications here")
    with pytest.raises(pytest.skip.Exception, match="Chrome or Chromium") as skipped:
        tools.chromium_executable()
    assert tools.chromium_install_hint() in str(skipped.value)
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception):
        tools.chromium_executable()


def test_macos_looks_in_the_app_bundles_and_says_brew(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.delenv("KILN_CHROMIUM", raising=False)
    candidates = tools.chromium_candidates()
    assert "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome" in candidates
    assert candidates[:4] == list(tools.CHROMIUM_COMMANDS)
    assert tools.chromium_install_hint().startswith("brew install --cask chromium")
    assert tools.grpcurl_install_hint() == "brew install grpcurl"


def test_the_real_grpcurl_is_found() -> None:
    tools._grpcurl.cache_clear()
    path = tools.grpcurl_executable()
    assert Path(path).is_file()
