"""Pictures for asset metadata in the Dagster UI: thumbnails, contact sheets, boxes and masks drawn on
an image, each encoded under a byte budget (Dagster keeps metadata in its event log) and embeddable
in Markdown with :func:`pseudolabel.markdown.markdown_image`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from pseudolabel import layout
from pseudolabel.images.index import OK
from pseudolabel.rle import decode_rle
from pseudolabel.storage import ObjectStore

MAX_BYTES = 60_000  # ~80 KB once base64-encoded: comfortably under ~100 KB per metadata entry
PNG_COLORS = 64  # a photo thumbnail as a 64-colour palette PNG is a few tens of KB
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


def thumbnail(data: bytes, max_side: int = 256) -> tuple[Image.Image, float]:
    """Decode ``data`` to at most ``max_side`` px (JPEG DCT scaling: a 100 MP image decodes cheaply).

    Returns the RGB thumbnail and its scale relative to the original.
    """
    with Image.open(io.BytesIO(data)) as image:
        width = image.width
        image.draft("RGB", (max_side, max_side))
        thumb = image.convert("RGB")
    thumb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    return thumb, thumb.width / width


def encode(
    image: Image.Image, image_format: str = "PNG", *, quality: int = 80, max_bytes: int = MAX_BYTES
) -> bytes:
    """``image`` as JPEG (``quality``) or palette PNG, shrunk by a quarter at a time until it fits."""
    while True:
        buffer = io.BytesIO()
        if image_format.upper() == "PNG":
            image.quantize(colors=PNG_COLORS).save(buffer, format="PNG", optimize=True)
        else:
            image.save(buffer, format=image_format, quality=quality)
        if buffer.tell() <= max_bytes or max(image.size) <= 32:
            return buffer.getvalue()
        image = image.resize((max(1, image.width * 3 // 4), max(1, image.height * 3 // 4)))


def thumbnail_grid(
    images: Sequence[Image.Image],
    *,
    tile: int = 128,
    columns: int = 4,
    padding: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
    image_format: str = "JPEG",
    quality: int = 80,
    max_bytes: int = MAX_BYTES,
) -> bytes:
    """The images, each fitted into a ``tile`` x ``tile`` cell, as one encoded grid under ``max_bytes``.

    Raises ValueError for no images. The caller's images are not resized in place.
    """
    if not images:
        raise ValueError("thumbnail_grid needs at least one image")
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    cell = tile + padding
    sheet = Image.new("RGB", (columns * cell + padding, rows * cell + padding), background)
    for n, image in enumerate(images):
        thumb = image.convert("RGB")  # a copy
        thumb.thumbnail((tile, tile), Image.Resampling.LANCZOS)
        x = padding + (n % columns) * cell + (tile - thumb.width) // 2
        y = padding + (n // columns) * cell + (tile - thumb.height) // 2
        sheet.paste(thumb, (x, y))
    return encode(sheet, image_format, quality=quality, max_bytes=max_bytes)


def shard_thumbnails(
    store: ObjectStore, shard: str, index: pa.Table, limit: int = 8, max_side: int = 256
) -> list[Image.Image]:
    """The first ``limit`` stored ("ok") images of the shard, decoded small, for a contact sheet."""
    ok = [row["image_id"] for row in index.select(["image_id", "status"]).to_pylist() if row["status"] == OK]
    return [thumbnail(store.get_bytes(layout.image(shard, image_id)), max_side)[0] for image_id in ok[:limit]]


def draw_boxes(data: bytes, boxes: np.ndarray, labels: Sequence[str] = (), max_side: int = 256) -> bytes:
    """Boxes (N, 4) xyxy in original pixels, outlined on a thumbnail of image ``data``. PNG bytes."""
    thumb, scale = thumbnail(data, max_side)
    return encode(_outline(thumb, scale, boxes, labels))


def draw_masks(data: bytes, counts: Sequence[str], height: int, width: int, max_side: int = 256) -> bytes:
    """COCO RLE masks (``height`` x ``width``, the original size) blended in colour over a thumbnail of
    image ``data``. PNG bytes."""
    thumb, _ = thumbnail(data, max_side)
    return encode(_blend(thumb, counts, height, width))


def three_panels(
    data: bytes,
    boxes: np.ndarray,
    labels: Sequence[str],
    counts: Sequence[str],
    height: int,
    width: int,
    *,
    points: np.ndarray | None = None,
    point_labels: np.ndarray | None = None,
    heat: np.ndarray | None = None,
    titles: Sequence[str] = ("original", "prompts", "masks"),
    max_side: int = 640,
    quality: int = 90,
) -> bytes:
    """original | boxes and clicks (over ``heat``, an (h, w) map in [0, 1] such as an attention map,
    when given) | masks, side by side. Boxes/clicks in original pixels; clicks (N, P, 2) with labels
    1 (green), 0 (red), -1 (none). JPEG bytes at up to ``max_side`` px per panel."""
    thumb, scale = thumbnail(data, max_side)
    middle = thumb.copy()
    if heat is not None:
        small = Image.fromarray((np.clip(heat, 0, 1) * 255).astype(np.uint8)).resize(thumb.size)
        hot = np.stack([np.asarray(small, np.float32)] * 3, axis=-1) * np.array([1.0, 0.55, 0.1], np.float32)
        middle = Image.fromarray((0.4 * np.asarray(thumb, np.float32) + 0.6 * hot).astype(np.uint8))
    middle = _outline(middle, scale, boxes, labels)
    if points is not None and point_labels is not None:
        draw = ImageDraw.Draw(middle)
        for xy, label in zip(
            np.asarray(points).reshape(-1, 2), np.asarray(point_labels).reshape(-1), strict=True
        ):
            if label < 0:
                continue
            x, y = (xy * scale).tolist()
            color = (40, 220, 40) if label == 1 else (230, 30, 30)
            draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill=color, outline=(255, 255, 255), width=2)
    panels = [thumb, middle, _blend(thumb, counts, height, width)]
    gap, header = 6, 18
    sheet = Image.new("RGB", (3 * thumb.width + 2 * gap, thumb.height + header), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for n, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        x = n * (thumb.width + gap)
        sheet.paste(panel, (x, header))
        draw.text((x + 4, 3), title, fill=(0, 0, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _outline(thumb: Image.Image, scale: float, boxes: np.ndarray, labels: Sequence[str]) -> Image.Image:
    draw = ImageDraw.Draw(thumb)
    for i, box in enumerate(np.asarray(boxes, np.float32).reshape(-1, 4)):
        color = _COLORS[i % len(_COLORS)]
        x0, y0, x1, y1 = (box * scale).tolist()
        draw.rectangle([x0, y0, x1, y1], outline=color, width=2)
        if i < len(labels) and labels[i]:
            draw.text((x0 + 2, y0 + 1), labels[i], fill=color)
    return thumb


def _blend(thumb: Image.Image, counts: Sequence[str], height: int, width: int) -> Image.Image:
    canvas = np.asarray(thumb, dtype=np.float32).copy()
    for i, rle in enumerate(counts):
        mask = Image.fromarray(decode_rle(rle, height, width).astype(np.uint8) * 255)
        small = np.asarray(mask.resize(thumb.size, Image.Resampling.NEAREST)) > 0
        canvas[small] = 0.55 * canvas[small] + 0.45 * np.asarray(_COLORS[i % len(_COLORS)], np.float32)
    return Image.fromarray(canvas.astype(np.uint8))
