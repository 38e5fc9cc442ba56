"""Photo-sized JPEGs for the input-limit tests: real pixels, then an exact total size.

A phone photo's bytes are mostly pixel data plus EXIF/MPF blocks. `photo_jpeg` encodes noise
(no shortcut for a decoder) for up to `pixel_bytes` of the file and fills the rest with APP15
segments, which every decoder skips, so any exact size is cheap to make and still decodes.
"""

from __future__ import annotations

import functools
import io
import struct

import numpy as np
from PIL import Image

MiB = 1 << 20
_SEGMENT_PAYLOAD = 65533  # a JPEG segment's length field (2 bytes) counts itself


@functools.cache
def _noise_jpeg(side: int) -> bytes:
    pixels = np.random.default_rng(side).integers(0, 256, (side, side * 4 // 3, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def photo_jpeg(total_bytes: int, *, side: int = 1024) -> bytes:
    """A decodable JPEG of exactly `total_bytes` (noise pixels, side x 4/3 side, then padding)."""
    core = _noise_jpeg(side)
    padding = total_bytes - len(core)
    if padding < 0:
        raise ValueError(f"{total_bytes} bytes is smaller than the {len(core)}-byte image; pass a smaller side")
    segments = []
    while padding:
        if padding < 4:  # too small for a segment of its own: grow the previous one
            raise ValueError("padding of 1-3 bytes; ask for a slightly different size")
        payload = min(padding - 4, _SEGMENT_PAYLOAD)
        if 0 < padding - 4 - payload < 4:
            payload -= 4  # leave room for one more whole segment
        segments.append(b"\xff\xef" + struct.pack(">H", payload + 2) + bytes(payload))
        padding -= payload + 4
    data = core[:2] + b"".join(segments) + core[2:]
    assert len(data) == total_bytes
    return data


def truncated_jpeg() -> bytes:
    """A JPEG whose header is intact but whose pixel data stops half way: only a full decode fails."""
    core = _noise_jpeg(256)
    return core[: len(core) // 2]
