"""The vectorised steps of the label decision, each run over a whole shard at once (no RLE decoding).

Per-candidate threshold filters (per-class thresholds gathered into per-candidate arrays), greedy NMS inside many small groups, and the pick policies that
choose which survivors of an image become labels. Groupwise steps take per-candidate arrays
(``image`` is an integer image code), sort once by group and then work on contiguous runs; each
returns a boolean keep-mask aligned with its inputs. :mod:`pseudolabel.labels.relabel` chains them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pseudolabel.labels.thresholds import CLASS_KEYS, PickPolicy, Thresholds


class PolicyNeedsScore(ValueError):
    """The pick policy compares a score the detector backend did not produce."""


# -- per-candidate filters -------------------------------------------------------------------------
# Every candidate gets the *first* filter it fails, in FILTER_ORDER, so reject counts add up to the
# number of candidates and the most basic reason wins (a low-score whole-image box counts as
# ``box_score``, not ``box_coverage``).

PASSED = -1
FILTER_ORDER = ("no_mask", "box_score", "text_score", "box_coverage", "mask_score", "mask_area")


def box_coverage(
    x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray, width: np.ndarray, height: np.ndarray
) -> np.ndarray:
    """Fraction of the image a box covers, after clipping the box to the image."""
    w = np.clip(x1, 0, width) - np.clip(x0, 0, width)
    h = np.clip(y1, 0, height) - np.clip(y0, 0, height)
    area = np.clip(w, 0, None) * np.clip(h, 0, None)
    image_area = np.asarray(width, dtype=np.float64) * np.asarray(height, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(image_area > 0, area / image_area, np.nan)


def mask_area_fraction(mask_area: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
    image_area = np.asarray(width, dtype=np.float64) * np.asarray(height, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(image_area > 0, np.asarray(mask_area, dtype=np.float64) / image_area, np.nan)


@dataclass(frozen=True)
class FilterLimits:
    """The threshold of each per-candidate filter: a scalar when every candidate shares it, else a
    ``(N,)`` float64 array with each candidate's own value (its class's override or the global)."""

    box_score: float | np.ndarray
    text_score: float | np.ndarray
    mask_score: float | np.ndarray
    min_mask_area_fraction: float | np.ndarray
    max_box_coverage: float | np.ndarray


def filter_limits(thresholds: Thresholds, phrase_code: np.ndarray, phrases: Sequence[str]) -> FilterLimits:
    """Per-candidate filter thresholds for candidates whose phrase is ``phrases[phrase_code]``.

    ``phrase_code``/``phrases`` are what ``pd.factorize`` gives for the shard's phrase column. Each
    key becomes a small per-phrase table (global value, or the class's override) gathered once by
    code; a key no present class overrides stays a scalar, so a file without ``classes`` costs
    nothing and decides exactly as plain scalar thresholds do.
    """
    overrides = thresholds.class_overrides
    present = [overrides.get(str(phrase), {}) for phrase in phrases]
    limits: dict[str, float | np.ndarray] = {}
    for key in CLASS_KEYS:
        default = getattr(thresholds, key)
        if any(key in o for o in present):
            table = np.array([o.get(key, default) for o in present], dtype=np.float64)
            limits[key] = table[np.asarray(phrase_code)]
        else:
            limits[key] = default
    return FilterLimits(**limits)


def first_failed_filter(
    *,
    has_mask: np.ndarray,
    box_score: np.ndarray,
    text_score: np.ndarray,
    coverage: np.ndarray,
    mask_score: np.ndarray,
    area_fraction: np.ndarray,
    limits: FilterLimits,
) -> np.ndarray:
    """Index into :data:`FILTER_ORDER` of the first failed filter per candidate, or :data:`PASSED`.

    ``limits`` holds each filter's threshold, per candidate or shared (see :func:`filter_limits`).
    Scores pass when ``>=`` their threshold; coverage passes when ``<`` the maximum (a box covering
    exactly 80 % is dropped, as in the production pipeline). A NaN detector score (``box_score``,
    ``text_score``) means the detector backend does not produce that score (e.g. ``text_score`` of a
    prompt-free or annotation backend), so its threshold does not apply; every other NaN fails, so a
    candidate with a missing mask score or area is never kept by accident.
    """
    conditions = [
        ~has_mask,
        ~(np.isnan(box_score) | (box_score >= limits.box_score)),
        ~(np.isnan(text_score) | (text_score >= limits.text_score)),
        ~(coverage < limits.max_box_coverage),
        ~(mask_score >= limits.mask_score),
        ~(area_fraction >= limits.min_mask_area_fraction),
    ]
    assert len(conditions) == len(FILTER_ORDER)
    return np.select(conditions, list(range(len(FILTER_ORDER))), default=PASSED).astype(np.int8)


# -- groups ----------------------------------------------------------------------------------------
# Sort once, then work on contiguous runs of one group.


def group_order(groups: np.ndarray, *keys_desc: np.ndarray, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Indices that sort rows by group, then each of ``keys_desc`` descending, then ``tiebreak`` ascending.

    The explicit tiebreak (e.g. candidate_id) makes every pick deterministic when scores tie.
    """
    keys: list[np.ndarray] = []
    if tiebreak is not None:
        keys.append(tiebreak)
    keys.extend(-np.asarray(k, dtype=np.float64) for k in reversed(keys_desc))
    keys.append(groups)
    return np.lexsort(keys)


def run_starts(sorted_groups: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in an already sorted array."""
    if len(sorted_groups) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])


def positions_in_runs(sorted_groups: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... within each run of equal values (the rank after :func:`group_order`)."""
    n = len(sorted_groups)
    starts = run_starts(sorted_groups)
    lengths = np.diff(np.r_[starts, n])
    return np.arange(n) - np.repeat(starts, lengths)


# -- grouped NMS -----------------------------------------------------------------------------------
# Class-aware NMS for a whole shard. Torchvision's ``batched_nms`` falls back to a Python loop over
# groups on CPU for large inputs, and a shard has ~10^5 (image, phrase) groups. Instead, groups are
# padded into ``(G, K, K)`` IoU blocks, bucketed by size so padding stays small, and the greedy pass
# loops over the K positions only, vectorised across every group of the bucket. Results equal
# per-group greedy NMS exactly.

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


# -- pick policies ---------------------------------------------------------------------------------


def pick_best_mask_score(
    image: np.ndarray, mask_score: np.ndarray, box_score: np.ndarray, candidate_id: np.ndarray
) -> np.ndarray:
    """One instance per image: highest SAM2 score (ties: higher detector score, then lower candidate_id)."""
    keep = np.zeros(len(image), dtype=bool)
    order = group_order(image, mask_score, box_score, tiebreak=candidate_id)
    keep[order[run_starts(image[order])]] = True
    return keep


def pick_both_scores_agree(
    image: np.ndarray,
    mask_score: np.ndarray,
    box_score: np.ndarray,
    candidate_id: np.ndarray,
    scan_order: np.ndarray | None = None,
) -> np.ndarray:
    """One instance per image, the seed pipeline's rule.

    Candidates of an image are scanned in the detector's output order; the first seeds the best, and a
    later one replaces it only when BOTH its SAM2 score and its detector score are strictly higher than
    the current best's. The answer depends on the scan order: the seed scanned what Grounding DINO's
    ``predict`` returned, i.e. decoder query order (the ``query_index`` column of DETECTIONS), not
    sorted by score.

    ``scan_order`` is a permutation of the rows giving that order (only the order within each image
    matters; see :func:`scan_order_by_query`). Without it the scan runs in detector score descending,
    then candidate_id -- the order candidates are stored in, the fallback for stored candidates that
    have no ``query_index`` -- and then no later candidate can have a strictly higher detector score,
    so each image keeps its top-detector-score survivor. Implemented as a loop over scan positions,
    vectorised across images.
    """
    n = len(image)
    keep = np.zeros(n, dtype=bool)
    if n == 0:
        return keep
    if scan_order is None:
        order = group_order(image, box_score, tiebreak=candidate_id)
    else:  # stable sort by image keeps the caller's order within each image
        order = np.asarray(scan_order)[np.argsort(image[scan_order], kind="stable")]
    sorted_image = image[order]
    starts = run_starts(sorted_image)
    sizes = np.diff(np.r_[starts, n])
    best = order[starts].copy()  # row index of the current best per image
    for position in range(1, int(sizes.max())):
        has = sizes > position
        challenger = order[starts[has] + position]
        current = best[has]
        wins = (mask_score[challenger] > mask_score[current]) & (box_score[challenger] > box_score[current])
        best[np.flatnonzero(has)[wins]] = challenger[wins]
    keep[best] = True
    return keep


def scan_order_by_query(query_index: np.ndarray, candidate_id: np.ndarray) -> np.ndarray:
    """Rows in detector output order: ascending ``query_index`` (ties, which a detector does not
    produce within an image, by candidate_id). A ``scan_order`` for :func:`pick_both_scores_agree`."""
    return np.lexsort((candidate_id, query_index))


def cap_per_image(
    image: np.ndarray, box_score: np.ndarray, candidate_id: np.ndarray, limit: int
) -> np.ndarray:
    """Keep at most ``limit`` instances per image, highest detector score first."""
    order = group_order(image, box_score, tiebreak=candidate_id)
    keep = np.zeros(len(image), dtype=bool)
    keep[order] = positions_in_runs(image[order]) < limit
    return keep


def apply_policy(
    policy: PickPolicy,
    image: np.ndarray,
    mask_score: np.ndarray,
    box_score: np.ndarray,
    candidate_id: np.ndarray,
    query_index: np.ndarray | None = None,
) -> np.ndarray:
    """Keep-mask of ``policy``. ``query_index`` (the detector's output order, when stored) is the
    scan order of ``both_scores_agree``; without it that policy scans in detector score order."""
    if policy is PickPolicy.ALL:
        return np.ones(len(image), dtype=bool)
    if policy is PickPolicy.BEST_MASK_SCORE:
        return pick_best_mask_score(image, mask_score, box_score, candidate_id)
    if policy is PickPolicy.BOTH_SCORES_AGREE:
        if (missing := int(np.isnan(np.asarray(box_score, np.float64)).sum())) > 0:
            raise PolicyNeedsScore(
                f"pick policy both_scores_agree compares the detector's box_score with the mask score, but "
                f"{missing} of {len(box_score)} candidates have no box_score (their detector backend does not "
                "produce one, e.g. annotations without scores). Use pick_policy best_mask_score or all."
            )
        scan_order = None if query_index is None else scan_order_by_query(query_index, candidate_id)
        return pick_both_scores_agree(image, mask_score, box_score, candidate_id, scan_order)
    raise ValueError(f"unknown pick policy {policy!r}")
