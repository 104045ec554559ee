"""RLE masks -> COCO polygons, for tools that cannot read RLE.

Polygons are OpenCV outer contours through boundary pixel centres, so they are lossy: holes are
filled and a thin boundary strip is lost when re-rasterised (IoU ~0.95-0.99 for typical masks).
The RLE export stays the source of truth.
"""

from __future__ import annotations

import copy
from typing import Any

import cv2
import numpy as np
from pycocotools import mask as mask_utils

MIN_POLYGON_POINTS = 3  # COCO needs >= 6 coordinates; pycocotools reads 4 as a bbox


def mask_to_polygons(mask: np.ndarray, min_points: int = MIN_POLYGON_POINTS) -> list[list[float]]:
    """Outer contours of a binary mask as flat ``[x0, y0, x1, y1, ...]`` lists, largest first."""
    contours, _ = cv2.findContours(
        np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    contours = sorted(contours, key=cv2.contourArea, reverse=True)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= min_points]


def rle_to_polygons(segmentation: dict[str, Any]) -> list[list[float]]:
    counts = segmentation["counts"]
    rle = {
        "size": segmentation["size"],
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }
    return mask_to_polygons(mask_utils.decode(rle))


def coco_with_polygons(coco: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A copy of an RLE COCO dict with polygon segmentations; returns it and the number of dropped
    annotations (masks too small to have a 3-point contour)."""
    out = copy.copy(coco)
    annotations = []
    for ann in coco["annotations"]:
        polygons = rle_to_polygons(ann["segmentation"])
        if polygons:
            annotations.append({**ann, "segmentation": polygons})
    out["annotations"] = annotations
    return out, len(coco["annotations"]) - len(annotations)
