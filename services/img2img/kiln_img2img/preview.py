"""A cheap look at the work in progress: SD1.x latents projected straight to RGB.

Decoding latents properly (the VAE, or even TAESD) costs from tens of milliseconds to
seconds per preview on a CPU (diffusers_offline.md §3). A fixed linear map from the 4
latent channels to RGB costs well under a millisecond and is good enough to show the
composition and colours emerging, at latent resolution (1/8 of the image side).

Where the coefficients come from: they are the SD1.x "latent to RGB" approximation factors
that ComfyUI ships for its live previews (`comfy/latent_formats.py`, class `SD15`). They are
an empirical linear fit between latents and decoded pixels, not something derived from the
VAE's weights; we could not refit them here (no real SD1.5 VAE weights offline), so they are
used as published. They apply to the *scaled* latents
(VAE output times 0.18215), which is what diffusers' pipeline holds during denoising and
hands to `callback_on_step_end`, and map them to roughly [-1, 1]. ComfyUI uses no bias for
SD1.x, so ours is zero in that space; `(x + 1) / 2` then maps to [0, 1]. Both steps are
folded into one 4x3 matrix and a bias in 0..255 units below, so a preview is a single
matrix multiply.

Note the latents seen during denoising are the noisy x_t, not the predicted clean image, so
early previews look noisy; that is expected.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from kiln_runtime.provider import PreviewImage

# Rows: latent channels 0..3; columns: R, G, B (ComfyUI's SD15 latent_rgb_factors).
_SD1_LATENT_RGB = (
    (0.3512, 0.2297, 0.3227),
    (0.3250, 0.4974, 0.2350),
    (-0.2829, 0.1762, 0.2721),
    (-0.2120, -0.2616, -0.7177),
)
_SD1_RGB_BIAS = (0.0, 0.0, 0.0)

# Folded into 0..255 units: rgb255 = (latents @ F + b + 1) * 127.5 = latents @ W + B.
_WEIGHT = torch.tensor(_SD1_LATENT_RGB, dtype=torch.float32) * 127.5
_BIAS = (torch.tensor(_SD1_RGB_BIAS, dtype=torch.float32) + 1.0) * 127.5

# Pillow format name -> (media type, save options). WebP method 0 is its fastest encoder
# setting: for a 128x128 preview it took half the time of the default method 4 (about 1.8 vs
# 3.7 ms on the shared CPU) for a file only ~5% larger.
_FORMATS: dict[str, tuple[str, dict[str, object]]] = {
    "WEBP": ("image/webp", {"method": 0}),
    "JPEG": ("image/jpeg", {}),
}


def latents_to_preview(
    latents: torch.Tensor, *, max_side: int = 128, fmt: str = "WEBP", quality: int = 70
) -> PreviewImage:
    """Render the first item of a batch of SD1.x latents as a small encoded RGB image.

    Args:
        latents: Shape (batch, 4, h, w), the scaled latents as the pipeline holds them, on
            any device and in any floating dtype; only the first batch item is used (and
            copied to the CPU), since a job's preview shows one image.
        max_side: Upper bound on the preview's longer side. The latent image is enlarged by
            the largest whole factor that fits (NEAREST, so latent pixels stay crisp and
            uniform) or, if it is already larger, reduced to fit.
        fmt: "WEBP" or "JPEG"; both are lossy and small, which suits a throwaway preview.
        quality: Encoder quality, 0..100.

    Returns:
        The encoded preview with its media type and pixel size.

    Raises:
        ValueError: For a tensor that is not (batch, 4, h, w) with batch >= 1, an unknown
            format or a `max_side` below 1.
    """
    if latents.ndim != 4 or latents.shape[0] < 1 or latents.shape[1] != 4:
        raise ValueError(f"expected SD1.x latents of shape (batch, 4, h, w), got {tuple(latents.shape)}")
    if fmt not in _FORMATS:
        raise ValueError(f"preview format must be one of {sorted(_FORMATS)}, got {fmt!r}")
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1, got {max_side}")

    # Slice before the copy so only one item crosses from the GPU; detach in case a caller
    # holds a tensor that requires grad (numpy() refuses those).
    first = latents[0].detach().to(device="cpu", dtype=torch.float32)
    rgb = torch.addmm(_BIAS, first.permute(1, 2, 0).reshape(-1, 4), _WEIGHT)
    # fp16 latents can overflow to inf/NaN; NaN has no pixel value, so map it to mid-grey.
    rgb = torch.nan_to_num(rgb, nan=127.5).clamp_(0.0, 255.0).round_()
    height, width = first.shape[1], first.shape[2]
    pixels = rgb.to(torch.uint8).reshape(height, width, 3).numpy()
    image = Image.fromarray(np.ascontiguousarray(pixels))

    image = _fit(image, max_side)
    media_type, options = _FORMATS[fmt]
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality, **options)
    return PreviewImage(media_type=media_type, data=buffer.getvalue(), width=image.width, height=image.height)


def _fit(image: Image.Image, max_side: int) -> Image.Image:
    longest = max(image.size)
    if longest > max_side:
        # Latents larger than the preview (only with a small max_side): average, don't alias.
        width, height = image.size
        size = (max(1, width * max_side // longest), max(1, height * max_side // longest))
        return image.resize(size, Image.Resampling.BILINEAR)
    factor = max_side // longest
    if factor > 1:
        return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    return image
