"""Unit tests for kiln_img2img.preprocess: every pixel mode to RGB, orientation, sizing, rejects.

Also drives kiln_runtime.images.decode_image with the broken uploads that must never reach
preprocessing, since the two together are the service's whole input path.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from kiln_img2img.preprocess import PreparedImage, prepare_image, to_rgb
from kiln_runtime.errors import InvalidArgument
from kiln_runtime.images import decode_image

MAX_BYTES = 8 * 1024 * 1024
MAX_PIXELS = 4096 * 4096
WHITE = (255, 255, 255)


def encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decode(data: bytes) -> Image.Image:
    return decode_image(data, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)


def pixel(image: Image.Image, xy: tuple[int, int]) -> tuple[int, ...]:
    value = image.getpixel(xy)
    assert isinstance(value, tuple)
    return value


def assert_close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int = 0) -> None:
    assert len(actual) == len(expected)
    assert all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True)), (actual, expected)


def assert_field_image(err: pytest.ExceptionInfo[InvalidArgument]) -> str:
    assert [v.field for v in err.value.violations] == ["image"]
    return err.value.violations[0].description


# --- every mode to RGB -----------------------------------------------------------------------


def test_rgb_is_returned_as_is() -> None:
    image = Image.new("RGB", (4, 4), (10, 200, 30))
    assert to_rgb(image) is image


def test_rgba_transparent_becomes_white_and_opaque_keeps_its_colour() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (10, 200, 30, 0))  # fully transparent: its stored colour must not show
    image.putpixel((1, 0), (10, 200, 30, 255))
    image.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black over white: mid grey
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert pixel(rgb, (0, 0)) == WHITE
    assert pixel(rgb, (1, 0)) == (10, 200, 30)
    assert_close(pixel(rgb, (2, 0)), (127, 127, 127), tolerance=1)


def test_premultiplied_rgba_is_composited_too() -> None:
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (10, 200, 30, 0))
    image.putpixel((1, 0), (10, 200, 30, 255))
    rgb = to_rgb(image.convert("RGBa"))
    assert pixel(rgb, (0, 0)) == WHITE
    assert pixel(rgb, (1, 0)) == (10, 200, 30)


@pytest.mark.parametrize("mode", ["LA", "La"])
def test_grey_with_alpha(mode: str) -> None:
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (50, 0))
    image.putpixel((1, 0), (50, 255))
    rgb = to_rgb(image if mode == "LA" else image.convert("La"))
    assert rgb.mode == "RGB"
    assert pixel(rgb, (0, 0)) == WHITE
    assert pixel(rgb, (1, 0)) == (50, 50, 50)


def palette_image() -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0, 0, 0] * 254)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    return image


def test_palette_without_transparency() -> None:
    rgb = to_rgb(palette_image())
    assert rgb.mode == "RGB"
    assert pixel(rgb, (0, 0)) == (255, 0, 0)
    assert pixel(rgb, (1, 0)) == (0, 0, 255)


def test_palette_with_transparent_index_via_png() -> None:
    decoded = decode(encode(palette_image(), transparency=0))  # index 0 (red) is transparent
    assert decoded.mode == "P" and "transparency" in decoded.info
    rgb = to_rgb(decoded)
    assert pixel(rgb, (0, 0)) == WHITE
    assert pixel(rgb, (1, 0)) == (0, 0, 255)


def test_palette_with_alpha() -> None:
    rgb = to_rgb(palette_image().convert("PA"))
    assert rgb.mode == "RGB"
    assert pixel(rgb, (0, 0)) == (255, 0, 0)


def test_colour_key_transparency_in_an_rgb_png() -> None:
    image = Image.new("RGB", (2, 1), (10, 20, 30))
    image.putpixel((1, 0), (40, 50, 60))
    decoded = decode(encode(image, transparency=(10, 20, 30)))
    assert decoded.mode == "RGB" and "transparency" in decoded.info
    rgb = to_rgb(decoded)
    assert pixel(rgb, (0, 0)) == WHITE
    assert pixel(rgb, (1, 0)) == (40, 50, 60)


def test_grey() -> None:
    assert pixel(to_rgb(Image.new("L", (1, 1), 77)), (0, 0)) == (77, 77, 77)


def test_bilevel() -> None:
    image = Image.new("1", (2, 1), 0)
    image.putpixel((1, 0), 1)
    rgb = to_rgb(image)
    assert pixel(rgb, (0, 0)) == (0, 0, 0)
    assert pixel(rgb, (1, 0)) == WHITE


def test_16_bit_grey_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16))
    assert image.mode == "I;16"
    rgb = to_rgb(image)
    assert [pixel(rgb, (x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    assert pixel(rgb, (2, 0)) == (128, 128, 128)


def test_16_bit_grey_png_through_decode() -> None:
    array = np.full((64, 64), 32768, dtype=np.uint16)
    array[0, 0] = 65535
    decoded = decode(encode(Image.fromarray(array)))
    assert decoded.mode in ("I;16", "I")  # which one depends on the Pillow version
    prepared = prepare_image(decoded)
    assert pixel(prepared.image, (0, 0)) == WHITE
    assert pixel(prepared.image, (1, 1)) == (128, 128, 128)


def test_16_bit_grey_colour_key_is_matched_in_16_bit_units() -> None:
    array = np.array([[1000, 65535]], dtype=np.uint16)
    decoded = decode(encode(Image.fromarray(array), transparency=1000))
    rgb = to_rgb(decoded)
    assert pixel(rgb, (0, 0)) == WHITE  # would be near-black (4) if it were opaque
    assert pixel(rgb, (1, 0)) == WHITE


def test_32_bit_integer_grey_uses_the_16_bit_range() -> None:
    image = Image.new("I", (4, 1))
    for x, value in enumerate((-5, 32768, 65535, 1_000_000)):
        image.putpixel((x, 0), value)
    rgb = to_rgb(image)
    assert [pixel(rgb, (x, 0))[0] for x in range(4)] == [0, 128, 255, 255]


def test_float_grey_uses_the_unit_range() -> None:
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0, 7.0, -1.0, np.nan]], dtype=np.float32))
    assert image.mode == "F"
    rgb = to_rgb(image)
    assert [pixel(rgb, (x, 0))[0] for x in range(6)] == [0, 128, 255, 255, 0, 0]


def test_cmyk() -> None:
    image = Image.new("CMYK", (3, 1))
    image.putpixel((0, 0), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 0))
    image.putpixel((2, 0), (0, 0, 0, 255))
    rgb = to_rgb(image)
    assert [pixel(rgb, (x, 0)) for x in range(3)] == [WHITE, (0, 255, 255), (0, 0, 0)]


def test_cmyk_jpeg_through_decode() -> None:
    decoded = decode(encode(Image.new("CMYK", (64, 64), (255, 0, 0, 0)), "JPEG", quality=95))
    assert decoded.mode == "CMYK"
    prepared = prepare_image(decoded)
    assert_close(pixel(prepared.image, (32, 32)), (0, 255, 255), tolerance=3)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("HSV", (0, 255, 255), (255, 0, 0)),
        ("YCbCr", (76, 85, 255), (254, 0, 0)),
        ("LAB", (136, 208, 195), (250, 3, 11)),  # pure red in Pillow's LAB encoding
        ("RGBX", (1, 2, 3, 0), (1, 2, 3)),
    ],
)
def test_other_colour_spaces(mode: str, value: tuple[int, ...], expected: tuple[int, int, int]) -> None:
    rgb = to_rgb(Image.new(mode, (1, 1), value))
    assert rgb.mode == "RGB"
    assert_close(pixel(rgb, (0, 0)), expected, tolerance=2)


ALL_MODES = ["RGB", "RGBA", "RGBa", "RGBX", "LA", "La", "P", "PA", "L", "1", "I;16", "I;16B", "I", "F", "CMYK"]
ALL_MODES += ["YCbCr", "LAB", "HSV"]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_mode_leaves_as_three_channel_rgb(mode: str) -> None:
    prepared = prepare_image(Image.new(mode, (80, 64)))
    assert prepared.image.mode == "RGB"
    assert len(prepared.image.getbands()) == 3
    assert prepared.image.size == (80, 64)


# --- EXIF orientation ------------------------------------------------------------------------


def test_exif_orientation_6_is_applied() -> None:
    stored = Image.new("RGB", (64, 96), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 16, 16))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the viewer rotates the stored image 90° clockwise
    decoded = decode(encode(stored, "JPEG", quality=95, exif=exif))
    assert decoded.size == (64, 96)

    prepared = prepare_image(decoded)
    assert prepared.original_size == (96, 64)
    assert prepared.image.size == (96, 64)
    assert prepared.resized is False
    # Rotating 90° clockwise moves the stored top-left corner to the top-right.
    assert_close(pixel(prepared.image, (95 - 8, 8)), (255, 0, 0), tolerance=12)
    assert_close(pixel(prepared.image, (8, 8)), (0, 0, 255), tolerance=12)


def test_orientation_is_applied_before_the_size_checks() -> None:
    # Stored 64x800 is 800x64 as seen; scaling to 768 would make the short side 61 < 64.
    exif = Image.Exif()
    exif[0x0112] = 6
    decoded = decode(encode(Image.new("RGB", (64, 800)), "JPEG", exif=exif))
    with pytest.raises(InvalidArgument) as err:
        prepare_image(decoded)
    assert "800x64" in assert_field_image(err)


# --- sizing ----------------------------------------------------------------------------------


def test_non_multiple_of_8_is_resized_not_cropped() -> None:
    image = Image.new("RGB", (100, 75), (0, 0, 255))
    image.paste((0, 255, 0), (96, 0, 100, 75))  # the 4 columns a crop to 96 would drop
    prepared = prepare_image(image)
    assert prepared.image.size == (96, 72)
    assert prepared.original_size == (100, 75)
    assert prepared.resized is True
    assert pixel(prepared.image, (95, 36))[1] > 100  # the right-hand edge survived: squeezed in, not cut off
    assert pixel(prepared.image, (10, 36)) == (0, 0, 255)


def test_multiple_of_8_within_bounds_is_unchanged() -> None:
    image = Image.new("RGB", (72, 72), (1, 2, 3))
    prepared = prepare_image(image)
    assert prepared == PreparedImage(image=prepared.image, original_size=(72, 72), resized=False)
    assert prepared.image.size == (72, 72)
    assert prepared.image.tobytes() == image.tobytes()


def test_large_image_is_scaled_to_max_side() -> None:
    prepared = prepare_image(Image.new("RGB", (2000, 1000)), max_side=768)
    assert prepared.image.size == (768, 384)
    assert prepared.original_size == (2000, 1000)
    assert prepared.resized is True


def test_scaling_then_rounding_down() -> None:
    # 1000x700 -> 768x537 -> 768x536
    assert prepare_image(Image.new("RGB", (1000, 700))).image.size == (768, 536)
    # Portrait too; the long side lands exactly on max_side with integer arithmetic.
    assert prepare_image(Image.new("RGB", (1000, 3000)), max_side=512).image.size == (168, 512)


def test_too_small_is_rejected_on_field_image() -> None:
    with pytest.raises(InvalidArgument) as err:
        prepare_image(Image.new("RGB", (50, 200)))
    description = assert_field_image(err)
    assert "50x200" in description
    assert "at least 64 pixels" in description


def test_too_elongated_to_fit_is_rejected() -> None:
    with pytest.raises(InvalidArgument) as err:
        prepare_image(Image.new("RGB", (3000, 64)))
    assert "3000x64" in assert_field_image(err)


@pytest.mark.parametrize(
    "size", [(64, 64), (65, 64), (127, 129), (513, 300), (767, 64 * 5), (769, 769), (1920, 1080), (640, 4000)]
)
def test_output_is_rgb_and_a_multiple_of_8_within_max_side(size: tuple[int, int]) -> None:
    prepared = prepare_image(Image.new("RGBA", size, (5, 6, 7, 100)))
    width, height = prepared.image.size
    assert prepared.image.mode == "RGB"
    assert width % 8 == 0 and height % 8 == 0
    assert min(width, height) >= 64 and max(width, height) <= 768
    assert prepared.resized == ((width, height) != size)


def test_contradictory_arguments_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="multiple"):
        prepare_image(Image.new("RGB", (64, 64)), min_side=4)


# --- decode: broken uploads never get this far -----------------------------------------------


def test_empty_bytes() -> None:
    with pytest.raises(InvalidArgument) as err:
        decode(b"")
    assert "empty" in assert_field_image(err)


def test_truncated_png() -> None:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encode(noise)
    with pytest.raises(InvalidArgument) as err:
        decode(data[: len(data) // 2])
    assert "truncated" in assert_field_image(err)


def test_text_file() -> None:
    with pytest.raises(InvalidArgument) as err:
        decode(b"this is a text file, not a picture\n" * 10)
    assert "not a PNG, JPEG or WebP" in assert_field_image(err)


def png_header_bomb(width: int, height: int) -> bytes:
    """A valid PNG header for a huge bilevel (mode "1") image, with almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_header_bomb_is_refused_before_decoding() -> None:
    data = png_header_bomb(20000, 20000)
    assert len(data) < 100
    with pytest.raises(InvalidArgument) as err:
        decode(data)
    assert_field_image(err)


def test_header_bomb_is_refused_by_our_limit_without_pillows_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    # With Pillow's own guard off, the header must still be refused by decode_image's limit.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    data = png_header_bomb(20000, 20000)
    with Image.open(io.BytesIO(data)) as opened:
        assert (opened.mode, opened.size) == ("1", (20000, 20000))
    with pytest.raises(InvalidArgument) as err:
        decode(data)
    assert "20000x20000" in assert_field_image(err)


def test_rgba_png_through_decode_and_prepare() -> None:
    image = Image.new("RGBA", (100, 100), (0, 0, 0, 0))
    image.paste((200, 10, 10, 255), (0, 0, 50, 100))
    prepared = prepare_image(decode(encode(image)))
    assert prepared.image.mode == "RGB"
    assert prepared.image.size == (96, 96)
    assert pixel(prepared.image, (10, 50)) == (200, 10, 10)
    assert pixel(prepared.image, (90, 50)) == WHITE
