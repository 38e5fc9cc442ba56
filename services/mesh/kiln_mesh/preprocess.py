"""TripoSR input preprocessing: background removal decision, foreground re-framing, grey fill.

These are pure functions over PIL images that reproduce the reference `run.py` bit for bit,
so a mesh made here matches one the
reference makes from the same file. The background remover itself is injected as a callable
(`kiln_mesh.background.BackgroundRemover` in the server, a spy in tests), so this module
never imports rembg.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from PIL import Image, ImageOps

from kiln_runtime.errors import FieldViolation, InvalidArgument

RemoveMode = Literal["AUTO", "ALWAYS", "NEVER"]
"""`AUTO` keeps a real alpha channel and removes the background otherwise; `ALWAYS` removes
it even when the image has alpha; `NEVER` uses the image as given (reference `--no-remove-bg`)."""

REMOVE_MODES: tuple[str, ...] = ("AUTO", "ALWAYS", "NEVER")

BackgroundRemoverFn = Callable[[Image.Image], Image.Image]
"""Takes an RGB or RGBA image, returns an RGBA image of the same size whose alpha is the mask."""

_ALPHA_BANDS = ("A", "a")


def has_real_alpha(image: Image.Image) -> bool:
    """Whether the image carries transparency that actually makes some pixel see-through.

    Covers modes with an alpha band (RGBA, LA, PA, premultiplied RGBa/La) and palette, grey or
    RGB images with a `transparency` entry (a transparent palette index or colour key). An
    alpha channel that is 255 everywhere is not "real": the reference then
    still runs background removal.

    Args:
        image: Any PIL image.

    Returns:
        True when at least one pixel has alpha below 255.
    """
    if "transparency" in image.info:
        # Colour-key / palette transparency only becomes an alpha band after conversion.
        alpha = image.convert("RGBA").getchannel("A")
    else:
        bands = image.getbands()
        band = next((b for b in _ALPHA_BANDS if b in bands), None)
        if band is None:
            return False
        alpha = image.getchannel(band)
    low, _high = alpha.getextrema()
    return int(low) < 255  # type: ignore[arg-type]  # getextrema of one band is (int, int)


def resize_foreground(image: Image.Image, ratio: float) -> Image.Image:
    """Crop to the visible object and pad it so it fills `ratio` of a square.

    Exactly the reference's `resize_foreground`, off-by-one included:

    1. bounding box of alpha > 0: rows y1..y2, columns x1..x2 (inclusive min/max);
    2. crop rows y1..y2-1 and columns x1..x2-1 (the reference slices `[y1:y2, x1:x2]`, so the
       box's last row and column are dropped; reproduced for identical output);
    3. pad to a square of side S = max(h, w), floor(d/2) before and the rest after;
    4. pad again to side int(S / ratio), split the same way.

    Padding is 0 in all four channels (transparent black). No resampling happens.

    Args:
        image: An RGBA image (other modes are converted to RGBA first).
        ratio: The share of the output side the object should fill, in (0, 1].

    Returns:
        A square RGBA image of side int(S / ratio).

    Raises:
        InvalidArgument: On field "image" when no pixel has alpha > 0, or when the crop is
            empty (a foreground one pixel high or wide vanishes through the off-by-one; the
            reference would produce an empty or all-background image there).
        ValueError: When `ratio` is outside (0, 1] (callers validate the request first).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"foreground ratio must be in (0, 1], got {ratio}")
    rgba = np.asarray(image.convert("RGBA") if image.mode != "RGBA" else image)
    rows, cols = np.nonzero(rgba[..., 3] > 0)
    if rows.size == 0:
        raise InvalidArgument([FieldViolation("image", "no foreground found after background removal")])
    y1, y2 = int(rows.min()), int(rows.max())
    x1, x2 = int(cols.min()), int(cols.max())
    # Spec 3.1 step 2: the reference's exclusive slice end drops the box's last row/column.
    foreground = rgba[y1:y2, x1:x2]
    height, width = foreground.shape[:2]
    if height == 0 or width == 0:
        description = "the foreground found after background removal is only 1 pixel wide or high"
        raise InvalidArgument([FieldViolation("image", description)])
    side = max(height, width)
    squared = _pad_centered(foreground, side)
    # int() floors like the reference's `int(new_image.shape[0] / ratio)`.
    return Image.fromarray(_pad_centered(squared, int(side / ratio)), mode="RGBA")


