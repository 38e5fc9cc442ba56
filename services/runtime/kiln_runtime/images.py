"""Decoding untrusted input images safely: size limits before work, clear field errors.

Every failure is an `InvalidArgument` naming the request field, so a person sees what to
fix (for example "image: 80000000 pixels is more than the 16777216 allowed") rather than a
decoder traceback.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

from PIL import Image, UnidentifiedImageError

from kiln_runtime.errors import FieldViolation, InvalidArgument

ACCEPTED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}


def invalid_image(description: str, field: str = "image") -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])


def check_image(data: bytes, *, max_bytes: int, max_pixels: int, field: str = "image") -> tuple[int, int]:
    """Check the byte limit, the format and the pixel limit from the header only; return (width, height).

    Cheap enough to run before admission: Pillow reads the header and no pixel, so a request
    that is then refused for capacity has cost almost nothing.
    """
    with _opened(data, max_bytes=max_bytes, max_pixels=max_pixels, field=field) as image:
        return image.size


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int, field: str = "image") -> Image.Image:
    """Decode PNG/JPEG/WebP bytes fully, enforcing the byte and pixel limits first.

    The pixel limit is checked on the header, before any pixel is decoded, so a
    decompression bomb costs nothing. The whole image is then loaded so that truncated
    files fail here and not inside a model run.
    """
    with _opened(data, max_bytes=max_bytes, max_pixels=max_pixels, field=field) as image:
        image.load()
        return image


@contextlib.contextmanager
def _opened(data: bytes, *, max_bytes: int, max_pixels: int, field: str) -> Iterator[Image.Image]:
    """The image opened (header read, limits checked); decoder errors inside become field errors."""
    if not data:
        raise invalid_image("is empty; send the encoded bytes of a PNG, JPEG or WebP image", field)
    if len(data) > max_bytes:
        raise invalid_image(f"is {len(data)} bytes, more than the {max_bytes} allowed ({_mib(max_bytes)})", field)
    try:
        with warnings.catch_warnings():
            # Pillow warns (and later errors) on large images; our own limit decides instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # A damaged EXIF block does not make the pixels unusable; orientation is then ignored.
            warnings.filterwarnings("ignore", "Corrupt EXIF data", UserWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise invalid_image(f"is {image.format or 'an unknown format'}; send PNG, JPEG or WebP", field)
            width, height = image.size
            if width * height > max_pixels:
                raise invalid_image(
                    f"is {width}x{height} = {width * height} pixels, more than the {max_pixels} allowed", field
                )
            yield image
    except InvalidArgument:
        raise
    except Image.DecompressionBombError:
        raise invalid_image(f"has far more pixels than the {max_pixels} allowed", field) from None
    except UnidentifiedImageError:
        raise invalid_image("is not a PNG, JPEG or WebP image", field) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise invalid_image(f"could not be decoded (truncated or corrupt: {err})", field) from None


def _mib(size: int) -> str:
    return f"{size / (1 << 20):g} MiB"
