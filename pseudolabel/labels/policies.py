"""Pick policies: which surviving instances of an image become labels. All vectorised over a shard.

Each function takes per-candidate arrays (``image`` is an integer image code) and returns a
boolean keep-mask aligned with its inputs.
"""

from __future__ import annotations

import numpy as np

from pseudolabel.labels.grouping import group_order, positions_in_runs, run_starts
from pseudolabel.labels.thresholds import PickPolicy


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

    Candidates are scanned in ``scan_order`` (default: detector score descending, then candidate_id);
    the first seeds the best, and a later one replaces it only when BOTH its SAM2 score and its
    detector score are strictly higher than the current best's.

    Note: in the default descending detector-score scan no later candidate can have a strictly
    higher detector score, so this returns each image's top-detector-score survivor; the general
    scan is kept so the rule stays faithful if the scan order changes. Implemented as a loop over
    scan positions, vectorised across images.
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
) -> np.ndarray:
    if policy is PickPolicy.ALL:
        return np.ones(len(image), dtype=bool)
    if policy is PickPolicy.BEST_MASK_SCORE:
        return pick_best_mask_score(image, mask_score, box_score, candidate_id)
    if policy is PickPolicy.BOTH_SCORES_AGREE:
        return pick_both_scores_agree(image, mask_score, box_score, candidate_id)
    raise ValueError(f"unknown pick policy {policy!r}")
