"""JPEG bytes -> RGB pixels at no more resolution than a model needs (runs in CPU workers)."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

# (width, height) of the original image -> (width, height) the model input will be resized to.
TargetSize = Callable[[int, int], tuple[int, int]]


def decode_resized(data: bytes, target: TargetSize) -> tuple[np.ndarray, int, int]:
    """Decode ``data`` and resize it to ``target(width, height)``.

    Returns ``(rgb, width, height)``: ``rgb`` is (h, w, 3) uint8 at the target size, ``width`` and
    ``height`` are the ORIGINAL size, the frame every stored box and mask is expressed in. Images
    are stored upright already (EXIF applied upstream), so no orientation handling here.
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        out_w, out_h = target(width, height)
        # JPEG DCT scaling: decode a 12 MP photo at 1/2..1/8 scale when the model input is ~1 MP,
        # never below the target size. Several times faster than a full decode.
        image.draft("RGB", (out_w, out_h))
        rgb = image.convert("RGB")
        if rgb.size != (out_w, out_h):
            rgb = rgb.resize((out_w, out_h), Image.Resampling.BILINEAR)
        return np.array(rgb), width, height  # writable copy: torch.from_numpy warns on read-only arrays
