"""Turning a decoded upload into the exact RGB image the img2img pipeline may see.

diffusers' img2img pipeline trusts its input far too much (see the research note,
diffusers_offline.md §6): it ignores EXIF orientation, treats any 4-channel image (RGBA,
CMYK) as *latents* and silently returns a garbage image 8x larger, crashes inside the VAE
on 1-channel images (L, LA, P, I;16, 1), and silently resizes sizes that are not a multiple
of 8. `prepare_image` removes every one of those traps before the model runs, so that
nothing but a 3-channel RGB image of a known size ever reaches the pipeline.

Output size: the prepared image keeps the input's size (after EXIF orientation) when both
sides are already multiples of 8 and the longer side is within `max_side`. Otherwise it is
the size after scaling down to fit `max_side` (keeping the aspect ratio) and rounding each
side down to a multiple of 8, which is the old server's rule; the image is resized, never
cropped, to that size. The result's `width`/`height` fields report this prepared size, and
`PreparedImage.original_size` keeps what the user sent so the two can be compared.

Everything here is pure Pillow/numpy (no torch), so it runs before a slot is taken.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from kiln_runtime.errors import FieldViolation, InvalidArgument

# Transparent pixels become this colour: white reads as "no background" to people and to
# SD1.5, whereas Pillow's plain convert("RGB") would expose whatever colour the transparent
# pixels happen to store (often black).
BACKGROUND = (255, 255, 255)

# Modes that carry an alpha channel, premultiplied or not.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# 16-bit greyscale in its byte orders. Pillow's own convert() clips these at 255 instead of
# scaling, which turns almost every real 16-bit image white.
_UINT16_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


@dataclass(frozen=True)
class PreparedImage:
    """An upload made safe for the pipeline.

    Attributes:
        image: Mode RGB, both sides multiples of 8 and within the requested bounds.
        original_size: (width, height) of the upload after EXIF orientation, i.e. as a
            person viewing it sees it; compare with `image.size` to explain a size change.
        resized: True when `image` was scaled and/or rounded to a multiple of 8, so the
            result will not have the uploaded size.
    """

    image: Image.Image
    original_size: tuple[int, int]
    resized: bool


def prepare_image(image: Image.Image, *, max_side: int = 768, min_side: int = 64, multiple: int = 8) -> PreparedImage:
    """Orient, convert to RGB, validate and size an upload for SD1.x img2img.

    Args:
        image: A decoded image in any Pillow mode (see `kiln_runtime.images.decode_image`).
        max_side: The longest side allowed; larger images are scaled down (LANCZOS) to fit,
            since SD1.5 is trained at 512 and cost grows with the square of the size.
        min_side: The smallest side accepted, checked on the oriented upload and again
            after scaling, because the model cannot produce anything useful below it.
        multiple: Both output sides are rounded down to a multiple of this (the VAE's
            downscale factor), so diffusers never resizes behind our back.

    Returns:
        The prepared RGB image with its original size and whether it was resized.

    Raises:
        InvalidArgument: On field "image", when a side is smaller than `min_side` (before
            or after scaling to `max_side`) or the mode cannot be converted to RGB.
        ValueError: When the arguments contradict each other (a programming error).
    """
    if multiple < 1 or min_side < multiple or max_side < min_side:
        raise ValueError(f"need 1 <= multiple <= min_side <= max_side, got {multiple}, {min_side}, {max_side}")

    # diffusers never applies EXIF orientation, so a phone photo would be processed on its side.
    oriented = ImageOps.exif_transpose(image)
    width, height = oriented.size
    if min(width, height) < min_side:
        raise _invalid(f"is {width}x{height}; the smallest side must be at least {min_side} pixels")

    target = _target_size(width, height, max_side=max_side, multiple=multiple)
    if min(target) < min_side:
        # Only extreme aspect ratios get here: scaling the long side to max_side shrinks the
        # short one below what the model can work with.
        raise _invalid(
            f"is {width}x{height}; fitting it within {max_side} pixels would make it {target[0]}x{target[1]}, "
            f"and the smallest side must be at least {min_side} pixels (use a less elongated image)"
        )

    rgb = to_rgb(oriented)
    resized = target != (width, height)
    if resized:
        # One LANCZOS resize straight to the rounded size: scaling and rounding are done in
        # a single resampling, which is both sharper and cheaper than two.
        rgb = rgb.resize(target, Image.Resampling.LANCZOS)
    return PreparedImage(image=rgb, original_size=(width, height), resized=resized)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB, compositing transparency on white.

    Every mode is handled explicitly because diffusers reads the channel count, not the
    mode: 4 channels are taken for latents and 1 channel crashes the VAE.

    Args:
        image: An image in any mode.

    Returns:
        An image in mode RGB (the same object when it already is RGB without transparency).

    Raises:
        InvalidArgument: On field "image", for a mode Pillow cannot convert to RGB.
    """
    mode = image.mode
    if mode in _UINT16_MODES or mode in ("I", "F"):
        return _high_depth_to_rgb(image)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        # Covers P with a tRNS palette and L/RGB PNGs with a transparent colour key too.
        return _composite_on_white(image)
    if mode == "RGB":
        return image
    try:
        # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX: Pillow's conversions are exact for these
        # (LAB was checked against LittleCMS; CMYK is the plain uncalibrated formula).
        return image.convert("RGB")
    except ValueError:
        raise _invalid(f"has pixel mode {mode}, which cannot be converted to RGB; send an RGB image") from None


def _composite_on_white(image: Image.Image) -> Image.Image:
    # "La" (premultiplied LA) has no direct conversion in Pillow; go through "LA" first.
    source = image.convert("LA") if image.mode == "La" else image
    rgba = source.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float greyscale to 8 bits instead of clipping.

    The ranges are fixed by mode, never stretched per image, so a dark picture stays dark:
    I;16 and I span 0..65535 (Pillow decodes 16-bit greyscale PNGs to one or the other,
    depending on its version), F spans 0.0..1.0 (the float convention of numpy and diffusers).
    """
    values = np.asarray(image, dtype=np.float64)
    full_scale = 1.0 if image.mode == "F" else 65535.0
    # nan_to_num: a float image may hold NaN, which has no 8-bit value; call it black.
    scaled = np.nan_to_num(values * (255.0 / full_scale), nan=0.0, posinf=255.0, neginf=0.0)
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    transparency = image.info.get("transparency")
    if isinstance(transparency, int | float) and image.mode != "F":
        # A 16-bit PNG's tRNS colour key is in 16-bit units: compare before scaling.
        alpha = Image.fromarray(np.where(values == transparency, 0, 255).astype(np.uint8))
        canvas = Image.new("L", grey.size, 255)
        canvas.paste(grey, mask=alpha)
        grey = canvas
    return grey.convert("RGB")


def _target_size(width: int, height: int, *, max_side: int, multiple: int) -> tuple[int, int]:
    longest = max(width, height)
    if longest > max_side:
        # Integer arithmetic: float scaling can land on 767.999... and lose a whole multiple.
        width, height = (width * max_side) // longest, (height * max_side) // longest
    return (width // multiple) * multiple, (height // multiple) * multiple


def _invalid(description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation("image", description)])
