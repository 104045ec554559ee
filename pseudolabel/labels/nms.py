"""Greedy NMS run for many small groups at once (class-aware NMS for a whole shard).

Torchvision's ``batched_nms`` falls back to a Python loop over groups on CPU for large inputs, and
a shard has ~10^5 (image, phrase) groups. Instead, groups are padded into ``(G, K, K)`` IoU blocks,
bucketed by size so padding stays small, and the greedy pass loops over the K positions only,
vectorised across every group of the bucket. Results equal per-group greedy NMS exactly.
"""

from __future__ import annotations

import numpy as np

from pseudolabel.labels.grouping import group_order, run_starts

# Upper bound on G*K*K floats held at once (~32 MiB of float64).
_MAX_BLOCK_ELEMENTS = 1 << 22


def pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    """IoU of every pair within each group: ``(..., K, 4)`` xyxy -> ``(..., K, K)``; 0 when the union is empty."""
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
    area = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    iw = np.minimum(x1[..., :, None], x1[..., None, :]) - np.maximum(x0[..., :, None], x0[..., None, :])
    ih = np.minimum(y1[..., :, None], y1[..., None, :]) - np.maximum(y0[..., :, None], y0[..., None, :])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = area[..., :, None] + area[..., None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _greedy_block(iou: np.ndarray, valid: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy NMS on score-sorted padded groups: a kept box suppresses later boxes with IoU > threshold."""
    alive = valid.copy()
    for i in range(iou.shape[1] - 1):
        suppress = alive[:, i, None] & (iou[:, i, i + 1 :] > iou_threshold)
        alive[:, i + 1 :] &= ~suppress
    return alive


def grouped_nms(
    boxes: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray,
    iou_threshold: float,
    tiebreak: np.ndarray | None = None,
) -> np.ndarray:
    """Boolean keep-mask of greedy NMS run independently inside each group.

    ``boxes`` is ``(N, 4)`` xyxy, ``groups`` any integer labels (e.g. image x phrase codes). Equal
    scores are ordered by ``tiebreak`` ascending (default: row order), so results are deterministic.
    A box suppresses another only when their IoU is strictly greater than ``iou_threshold``.
    """
    n = len(scores)
    keep = np.ones(n, dtype=bool)
    if n < 2:
        return keep
    boxes = np.asarray(boxes, dtype=np.float64)
    tiebreak = np.arange(n) if tiebreak is None else np.asarray(tiebreak)
    order = group_order(np.asarray(groups), np.asarray(scores), tiebreak=tiebreak)
    starts = run_starts(np.asarray(groups)[order])
    sizes = np.diff(np.r_[starts, n])
    multi = sizes > 1  # singletons can never be suppressed: skip them entirely
    starts, sizes = starts[multi], sizes[multi]
    if len(sizes) == 0:
        return keep
    buckets = np.ceil(np.log2(sizes)).astype(int)  # pad each group to the next power of two at most
    for bucket in np.unique(buckets):
        in_bucket = buckets == bucket
        b_starts, b_sizes = starts[in_bucket], sizes[in_bucket]
        k = int(b_sizes.max())
        chunk = max(1, _MAX_BLOCK_ELEMENTS // (k * k))
        for lo in range(0, len(b_starts), chunk):
            c_starts, c_sizes = b_starts[lo : lo + chunk], b_sizes[lo : lo + chunk]
            offsets = np.arange(k)
            valid = offsets[None, :] < c_sizes[:, None]
            rows = order[np.where(valid, c_starts[:, None] + offsets[None, :], c_starts[:, None])]
            alive = _greedy_block(pairwise_iou(boxes[rows]), valid, iou_threshold)
            keep[rows[valid & ~alive]] = False
    return keep
