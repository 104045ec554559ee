"""Rectangles with closed-form overlaps and fake models of known geometry, shared by the
label-quality tests.

Gold masks are axis-aligned rectangles and the fake models return the same rectangle shifted by
known offsets with known scores, so every IoU and CD-IoU has an exact expected value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pseudolabel.labels.relabel import ShardCandidates
from pseudolabel.labels.thresholds import PickPolicy, Thresholds
from pseudolabel.testing.labels import encode_mask

H, W = 60, 80
GT = (20, 15, 60, 45)  # x0, y0, x1, y1: a 40 x 30 rectangle well inside the image


def rect_mask(box, height=H, width=W):
    mask = np.zeros((height, width), bool)
    x0, y0, x1, y1 = box
    mask[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return mask


def shifted(box, dx, dy):
    return (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)


def area(box) -> float:
    return max(box[2] - box[0], 0) * max(box[3] - box[1], 0)


def intersect(a, b):
    return (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))


def closed_form_cd_iou(pred, gt, factor: float, w: int) -> float:
    """CD-IoU of two rectangles from the definition: the band is the ring between gt grown by w
    and gt shrunk by w, weighted (1 - factor); all terms are rectangle areas."""
    outer = (gt[0] - w, gt[1] - w, gt[2] + w, gt[3] + w)
    inner = (gt[0] + w, gt[1] + w, gt[2] - w, gt[3] - w)

    def weighted(r):
        return area(r) - factor * (area(intersect(r, outer)) - area(intersect(r, inner)))

    inter = weighted(intersect(pred, gt))
    return inter / (weighted(pred) + weighted(gt) - inter)


# --- fake models with known geometry -----------------------------------------------------------------

# image id -> candidates (dx, dy, box score, SAM2 score); "none" gets no candidate at all.
FAKE = {
    "img0": [(4, 0, 0.90, 0.60), (0, 3, 0.50, 0.95), (10, 10, 0.30, 0.80)],
    "img1": [(0, 0, 0.45, 0.70), (-6, 2, 0.80, 0.90)],
    "none": [],
}


def known_candidates() -> ShardCandidates:
    """The chain's three candidate tables for ``FAKE``: every mask is exactly its box, a shifted GT."""
    images, detections, masks = [], [], []
    for image_id, found in FAKE.items():
        images.append({"image_id": image_id, "width": W, "height": H, "num_candidates": len(found)})
        for candidate_id, (dx, dy, box_score, mask_score) in enumerate(found):
            box = shifted(GT, dx, dy)
            mask = rect_mask(box)
            x0, y0, x1, y1 = (float(v) for v in box)
            detections.append(
                dict(
                    image_id=image_id,
                    candidate_id=candidate_id,
                    x0=x0,
                    y0=y0,
                    x1=x1,
                    y1=y1,
                    box_score=box_score,
                    text_score=0.9,
                    phrase=f"thing{candidate_id}",
                )
            )
            masks.append(
                dict(
                    image_id=image_id,
                    candidate_id=candidate_id,
                    rle_counts=encode_mask(mask)["counts"],
                    height=H,
                    width=W,
                    mask_area=int(mask.sum()),
                    mask_score=mask_score,
                    mask_x=np.nan,
                    mask_y=np.nan,
                    mask_w=np.nan,
                    mask_h=np.nan,
                )
            )
    return ShardCandidates(
        detections=pd.DataFrame(detections), images=pd.DataFrame(images), masks=pd.DataFrame(masks)
    )


BASE = Thresholds(
    version=1,
    box_score=0.0,
    text_score=0.0,
    mask_score=0.0,
    min_mask_area_fraction=0.0,
    max_box_coverage=0.8,
    nms_iou=1.0,
    max_instances_per_image=10,
    pick_policy=PickPolicy.ALL,
)
