"""What a GPU stage shows in the Dagster UI: model identity as metadata, throughput, and a small
preview (boxes or masks drawn on a thumbnail of one image, as an inline PNG)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from pseudolabel.markdown import markdown_image
from pseudolabel.models.interfaces import Candidates
from pseudolabel.rle import decode_rle

SMOKE_RUN_NOTE = (
    "SMOKE RUN: random or fake weights; exercises the code path, says nothing about label quality"
)
PREVIEW_ITEMS = 10  # boxes or masks drawn per preview
MAX_PNG_BYTES = 100_000


def model_metadata(identity: dict[str, Any]) -> dict[str, str | int | float | bool]:
    """Flatten a model ``describe()`` into metadata entries, labelling smoke runs loudly."""
    out: dict[str, str | int | float | bool] = {}
    for key in (
        "backend",
        "model",
        "variant",
        "weights",
        "checkpoint",
        "checkpoint_sha256",
        "checkpoint_status",
        "text_encoder",
        "device",
        "precision",
        "batch_size",
        "input_size",
    ):
        value = identity.get(key)
        if value is not None and value != "":
            out[key] = value if isinstance(value, (int, float, bool)) else str(value)
    out["smoke_run"] = bool(identity.get("smoke_run", False))
    if out["smoke_run"]:
        out["smoke_run_note"] = SMOKE_RUN_NOTE
    return out


def throughput(images: int, seconds: float) -> float:
    return round(images / seconds, 3) if seconds > 0 else 0.0


def boxes_preview(data: bytes, found: Candidates) -> str:
    """Markdown image: the best ``PREVIEW_ITEMS`` boxes of ``found`` (image bytes ``data``), labelled
    with phrase and box score."""
    labels = [f"{p} {s:.2f}" for p, s in zip(found.phrases, found.box_scores, strict=True)]
    png = draw_boxes(data, found.boxes[:PREVIEW_ITEMS], labels[:PREVIEW_ITEMS])
    return markdown_image(png, f"{found.image_id}: top {min(len(labels), PREVIEW_ITEMS)} boxes")


def masks_preview(data: bytes, found: Candidates) -> str:
    """Markdown image: the masks of the best ``PREVIEW_ITEMS`` candidates of segmented ``found``."""
    masks = found.masks
    if masks is None:
        raise ValueError(f"image {found.image_id}: candidates have no masks")
    counts = masks.counts[:PREVIEW_ITEMS]
    png = draw_masks(data, counts, masks.height, masks.width)
    return markdown_image(png, f"{found.image_id}: top {len(counts)} masks")


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
