"""Synthetic stored candidates (DETECTIONS / DETECTION_IMAGES / MASKS rows) for tests and benchmarks.

Masks are real pycocotools RLEs of a few drawn shapes, reused across candidates, so string sizes,
areas and bboxes look like production data without running any model.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
from pycocotools import mask as mask_utils

from pseudolabel.labels.relabel import ShardCandidates

DEFAULT_PHRASES = ("dog", "cat", "person", "car", "bird")


def encode_mask(mask: np.ndarray) -> dict:
    """A binary HxW mask as a COCO compressed RLE dict with ``counts`` as ``str``."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}


def template_masks(height: int, width: int, count: int = 8, seed: int = 0) -> list[np.ndarray]:
    """A few filled ellipses and polygons of varied size and position."""
    rng = np.random.default_rng(seed)
    masks = []
    for i in range(count):
        mask = np.zeros((height, width), dtype=np.uint8)
        cx, cy = int(rng.uniform(0.2, 0.8) * width), int(rng.uniform(0.2, 0.8) * height)
        if i % 2 == 0:
            axes = (int(rng.uniform(0.05, 0.35) * width), int(rng.uniform(0.05, 0.35) * height))
            cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
        else:
            radius = rng.uniform(0.05, 0.3) * min(width, height)
            angles = np.sort(rng.uniform(0, 2 * np.pi, size=9))
            radii = radius * rng.uniform(0.5, 1.0, size=9)
            points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
            cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
        masks.append(mask)
    return masks


def _query_indices(image_of: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Distinct, increasing-with-gaps decoder query indices per image, in a random order that is
    unrelated to the score order (as Grounding DINO's query order is)."""
    n = len(image_of)
    if n == 0:
        return np.zeros(0, np.int32)
    order = np.lexsort((rng.random(n), image_of))  # random order within each image
    steps = rng.integers(1, 40, size=n)
    totals = np.cumsum(steps)
    first = np.r_[True, image_of[order][1:] != image_of[order][:-1]]
    starts = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    query_index = np.empty(n, np.int32)
    query_index[order] = totals - totals[starts] + steps[starts] - 1  # each image starts at steps-1
    return query_index


def synthetic_candidates(
    num_images: int,
    candidates_per_image: float = 10.0,
    *,
    height: int = 480,
    width: int = 640,
    phrases: tuple[str, ...] = DEFAULT_PHRASES,
    seed: int = 0,
    id_prefix: str = "img",
) -> ShardCandidates:
    """``num_images`` images with Poisson(``candidates_per_image``) candidates each (some have none)."""
    rng = np.random.default_rng(seed)
    templates = template_masks(height, width, seed=seed)
    rles = [encode_mask(m) for m in templates]
    counts = np.array([r["counts"] for r in rles], dtype=object)
    areas = mask_utils.area([{"size": r["size"], "counts": r["counts"].encode()} for r in rles]).astype(
        np.int64
    )
    bboxes = mask_utils.toBbox([{"size": r["size"], "counts": r["counts"].encode()} for r in rles])
    # A whole-image "mask" exercises the coverage filter like Grounding DINO's whole-image boxes.
    counts = np.append(counts, encode_mask(np.ones((height, width), np.uint8))["counts"])
    areas = np.append(areas, height * width)
    bboxes = np.vstack([bboxes, [0, 0, width, height]])

    image_ids = np.array([f"{id_prefix}{i:08d}" for i in range(num_images)], dtype=object)
    per_image = rng.poisson(candidates_per_image, size=num_images).astype(np.int64)
    n = int(per_image.sum())
    image_of = np.repeat(np.arange(num_images), per_image)
    box_score = rng.beta(2.0, 3.0, size=n).astype(np.float32)
    # Stored order is (image_id, box_score desc) with candidate_id = rank, as the detector writes it;
    # query_index is the detector's own output order, independent of the score.
    order = np.lexsort((-box_score, image_of))
    box_score = box_score[order]
    candidate_id = (np.arange(n) - np.repeat(np.cumsum(per_image) - per_image, per_image)).astype(np.int32)
    template = rng.integers(0, len(counts), size=n)
    jitter = rng.normal(0, 4, size=(n, 4))
    x, y, w, h = (bboxes[template, i] for i in range(4))
    x0 = np.clip(x + jitter[:, 0], 0, width)
    y0 = np.clip(y + jitter[:, 1], 0, height)
    x1 = np.clip(x + w + jitter[:, 2], 0, width)
    y1 = np.clip(y + h + jitter[:, 3], 0, height)
    query_index = _query_indices(image_of, np.random.default_rng([seed, 1]))

    detections = pd.DataFrame(
        {
            "image_id": image_ids[image_of],
            "candidate_id": candidate_id,
            "x0": x0.astype(np.float32),
            "y0": y0.astype(np.float32),
            "x1": x1.astype(np.float32),
            "y1": y1.astype(np.float32),
            "box_score": box_score,
            "text_score": np.clip(box_score - rng.uniform(0, 0.1, size=n), 0, 1).astype(np.float32),
            "phrase": np.array(phrases, dtype=object)[rng.integers(0, len(phrases), size=n)],
            "query_index": query_index,
        }
    )
    mask_score = rng.beta(5.0, 1.5, size=n).astype(np.float32)
    masks = pd.DataFrame(
        {
            "image_id": detections["image_id"],
            "candidate_id": candidate_id,
            "rle_counts": counts[template],
            "height": np.full(n, height, np.int32),
            "width": np.full(n, width, np.int32),
            "mask_area": areas[template],
            "mask_x": bboxes[template, 0].astype(np.float32),
            "mask_y": bboxes[template, 1].astype(np.float32),
            "mask_w": bboxes[template, 2].astype(np.float32),
            "mask_h": bboxes[template, 3].astype(np.float32),
            "mask_score": mask_score,
            "multimask_index": np.zeros(n, np.int8),
            "multimask_scores": [[float(s)] for s in mask_score],
        }
    )
    images = pd.DataFrame(
        {
            "image_id": image_ids,
            "width": np.full(num_images, width, np.int32),
            "height": np.full(num_images, height, np.int32),
            "num_candidates": per_image.astype(np.int32),
        }
    )
    return ShardCandidates(detections=detections, images=images, masks=masks)
