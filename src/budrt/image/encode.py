"""Pictures to file bytes with Pillow: PNG, JPEG or WebP, with no metadata (no prompt leaks)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_picture(pixels: np.ndarray, fmt: str, compression: int | None = None) -> bytes:
    """`pixels` [H, W, 3] uint8 as `fmt`. `compression` (0-100, OpenAI's output_compression) is
    the JPEG/WebP loss (quality = 100 - compression) or PNG's zlib effort; default: Pillow's."""
    image = Image.fromarray(pixels, "RGB")
    out = io.BytesIO()
    if fmt == "png":
        level = 6 if compression is None else min(9, compression // 10)
        image.save(out, "PNG", compress_level=level)
    elif fmt == "jpeg":
        image.save(out, "JPEG", quality=90 if compression is None else max(1, 100 - compression))
    else:
        quality = 90 if compression is None else max(1, 100 - compression)
        image.save(out, "WEBP", quality=quality, lossless=compression == 0)
    return out.getvalue()


# Uploads are at most this many pixels (4096x4096): a few KB of PNG can declare a picture of
# gigabytes, and Pillow's own bomb check only starts at 179 M pixels.
MAX_UPLOAD_PIXELS = 4096 * 4096


def open_upload(data: bytes) -> Image.Image:
    """An uploaded picture, decoded; ValueError when unreadable or larger than MAX_UPLOAD_PIXELS
    (checked from the header, before the pixels are decoded)."""
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names an in-memory object: no use to a client
        raise ValueError("not a picture in a format this server reads (PNG, JPEG, WebP, ...)") from None
    except Exception as exc:
        raise ValueError(f"not a readable image: {exc}") from None
    width, height = image.size
    if width * height > MAX_UPLOAD_PIXELS:
        raise ValueError(f"a {width}x{height} picture is over the {MAX_UPLOAD_PIXELS:,} pixels allowed")
    try:
        image.load()
    except Exception as exc:
        raise ValueError(f"not a readable image: {exc}") from None
    return image


def decode_picture(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """An uploaded picture as [H, W, 3] uint8, resized to `size` (W, H); ValueError if unreadable."""
    image = open_upload(data).convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8).copy()
