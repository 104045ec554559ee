"""Small contact sheets for asset metadata: a grid of thumbnails, embeddable in Markdown.

:func:`thumbnail_grid` is generic on purpose (plain PIL images in, encoded bytes out) so other stages
can show masks or overlays the same way; :func:`preview_images` picks a shard's stored images for it.
Dagster keeps metadata in its event log, so the result must stay small.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import pyarrow as pa
from PIL import Image

from pseudolabel import layout
from pseudolabel.images.index import OK
from pseudolabel.storage import ObjectStore

DEFAULT_MAX_BYTES = 60_000  # ~80 KB once base64-encoded: comfortably under ~100 KB per entry


def thumbnail_grid(
    images: Sequence[Image.Image],
    *,
    tile: int = 128,
    columns: int = 4,
    padding: int = 4,
    background: tuple[int, int, int] = (255, 255, 255),
    image_format: str = "JPEG",
    quality: int = 80,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> bytes:
    """Encode the images, each fitted into a ``tile`` x ``tile`` cell, as one grid image.

    Tiles shrink until the encoded grid fits in ``max_bytes``. Raises ValueError for no images.
    """
    if not images:
        raise ValueError("thumbnail_grid needs at least one image")
    while True:
        data = _encode(_grid(images, tile, columns, padding, background), image_format, quality)
        if len(data) <= max_bytes or tile <= 16:
            return data
        tile = int(tile * 0.75)


def _grid(
    images: Sequence[Image.Image], tile: int, columns: int, padding: int, background: tuple[int, int, int]
) -> Image.Image:
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    cell = tile + padding
    sheet = Image.new("RGB", (columns * cell + padding, rows * cell + padding), background)
    for n, image in enumerate(images):
        thumb = image.convert("RGB")  # a copy, so the caller's image is never resized in place
        thumb.thumbnail((tile, tile), Image.Resampling.LANCZOS)
        x = padding + (n % columns) * cell + (tile - thumb.width) // 2
        y = padding + (n // columns) * cell + (tile - thumb.height) // 2
        sheet.paste(thumb, (x, y))
    return sheet


def _encode(image: Image.Image, image_format: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    params = {"quality": quality} if image_format.upper() in ("JPEG", "WEBP") else {"optimize": True}
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


def preview_images(
    store: ObjectStore, shard: str, index: pa.Table, limit: int = 8, max_side: int = 256
) -> list[Image.Image]:
    """The first ``limit`` stored images of the shard, decoded small (for a metadata contact sheet)."""
    images = []
    for row in index.to_pylist():
        if len(images) >= limit:
            break
        if row["status"] == OK:
            image = Image.open(io.BytesIO(store.get_bytes(layout.image(shard, row["image_id"]))))
            image.draft("RGB", (max_side, max_side))  # JPEG DCT scaling: a 100 MP image decodes cheaply
            image.load()
            images.append(image)
    return images
