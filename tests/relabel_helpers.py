"""Stored-candidate tables and thresholds shared by the relabel tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pseudolabel.labels.thresholds import PickPolicy, Thresholds
from pseudolabel.testing.labels import encode_mask

W, H = 100, 50

LOOSE = Thresholds(
    version=1,
    box_score=0.3,
    text_score=0.2,
    mask_score=0.5,
    min_mask_area_fraction=0.01,
    max_box_coverage=0.8,
    nms_iou=0.5,
    max_instances_per_image=10,
    pick_policy=PickPolicy.ALL,
)


def candidate(
    image_id, cid, box, box_score=0.9, text_score=0.9, mask_score=0.9, area=500, phrase="dog", query=None
):
    return {
        "query_index": query,
        "image_id": image_id,
        "candidate_id": cid,
        "x0": box[0],
        "y0": box[1],
        "x1": box[2],
        "y1": box[3],
        "box_score": box_score,
        "text_score": text_score,
        "phrase": phrase,
        "mask_score": mask_score,
        "mask_area": area,
    }


RLE = encode_mask(np.ones((H, W), np.uint8))["counts"]


def tables(
    rows: list[dict], without_mask: set[tuple[str, int]] = frozenset()
) -> tuple[pd.DataFrame, pd.DataFrame]:
    frame = pd.DataFrame(rows)
    columns = ["image_id", "candidate_id", "x0", "y0", "x1", "y1", "box_score", "text_score", "phrase"]
    if frame["query_index"].notna().any():  # rows given a query index: stored with the column
        columns.append("query_index")
    detections = frame[columns]
    masks = frame[["image_id", "candidate_id", "mask_score", "mask_area"]].assign(
        rle_counts=RLE, height=H, width=W, mask_x=0.0, mask_y=0.0, mask_w=1.0, mask_h=1.0
    )
    keep = [(i, c) not in without_mask for i, c in zip(masks["image_id"], masks["candidate_id"], strict=True)]
    return detections, masks.loc[keep]


def decisions(result) -> dict[tuple[str, int], str]:
    c = result.candidates
    return dict(
        zip(zip(c["image_id"], c["candidate_id"], strict=True), c["decision"].astype(str), strict=True)
    )


# One image whose candidates' query (detector output) order is not their score order. candidate_id is
# the score rank; rows are (image, detector score, SAM2 score, candidate_id, query_index).
QUERY_ORDER_IMAGE = [
    (0, 0.80, 0.70, 0, 42),  # Z: top detector score
    (0, 0.50, 0.85, 1, 100),  # W
    (0, 0.45, 0.90, 2, 17),  # Y
    (0, 0.35, 0.95, 3, 250),  # V: top SAM2 score
    (0, 0.30, 0.60, 4, 3),  # X: first in query order
]
