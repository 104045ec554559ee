"""Small preview images for run metadata: boxes or masks drawn on a thumbnail, as a PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from pseudolabel.rle import decode_rle

_COLORS = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
]
MAX_PNG_BYTES = 100_000


def thumbnail(data: bytes, max_side: int = 256) -> tuple[Image.Image, float]:
    """Decode ``data`` to at most ``max_side`` px; returns the RGB thumbnail and thumbnail/original scale."""
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        image.draft("RGB", (max_side, max_side))
        thumb = image.convert("RGB")
        thumb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return thumb, thumb.width / width


def draw_boxes(data: bytes, boxes: np.ndarray, labels: Sequence[str] = (), max_side: int = 256) -> bytes:
    """Boxes (N, 4) xyxy in original pixels, outlined on a thumbnail. Returns PNG bytes."""
    thumb, scale = thumbnail(data, max_side)
    draw = ImageDraw.Draw(thumb)
    for i, box in enumerate(np.asarray(boxes, np.float32).reshape(-1, 4)):
        color = _COLORS[i % len(_COLORS)]
        x0, y0, x1, y1 = (box * scale).tolist()
        draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
        if i < len(labels) and labels[i]:
            draw.text((x0 + 2, y0 + 1), labels[i], fill=color)
    return to_png(thumb)


def draw_masks(data: bytes, counts: Sequence[str], height: int, width: int, max_side: int = 256) -> bytes:
    """COCO RLE masks (original size) blended in colour over a thumbnail. Returns PNG bytes."""
    thumb, _ = thumbnail(data, max_side)
    canvas = np.asarray(thumb, dtype=np.float32).copy()
    for i, rle in enumerate(counts):
        mask = Image.fromarray(decode_rle(rle, height, width).astype(np.uint8) * 255)
        small = np.asarray(mask.resize(thumb.size, Image.Resampling.NEAREST)) > 0
        canvas[small] = 0.55 * canvas[small] + 0.45 * np.asarray(_COLORS[i % len(_COLORS)], np.float32)
    return to_png(Image.fromarray(canvas.astype(np.uint8)))


def to_png(image: Image.Image) -> bytes:
    """Palette PNG (a photo thumbnail in 64 colours is a few tens of KB), shrunk until under MAX_PNG_BYTES."""
    while True:
        buffer = io.BytesIO()
        image.quantize(colors=64).save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= MAX_PNG_BYTES or max(image.size) <= 32:
            return buffer.getvalue()
        image = image.resize((max(1, image.width // 2), max(1, image.height // 2)))
