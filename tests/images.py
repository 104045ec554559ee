"""Synthetic test images."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter


def random_jpeg(width: int, height: int, seed: int = 0, quality: int = 90) -> bytes:
    """A smooth random RGB JPEG (blurred noise compresses like a photo, unlike white noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR)
    image = image.filter(ImageFilter.GaussianBlur(2))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()
