"""Rectangles with closed-form overlaps and fake models of known geometry, shared by the
label-quality tests.

Gold masks are axis-aligned rectangles and the fake models return the same rectangle shifted by
known offsets with known scores, so every IoU and CD-IoU has an exact expected value.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pseudolabel.labels.synthetic import encode_mask
from pseudolabel.labels.thresholds import PickPolicy, Thresholds
from pseudolabel.quality.candidates import EvalImage

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


class FakeDetector:
    def __init__(self):
        self.calls: list[list[str]] = []

    def detect(self, images: Sequence[EvalImage]) -> list[pd.DataFrame]:
        self.calls.append([i.image_id for i in images])
        frames = []
        for image in images:
            rows = []
            for dx, dy, box_score, mask_score in FAKE[image.image_id]:
                x0, y0, x1, y1 = shifted(GT, dx, dy)
                rows.append(
                    {
                        "x0": x0,
                        "y0": y0,
                        "x1": x1,
                        "y1": y1,
                        "box_score": box_score,
                        "text_score": 0.9,
                        "phrase": f"thing{len(rows)}",
                        "fake_mask_score": mask_score,
                    }
                )
            frames.append(
                pd.DataFrame(
                    rows,
                    columns=["x0", "y0", "x1", "y1", "box_score", "text_score", "phrase", "fake_mask_score"],
                )
            )
        return frames


class FakeSegmenter:
    """The mask of a box is exactly the box, with the score the fake detector planted."""

    def segment(self, image: EvalImage, boxes: pd.DataFrame) -> pd.DataFrame:
        rows = []
        for box in boxes.itertuples():
            mask = rect_mask((int(box.x0), int(box.y0), int(box.x1), int(box.y1)), image.height, image.width)
            rows.append(
                {
                    "candidate_id": box.candidate_id,
                    "rle_counts": encode_mask(mask)["counts"],
                    "height": image.height,
                    "width": image.width,
                    "mask_area": int(mask.sum()),
                    "mask_score": box.fake_mask_score,
                }
            )
        return pd.DataFrame(rows)


def eval_images() -> list[EvalImage]:
    return [EvalImage(image_id=i, data=b"", pixels=np.zeros((H, W, 3), np.uint8)) for i in FAKE]


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
