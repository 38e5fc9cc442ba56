"""Unit tests for kiln_img2img.preview: the linear latent-to-RGB preview and its encoding.

No timing assertions here (the shared CPU is too noisy); the benchmark measures the cost.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from kiln_img2img.preview import latents_to_preview
from kiln_runtime.provider import PreviewImage


def open_preview(preview: PreviewImage) -> Image.Image:
    image = Image.open(io.BytesIO(preview.data))
    image.load()
    return image


def latents(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_512_image_latents_give_a_128_webp() -> None:
    preview = latents_to_preview(latents(1, 4, 64, 64))  # the latents of a 512x512 image
    assert preview.media_type == "image/webp"
    assert (preview.width, preview.height) == (128, 128)
    image = open_preview(preview)
    assert image.format == "WEBP"
    assert image.mode == "RGB"
    assert image.size == (128, 128)


def test_jpeg() -> None:
    preview = latents_to_preview(latents(1, 4, 64, 64), fmt="JPEG", quality=50)
    assert preview.media_type == "image/jpeg"
    assert open_preview(preview).format == "JPEG"


@pytest.mark.parametrize(
    ("latent_hw", "max_side", "expected_wh"),
    [
        ((64, 64), 128, (128, 128)),  # enlarged by the whole factor 2
        ((72, 96), 128, (96, 72)),  # 768x576 image: no whole factor fits, kept at latent size
        ((9, 12), 128, (120, 90)),  # factor 10, aspect ratio kept
        ((64, 96), 48, (48, 32)),  # larger than max_side: reduced to fit
    ],
)
def test_size_keeps_aspect_and_fits_max_side(
    latent_hw: tuple[int, int], max_side: int, expected_wh: tuple[int, int]
) -> None:
    preview = latents_to_preview(latents(1, 4, *latent_hw), max_side=max_side)
    assert (preview.width, preview.height) == expected_wh
    assert open_preview(preview).size == expected_wh
    assert max(expected_wh) <= max_side


def test_nearest_upscaling_keeps_latent_pixels_as_uniform_blocks() -> None:
    # A lossless check of the pixels themselves would need PNG; JPEG at top quality is close
    # enough to see 2x2 blocks of one colour instead of blended edges.
    lat = torch.zeros(1, 4, 2, 2)
    lat[0, 0, 0, 0] = 3.0  # one bright latent pixel
    image = open_preview(latents_to_preview(lat, max_side=64, fmt="JPEG", quality=100))
    assert image.size == (64, 64)
    top_left = image.getpixel((5, 5))
    just_inside = image.getpixel((30, 30))
    outside = image.getpixel((40, 40))
    assert top_left == pytest.approx(just_inside, abs=6)
    assert top_left != pytest.approx(outside, abs=30)


def test_zero_latents_are_mid_grey() -> None:
    image = open_preview(latents_to_preview(torch.zeros(1, 4, 16, 16), fmt="JPEG", quality=100))
    assert image.getpixel((8, 8)) == pytest.approx((128, 128, 128), abs=2)


def test_the_projection_has_the_expected_colour_direction() -> None:
    # In SD1.x latents, a strongly negative fourth channel reads as blue.
    lat = torch.zeros(1, 4, 8, 8)
    lat[0, 3] = -1.0
    value = open_preview(latents_to_preview(lat, fmt="JPEG", quality=100)).getpixel((4, 4))
    assert isinstance(value, tuple)
    red, green, blue = value
    assert blue > 200 and blue > green > red


def test_different_latents_give_different_previews() -> None:
    first = latents_to_preview(latents(1, 4, 64, 64, seed=1))
    second = latents_to_preview(latents(1, 4, 64, 64, seed=2))
    assert first.data != second.data
    assert open_preview(first).tobytes() != open_preview(second).tobytes()


def test_same_latents_give_the_same_bytes() -> None:
    lat = latents(1, 4, 32, 32)
    assert latents_to_preview(lat).data == latents_to_preview(lat.clone()).data


def test_only_the_first_batch_item_is_shown() -> None:
    lat = latents(3, 4, 16, 16)
    other = lat.clone()
    other[1:] = 0.0
    assert latents_to_preview(lat).data == latents_to_preview(other).data
    assert latents_to_preview(lat).data == latents_to_preview(lat[:1]).data


def test_half_precision_and_grad_tensors_work() -> None:
    lat = latents(1, 4, 16, 16)
    half = latents_to_preview(lat.half())
    assert (half.width, half.height) == (128, 128)
    assert latents_to_preview(lat.clone().requires_grad_()).data == latents_to_preview(lat).data


def test_non_finite_values_do_not_break_the_preview() -> None:
    lat = latents(1, 4, 16, 16)
    lat[0, :, 0, 0] = float("nan")
    lat[0, :, 1, 1] = float("inf")
    assert open_preview(latents_to_preview(lat)).size == (128, 128)


@pytest.mark.parametrize("shape", [(4, 64, 64), (1, 3, 64, 64), (0, 4, 8, 8), (1, 16, 8, 8)])
def test_wrong_shapes_are_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="latents"):
        latents_to_preview(torch.zeros(*shape))


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="format"):
        latents_to_preview(torch.zeros(1, 4, 8, 8), fmt="GIF")
