"""What a GPU stage shows in the Dagster UI: model identity as metadata, throughput, and a small
preview (boxes or masks drawn on a thumbnail of one image, as an inline PNG)."""

from __future__ import annotations

from typing import Any

from pseudolabel.markdown import markdown_image
from pseudolabel.models.interfaces import Candidates
from pseudolabel.preview import draw_boxes, draw_masks

SMOKE_RUN_NOTE = (
    "SMOKE RUN: random or fake weights; exercises the code path, says nothing about label quality"
)
PREVIEW_ITEMS = 10  # boxes or masks drawn per preview


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
