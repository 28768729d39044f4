"""The image decoder shared by training and eval: formats, the pixel cap from the header, RGB output; nothing unpickled."""

from __future__ import annotations

import io
import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clip.data.decode import MAX_IMAGE_PIXELS, ImageDecodeError, decode_image


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with no pixel data: tiny, and fatal to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_jpeg_png_webp_decode_to_the_same_pixels_as_pil():
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = encode(Image.fromarray(pixels), fmt)
        image = decode_image(data)
        assert image.mode == "RGB" and image.size == (20, 12)
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_palette_and_grayscale_become_rgb():
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    for image in (palette, palette.convert("L"), palette.convert("RGBA")):
        decoded = decode_image(encode(image, "PNG"))
        assert decoded.mode == "RGB"
        assert np.array_equal(np.asarray(decoded), np.asarray(image.convert("RGB")))


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_refused_whatever_the_member_is_called(fmt):
    data = encode(Image.new("RGB", (8, 8), (255, 0, 0)), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # PIL alone would decode it
    with pytest.raises(ImageDecodeError, match="cannot identify image file") as error:
        decode_image(data)
    assert error.value.reason == "decode_error"


def test_corrupt_bytes_are_a_decode_error():
    data = encode(Image.new("RGB", (64, 64)), "JPEG")
    for bad in (b"", bytes(100), data[: len(data) // 2]):
        with pytest.raises(ImageDecodeError) as error:
            decode_image(bad)
        assert error.value.reason == "decode_error"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("scale", [1, 4])  # just over the cap (PIL only warns) and far over it (PIL refuses)
def test_pixel_cap_is_checked_from_the_header_before_decoding(scale):
    # The file holds no pixels: had the decoder run, this would be a decode_error.
    side = math.isqrt(MAX_IMAGE_PIXELS) + 1
    with pytest.raises(ImageDecodeError) as error:
        decode_image(png_header_only(scale * side, side))
    assert error.value.reason == "too_large"
    if scale == 1:
        assert str(error.value) == f"{side}x{side} pixels, over {MAX_IMAGE_PIXELS}"


def test_pixel_cap_is_a_parameter():
    small = encode(Image.new("RGB", (20, 12)), "PNG")
    with pytest.raises(ImageDecodeError, match="20x12 pixels, over 239") as error:
        decode_image(small, max_pixels=239)
    assert error.value.reason == "too_large"
    assert decode_image(small, max_pixels=240).size == (20, 12)
