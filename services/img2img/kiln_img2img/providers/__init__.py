"""img2img providers, chosen by `KILN_IMG2IMG__PROVIDER` through this registry."""

from __future__ import annotations

from collections.abc import Callable

from kiln_img2img.config import Img2ImgSettings
from kiln_img2img.providers.base import Img2ImgModel
from kiln_img2img.providers.fake import FakeImg2ImgProvider
from kiln_runtime.device import DeviceChoice
from kiln_runtime.model_source import offline_requested
from kiln_runtime.telemetry.logging import adopt_library_logging


def _local(settings: Img2ImgSettings, device: DeviceChoice) -> Img2ImgModel:
    # Routed before the import: diffusers and transformers log while their modules load.
    adopt_library_logging()
    # Imported here so that servers with other providers never import torch and diffusers.
    from kiln_img2img.providers.diffusers_local import DiffusersImg2ImgProvider

    section = settings.img2img
    return DiffusersImg2ImgProvider(
        section.model, section.diffusers, device, offline=offline_requested(settings.offline)
    )


def _gemini(settings: Img2ImgSettings, device: DeviceChoice) -> Img2ImgModel:
    from kiln_img2img.providers.gemini import GeminiImg2ImgProvider

    return GeminiImg2ImgProvider(settings.img2img.gemini)


PROVIDERS: dict[str, Callable[[Img2ImgSettings, DeviceChoice], Img2ImgModel]] = {
    "local": _local,
    "gemini": _gemini,
    # The fake runs no model, so it ignores the device choice.
    "fake": lambda settings, device: FakeImg2ImgProvider(settings.img2img.fake),
}


# Providers that run a model here and so need the device policy applied at startup.
RUNS_LOCALLY = frozenset({"local"})


def create_provider(settings: Img2ImgSettings, device: DeviceChoice) -> Img2ImgModel:
    return PROVIDERS[settings.img2img.provider](settings, device)