def _pad_centered(array: np.ndarray, side: int) -> np.ndarray:
    """Zero-pad an HxWxC array to side x side: floor(d/2) before, the remainder after."""
    height, width = array.shape[:2]
    top, left = (side - height) // 2, (side - width) // 2
    padding = ((top, side - height - top), (left, side - width - left), (0, 0))
    return np.pad(array, padding, mode="constant", constant_values=0)


def composite_grey(image: Image.Image) -> Image.Image:
    """Composite an RGBA image over 50 % grey as the reference does.

    float32 / 255, then rgb * a + 0.5 * (1 - a), * 255, converted to uint8 by truncation
    (numpy `astype`, no rounding), so values match the reference's `input.png` exactly.

    Args:
        image: An RGBA image (other modes are converted to RGBA first).

    Returns:
        The RGB image.
    """
    rgba = np.asarray(image.convert("RGBA") if image.mode != "RGBA" else image).astype(np.float32) / 255.0
    rgb, alpha = rgba[..., :3], rgba[..., 3:4]
    # Same float32 operation order as the reference so the truncation lands on the same values.
    grey = rgb * alpha + (1 - alpha) * 0.5
    return Image.fromarray((grey * 255.0).astype(np.uint8), mode="RGB")


def prepare_mesh_input(
    image: Image.Image,
    *,
    mode: str,
    ratio: float,
    remove: BackgroundRemoverFn | None,
) -> tuple[Image.Image, bool]:
    """Turn a decoded request image into the RGB image TripoSR conditions on.

    EXIF orientation is applied first in every mode, so what the model sees is upright as
    the user saw it. Then:

    - `AUTO`: an image with real alpha (see `has_real_alpha`) keeps it and skips removal,
      like the reference; otherwise `remove` cuts the object out.
    - `ALWAYS`: `remove` runs even when the image has alpha.
    - `NEVER`: the reference's `--no-remove-bg`: converted to RGB with any
      alpha dropped (not composited), no crop and no grey fill; the caller must send a
      well-framed object on a grey background.

    Whenever the image has an alpha mask (removed or real), it is re-framed with
    `resize_foreground(ratio)` and composited over grey with `composite_grey`.

    Args:
        image: The decoded request image, any mode.
        mode: "AUTO", "ALWAYS" or "NEVER".
        ratio: Foreground ratio in (0, 1] (the request's `foreground_ratio`).
        remove: The background remover; may be None only when it will not be needed
            (`NEVER`, or `AUTO` with real alpha).

    Returns:
        The RGB model input and whether background removal ran.

    Raises:
        InvalidArgument: On field "image" when the alpha mask is empty (nothing to model).
        RuntimeError: When removal is needed and `remove` is None (rembg not configured).
        ValueError: On an unknown mode.
    """
    if mode not in REMOVE_MODES:
        raise ValueError(f"unknown background removal mode {mode!r}; expected one of {REMOVE_MODES}")
    upright = ImageOps.exif_transpose(image)
    if mode == "NEVER":
        return upright.convert("RGB"), False

    real_alpha = has_real_alpha(upright)
    if mode == "AUTO" and real_alpha:
        cutout = upright.convert("RGBA")
        removed = False
    else:
        if remove is None:
            raise RuntimeError(
                "background removal is needed but rembg is not configured for this server "
                "(no BackgroundRemover was loaded); send an image with transparency or "
                "remove_background=NEVER, or configure the local provider's rembg model"
            )
        # Palette, 16-bit and CMYK images go to the remover as plain RGB(A).
        source = upright if upright.mode in ("RGB", "RGBA") else upright.convert("RGBA" if real_alpha else "RGB")
        cutout = remove(source)
        if cutout.mode != "RGBA":
            cutout = cutout.convert("RGBA")
        removed = True
    return composite_grey(resize_foreground(cutout, ratio)), removed
