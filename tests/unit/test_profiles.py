"""`KILN_PROFILE=laptop`: lazy load, idle unload, one job at a time, attention slicing — as
defaults only, so anything the operator sets still wins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kiln_img2img.config import Img2ImgSettings
from kiln_mesh.config import MeshSettings
from kiln_runtime.profiles import LAPTOP_KEEP_ALIVE_S
from kiln_runtime.settings import RuntimeSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("KILN_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def runtimes() -> tuple[RuntimeSettings, RuntimeSettings]:
    return Img2ImgSettings().img2img.runtime, MeshSettings().mesh.runtime


def test_default_profile_keeps_models_loaded_from_startup() -> None:
    for runtime in runtimes():
        assert (runtime.keep_alive, runtime.load_on_startup, runtime.max_concurrency) == (None, True, 1)
    assert Img2ImgSettings().img2img.diffusers.attention_slicing == "auto"


def test_laptop_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_PROFILE", "laptop")
    for runtime in runtimes():
        assert runtime.keep_alive == LAPTOP_KEEP_ALIVE_S == 300.0
        assert runtime.load_on_startup is False
        assert runtime.max_concurrency == 1
    img2img = Img2ImgSettings().img2img
    assert img2img.diffusers.attention_slicing is True
    assert img2img.diffusers.slices_attention("cpu") is True
    # The profile touches the runtime only: each server keeps its own ports.
    assert (img2img.server.port, MeshSettings().mesh.server.port) == (50051, 50052)


def test_laptop_profile_from_a_dotenv_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("KILN_PROFILE=laptop\n")
    assert MeshSettings().mesh.runtime.keep_alive == LAPTOP_KEEP_ALIVE_S


def test_what_the_operator_sets_wins_over_the_profile(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_PROFILE", "laptop")
    monkeypatch.setenv("KILN_IMG2IMG__RUNTIME__KEEP_ALIVE", "0")
    monkeypatch.setenv("KILN_IMG2IMG__DIFFUSERS__ATTENTION_SLICING", "false")
    monkeypatch.setenv("KILN_MESH__RUNTIME__MAX_CONCURRENCY", "2")
    monkeypatch.setenv("KILN_MESH__RUNTIME__LOAD_ON_STARTUP", "true")
    img2img, mesh = Img2ImgSettings().img2img, MeshSettings().mesh
    assert img2img.runtime.keep_alive == 0.0
    assert img2img.runtime.load_on_startup is False  # not set: the profile's
    assert img2img.diffusers.attention_slicing is False
    assert mesh.runtime.max_concurrency == 2
    assert mesh.runtime.load_on_startup is True
    assert mesh.runtime.keep_alive == LAPTOP_KEEP_ALIVE_S  # not set: the profile's


def test_unknown_profile_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_PROFILE", "desktop")
    with pytest.raises(ValueError, match="laptop"):
        MeshSettings()
