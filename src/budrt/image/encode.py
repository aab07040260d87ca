"""Pictures to file bytes with Pillow: PNG, JPEG or WebP, with no metadata (no prompt leaks)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

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


def decode_picture(data: bytes, size: tuple[int, int] | None = None) -> np.ndarray:
    """An uploaded picture as [H, W, 3] uint8, resized to `size` (W, H); ValueError if unreadable."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:
        raise ValueError(f"not a readable image: {exc}") from None
    image = image.convert("RGB")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8).copy()
