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
        scan_order = None if query_index is None else scan_order_by_query(query_index, candidate_id)
        return pick_both_scores_agree(image, mask_score, box_score, candidate_id, scan_order)
    raise ValueError(f"unknown pick policy {policy!r}")
