"""Which device and dtype a model runs on.

The policy is one pure function, `choose_device`, so every combination of setting and hardware
can be tested without the hardware; `probe_devices` is the only part that asks torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Literal

from kiln_runtime.settings import CudaDtype, DevicePolicy

DeviceName = Literal["cuda", "mps", "cpu"]
DtypeName = Literal["float16", "bfloat16", "float32"]


@dataclass(frozen=True)
class DeviceAvailability:
    """What this machine offers, as seen by torch.

    Attributes:
        cuda: A CUDA device is usable.
        mps: An Apple GPU (Metal Performance Shaders) is usable.
        bf16_supported: The CUDA device computes in bfloat16 (Ampere and newer); False without CUDA.
    """

    cuda: bool
    mps: bool
    bf16_supported: bool = False


@dataclass(frozen=True)
class DeviceChoice:
    """The device and compute dtype a model is loaded with.

    Attributes:
        device: torch device type: "cuda", "mps" or "cpu".
        dtype: torch dtype name: "float16", "bfloat16" or "float32".
    """

    device: DeviceName
    dtype: DtypeName


# What providers that run no model here (the fake, vendor APIs) report.
CPU = DeviceChoice("cpu", "float32")


class DeviceUnavailable(RuntimeError):
    """A device was named explicitly in the settings but this machine does not have it."""


def choose_device(
    policy: DevicePolicy,
    cuda_dtype: CudaDtype,
    available: DeviceAvailability,
    *,
    setting_name: str = "runtime.device",
) -> DeviceChoice:
    """Apply the device policy to what the machine offers.

    `auto` takes CUDA, then MPS, then CPU. A named device that is missing is an error, never a
    silent fallback: an operator who asked for the GPU would otherwise get a server that is
    hundreds of times slower and looks healthy. `cpu` always works.

    Args:
        policy: The `runtime.device` setting.
        cuda_dtype: The `runtime.cuda_dtype` setting; used only when the choice is CUDA.
        available: What the machine offers (`probe_devices()` in production).
        setting_name: Dotted path of the device setting, for messages, e.g.
            "img2img.runtime.device"; the sibling `cuda_dtype` setting is named from it.

    Returns:
        The device and dtype to load the model with.

    Raises:
        DeviceUnavailable: `policy` names cuda or mps and the machine lacks it.
        ValueError: CUDA was chosen with bfloat16 on a device without bfloat16 support, or
            `policy` is not a known policy.
    """
    if policy == "auto":
        device: DeviceName = "cuda" if available.cuda else "mps" if available.mps else "cpu"
    elif policy == "cpu":
        device = "cpu"
    elif policy in ("cuda", "mps"):
        present = available.cuda if policy == "cuda" else available.mps
        if not present:
            raise DeviceUnavailable(
                f"{setting_name} is {policy!r} but this machine has no {policy.upper()} device "
                f"(available: {_describe(available)}); set {setting_name} "
                f"(environment {_env_name(setting_name)}) to 'auto' or 'cpu', or run on a machine with {policy.upper()}"
            )
        device = policy
    else:
        # The Literal type keeps this out of typed callers; guard the rest (raw strings, YAML).
        raise ValueError(f"{setting_name} must be one of auto, cuda, mps, cpu; got {policy!r}")

    if device == "cuda":
        if cuda_dtype == "bfloat16" and not available.bf16_supported:
            # Falling back to float16 silently would change numerics (and can overflow where
            # bfloat16 does not), so the operator has to choose.
            dtype_setting = _sibling(setting_name, "cuda_dtype")
            raise ValueError(
                f"{dtype_setting} is 'bfloat16' but this CUDA device does not support bfloat16; "
                f"set {dtype_setting} (environment {_env_name(dtype_setting)}) to 'float16'"
            )
        return DeviceChoice(device="cuda", dtype=cuda_dtype)
    if device == "mps":
        # float32 on Apple GPUs: the diffusion VAE decoder overflows in float16 on MPS and yields
        # black or NaN images, and bfloat16 support there is partial; correctness beats speed.
        return DeviceChoice(device="mps", dtype="float32")
    # CPU half precision is slow or unsupported for many kernels; float32 is the only sane choice.
    return DeviceChoice(device="cpu", dtype="float32")


MPS_FALLBACK_ENV = "PYTORCH_ENABLE_MPS_FALLBACK"


@dataclass(frozen=True)
class MpsFallback:
    """What `configure_mps_fallback` decided, for the startup log.

    Attributes:
        value: The variable's value in force ("1" or "0"), or None where it does not apply.
        source: "environment" (the operator set it), "settings" (Kiln set it), or "not applicable".
        effective: False when torch was imported before the variable was set: torch reads it once,
            when its library loads, so a later change does nothing.
    """

    value: str | None
    source: str
    effective: bool = True


def configure_mps_fallback(
    enabled: bool,
    policy: DevicePolicy,
    *,
    environ: MutableMapping[str, str] | None = None,
    platform: str | None = None,
    torch_imported: bool | None = None,
) -> MpsFallback:
    """Decide `PYTORCH_ENABLE_MPS_FALLBACK` before torch is imported.

    torch reads the variable once, when its library loads, and parses it as an integer: "1" runs
    ops that have no Metal kernel on the CPU (slower, with one warning per op in the log), "0" or
    unset makes such an op fail the job with NotImplementedError. Kiln turns the fallback on by
    default (`runtime.mps_fallback`): a Mac user would rather have a slow op than a model that
    fails on a kernel the next torch release adds. A value the operator put in the environment
    always wins. Only macOS with a policy that may pick MPS is touched; elsewhere the variable
    means nothing.

    Args:
        enabled: The `runtime.mps_fallback` setting.
        policy: The `runtime.device` setting: cpu and cuda never use MPS.
        environ: The process environment (injected by tests).
        platform: `sys.platform` (injected by tests).
        torch_imported: Whether torch is already loaded; default: looked up in `sys.modules`.

    Returns:
        What is in force and where it came from.
    """
    environ = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    if torch_imported is None:
        torch_imported = "torch" in sys.modules
    if platform != "darwin" or policy not in ("auto", "mps"):
        return MpsFallback(value=None, source="not applicable")
    if MPS_FALLBACK_ENV in environ:
        return MpsFallback(value=environ[MPS_FALLBACK_ENV], source="environment")
    value = "1" if enabled else "0"
    environ[MPS_FALLBACK_ENV] = value
    return MpsFallback(value=value, source="settings", effective=not torch_imported)


def probe_devices() -> DeviceAvailability:
    """Ask torch what this machine offers.

    torch is imported here, not at module import, so that importing Kiln (settings, tests, the
    CLI's --help) does not pay torch's import time or require it at all.

    Returns:
        The availability; all False when torch is not installed.
    """
    try:
        import torch
    except ImportError:
        return DeviceAvailability(cuda=False, mps=False, bf16_supported=False)

    cuda = bool(torch.cuda.is_available())
    mps_backend = getattr(torch.backends, "mps", None)
    mps = bool(mps_backend is not None and mps_backend.is_available())
    bf16 = bool(cuda and torch.cuda.is_bf16_supported())
    return DeviceAvailability(cuda=cuda, mps=mps, bf16_supported=bf16)


def _describe(available: DeviceAvailability) -> str:
    present = [name for name, ok in (("cuda", available.cuda), ("mps", available.mps)) if ok]
    return ", ".join([*present, "cpu"])


def _sibling(setting_name: str, field: str) -> str:
    parent, _, _ = setting_name.rpartition(".")
    return f"{parent}.{field}" if parent else field


def _env_name(setting_name: str) -> str:
    """The environment variable for a dotted setting path (`KILN_` prefix, `__` between levels)."""
    parts = setting_name.split(".")
    if len(parts) == 2 and parts[0] == "runtime":
        # The runtime section lives under each server's own section; without the server's name
        # the best we can do is show where it goes.
        parts = ["<SERVICE>", *parts]
    return "KILN_" + "__".join(part.upper() for part in parts)
