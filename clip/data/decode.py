"""Decoding untrusted image bytes: the one decoder of the training stream and the eval shards.

Only PIL's JPEG, PNG and WebP decoders ever run: left to itself, PIL picks any of its plugins from the
bytes, whatever the member is called (EPS, for one, hands the data to Ghostscript). The pixel count is
checked from the header before any pixel is decoded, so a small file claiming a huge image costs
nothing. Callers decide what a failure means: training counts a skip event, eval
logs and skips the sample.
"""

from __future__ import annotations

import io

from PIL import Image

# PIL's own decompression-bomb limit (89.5 Mpixels) unless the user changed it.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


class ImageDecodeError(ValueError):
    """Image bytes that cannot be used; `reason` is `too_large` or `decode_error` (records.SAMPLE_REASONS)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def decode_image(data: bytes, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image from encoded JPEG/PNG/WebP bytes; raises ImageDecodeError."""
    try:
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        if image.width * image.height > max_pixels:
            raise ImageDecodeError("too_large", f"{image.width}x{image.height} pixels, over {max_pixels}")
        image.load()
        # Converting before the crop (clip.transforms convert after it) keeps palette images from
        # being resized with nearest-neighbour; for RGB and grayscale the result is the same.
        return image if image.mode == "RGB" else image.convert("RGB")
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError("too_large", str(e)) from e
    except Exception as e:  # any failure of a decoder on untrusted bytes is bad data, not a bug of ours
        raise ImageDecodeError("decode_error", f"{type(e).__name__}: {e}") from e
