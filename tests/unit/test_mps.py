"""Apple GPUs (MPS) without one: the device policy's MPS branch, the fallback variable, attention
slicing, and the providers built for MPS, all with injected availability and platform."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln_img2img.config import DiffusersSettings, Img2ImgSettings
from kiln_runtime import bootstrap
from kiln_runtime.device import (
    MPS_FALLBACK_ENV,
    DeviceAvailability,
    DeviceChoice,
    configure_mps_fallback,
)
from kiln_runtime.settings import DevicePolicy, RuntimeSettings, ServiceSettings

MAC_WITH_MPS = DeviceAvailability(cuda=False, mps=True)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("KILN_") or name == MPS_FALLBACK_ENV:
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def on_a_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    """The startup path as on an Apple Silicon Mac: platform darwin, torch reports MPS."""
    # Imported first: libraries pick their platform modules at import time (psutil would look
    # for its macOS extension).
    import kiln_img2img.providers.diffusers_local  # noqa: F401
    import kiln_mesh.providers.triposr_local  # noqa: F401

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(bootstrap, "probe_devices", lambda: MAC_WITH_MPS)


# -- PYTORCH_ENABLE_MPS_FALLBACK ---------------------------------------------------------


@pytest.mark.parametrize(("enabled", "value"), [(True, "1"), (False, "0")])
@pytest.mark.parametrize("policy", ["auto", "mps"])
def test_fallback_is_set_from_the_setting_on_macos(enabled: bool, value: str, policy: DevicePolicy) -> None:
    environ: dict[str, str] = {}
    decided = configure_mps_fallback(enabled, policy, environ=environ, platform="darwin", torch_imported=False)
    assert environ == {MPS_FALLBACK_ENV: value}
    assert (decided.value, decided.source, decided.effective) == (value, "settings", True)


@pytest.mark.parametrize("enabled", [True, False])
def test_an_explicit_environment_value_wins(enabled: bool) -> None:
    environ = {MPS_FALLBACK_ENV: "0" if enabled else "1"}
    decided = configure_mps_fallback(enabled, "auto", environ=environ, platform="darwin", torch_imported=False)
    assert environ == {MPS_FALLBACK_ENV: "0" if enabled else "1"}  # untouched
    assert (decided.value, decided.source) == (environ[MPS_FALLBACK_ENV], "environment")


@pytest.mark.parametrize(
    ("platform", "policy"), [("linux", "auto"), ("linux", "mps"), ("darwin", "cpu"), ("darwin", "cuda")]
)
def test_not_touched_where_mps_cannot_be_used(platform: str, policy: DevicePolicy) -> None:
    environ: dict[str, str] = {}
    decided = configure_mps_fallback(True, policy, environ=environ, platform=platform, torch_imported=False)
    assert environ == {}
    assert (decided.value, decided.source) == (None, "not applicable")


def test_setting_it_after_torch_loaded_is_reported_as_ineffective() -> None:
    # torch parses the variable once, when its library loads; a later value changes nothing.
    environ: dict[str, str] = {}
    decided = configure_mps_fallback(True, "auto", environ=environ, platform="darwin", torch_imported=True)
    assert decided.effective is False
    assert environ == {MPS_FALLBACK_ENV: "1"}


def test_server_modules_do_not_import_torch() -> None:
    # The variable only works if the device probe is the process's first torch import.
    code = "import sys, kiln_img2img.__main__, kiln_mesh.__main__; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert result.stdout.strip() == "False"


# -- the startup path with an injected Mac -------------------------------------------------


@pytest.mark.usefixtures("on_a_mac")
def test_startup_on_a_mac_picks_mps_float32_and_sets_the_fallback() -> None:
    choice = bootstrap.choose_service_device("img2img", ServiceSettings())
    assert choice == DeviceChoice("mps", "float32")
    assert os.environ[MPS_FALLBACK_ENV] == "1"


@pytest.mark.usefixtures("on_a_mac")
def test_startup_on_a_mac_with_the_fallback_off() -> None:
    settings = ServiceSettings(runtime=RuntimeSettings(device="mps", mps_fallback=False))
    assert bootstrap.choose_service_device("mesh", settings) == DeviceChoice("mps", "float32")
    assert os.environ[MPS_FALLBACK_ENV] == "0"


@pytest.mark.usefixtures("on_a_mac")
def test_cpu_policy_on_a_mac_neither_probes_nor_sets_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> DeviceAvailability:
        raise AssertionError("a cpu policy must not probe (probing imports torch)")

    monkeypatch.setattr(bootstrap, "probe_devices", fail)
    settings = ServiceSettings(runtime=RuntimeSettings(device="cpu"))
    assert bootstrap.choose_service_device("img2img", settings) == DeviceChoice("cpu", "float32")
    assert MPS_FALLBACK_ENV not in os.environ


# -- attention slicing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "device", "expected"),
    [
        ("auto", "mps", True),
        ("auto", "cuda", False),
        ("auto", "cpu", False),
        (True, "cuda", True),
        (True, "cpu", True),
        (False, "mps", False),
    ],
)
def test_attention_slicing(setting: bool | str, device: str, expected: bool) -> None:
    assert DiffusersSettings(attention_slicing=setting).slices_attention(device) is expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("true", True), ("0", False), ("off", False)])
def test_attention_slicing_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: object) -> None:
    monkeypatch.setenv("KILN_IMG2IMG__DIFFUSERS__ATTENTION_SLICING", value)
    assert Img2ImgSettings().img2img.diffusers.attention_slicing == expected


def test_attention_slicing_rejects_other_words(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_IMG2IMG__DIFFUSERS__ATTENTION_SLICING", "sometimes")
    with pytest.raises(ValueError, match="attention_slicing"):
        Img2ImgSettings()


# -- the providers as built for a Mac --------------------------------------------------------


@pytest.mark.usefixtures("on_a_mac")
async def test_img2img_server_on_a_mac_builds_sd_on_mps_in_float32_with_slicing(tmp_path: Path) -> None:
    from kiln_img2img.server import create_server

    settings = Img2ImgSettings(img2img={"provider": "local", "server": {"port": 0, "metrics_port": 0}})
    server = create_server(settings)
    provider = server.runtime.manager.provider
    assert provider.describe().device == "mps"
    assert provider.describe().dtype == "float32"
    assert provider.settings.slices_attention(provider.device.device) is True  # type: ignore[attr-defined]


@pytest.mark.usefixtures("on_a_mac")
async def test_mesh_server_on_a_mac_builds_triposr_on_mps_in_float32(tmp_path: Path) -> None:
    from kiln_mesh.config import MeshSettings
    from kiln_mesh.server import create_server

    server = create_server(MeshSettings(mesh={"provider": "local", "server": {"port": 0, "metrics_port": 0}}))
    description = server.runtime.manager.provider.describe()
    assert (description.device, description.dtype) == ("mps", "float32")


def test_marching_cubes_for_an_mps_model_runs_pymcubes_on_the_cpu() -> None:
    # The torch marching cubes computes in float64, which Metal lacks; an MPS model's density
    # grid is meshed on the CPU. Passing the MPS device must give PyMCubes' result exactly.
    from kiln_mesh.extract import marching_cubes

    axis = np.linspace(-1.0, 1.0, 24, dtype=np.float32)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    volume = (0.6 - np.sqrt(x**2 + y**2 + z**2)).astype(np.float32)
    on_cpu = marching_cubes(volume, threshold=0.0, radius=1.0)
    for_mps = marching_cubes(volume, threshold=0.0, radius=1.0, device="mps")
    np.testing.assert_array_equal(for_mps[0], on_cpu[0])
    np.testing.assert_array_equal(for_mps[1], on_cpu[1])
    assert len(on_cpu[1]) > 100
