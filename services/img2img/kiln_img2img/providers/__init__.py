"""img2img providers, chosen by `KILN_IMG2IMG__PROVIDER` through this registry."""

from __future__ import annotations

from collections.abc import Callable

from kiln_img2img.config import Img2ImgProviderSettings
from kiln_img2img.providers.base import Img2ImgModel
from kiln_img2img.providers.fake import FakeImg2ImgProvider
from kiln_runtime.device import DeviceChoice

PROVIDERS: dict[str, Callable[[Img2ImgProviderSettings, DeviceChoice], Img2ImgModel]] = {
    # The fake runs no model, so it ignores the device choice.
    "fake": lambda settings, device: FakeImg2ImgProvider(settings.fake),
}


def create_provider(settings: Img2ImgProviderSettings, device: DeviceChoice) -> Img2ImgModel:
    return PROVIDERS[settings.provider](settings, device)
