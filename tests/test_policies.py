"""Re-thresholding stored candidates: the pick policies and the per-image cap."""

from __future__ import annotations

import numpy as np
import pandas as pd
from relabel_helpers import QUERY_ORDER_IMAGE

from pseudolabel.labels.picking import (
    apply_policy,
    cap_per_image,
    pick_best_mask_score,
    pick_both_scores_agree,
    scan_order_by_query,
)
from pseudolabel.labels.thresholds import PickPolicy

# --- pick policies -----------------------------------------------------------------------------------


def arrays(rows):
    """Rows are (image, detector score, SAM2 score, candidate_id)."""
    frame = pd.DataFrame(rows, columns=["image", "box", "mask", "cid"])
    return (
        frame["image"].to_numpy(),
        frame["mask"].to_numpy(float),
        frame["box"].to_numpy(float),
        frame["cid"].to_numpy(),
    )


def test_best_mask_score_takes_the_highest_sam2_score_with_deterministic_ties():
    image, mask, box, cid = arrays(
        [
            (0, 0.9, 0.70, 0),
            (0, 0.5, 0.95, 1),
            (0, 0.6, 0.80, 2),
            (1, 0.9, 0.80, 0),
            (1, 0.8, 0.80, 1),  # mask tie: higher detector score wins -> cid 0
            (2, 0.7, 0.60, 3),
            (2, 0.7, 0.60, 1),  # full tie: lower candidate id wins -> cid 1
        ]
    )
    keep = pick_best_mask_score(image, mask, box, cid)
    assert list(zip(image[keep], cid[keep], strict=True)) == [(0, 1), (1, 0), (2, 1)]


def test_both_scores_agree_replaces_only_when_both_scores_are_higher():
    # Scan in the given (row) order: the seed is row 0.
    image, mask, box, cid = arrays(
        [
            (0, 0.5, 0.5, 0),
            (0, 0.9, 0.4, 1),  # higher detector score only: no
            (0, 0.4, 0.9, 2),  # higher SAM2 score only: no
            (0, 0.6, 0.6, 3),  # both higher: replaces
            (0, 0.6, 0.7, 4),  # detector score equal, not higher: no
            (0, 0.9, 0.9, 5),  # both higher than cid 3: replaces
            (0, 0.8, 0.8, 6),  # both lower: no
        ]
    )
    keep = pick_both_scores_agree(image, mask, box, cid, scan_order=np.arange(len(image)))
    assert cid[keep].tolist() == [5]


def test_both_scores_agree_in_detector_order_keeps_the_top_detector_candidate():
    # The seed's scan runs in detector-score order, so nobody can beat the seed's detector score.
    image, mask, box, cid = arrays([(0, 0.95, 0.5, 0), (0, 0.6, 0.9, 1), (0, 0.7, 0.99, 2), (1, 0.9, 0.3, 0)])
    keep = pick_both_scores_agree(image, mask, box, cid)
    assert list(zip(image[keep], cid[keep], strict=True)) == [(0, 0), (1, 0)]


def test_both_scores_agree_scans_in_query_order():
    # Query order X, Y, Z, W, V: X seeds; Y beats X on both scores -> Y; Z (SAM2 .70 < .90), W (SAM2 .85
    # < .90) and V (detector .35 < .45) each beat Y on one score only -> Y (cid 2) is kept.
    # Score order Z, W, Y, V, X keeps Z (cid 0): nothing has a higher detector score than the seed.
    # best_mask_score would keep V (cid 3): three different answers.
    image, mask, box, cid = arrays([row[:4] for row in QUERY_ORDER_IMAGE])
    query = np.array([row[4] for row in QUERY_ORDER_IMAGE])
    order = scan_order_by_query(query, cid)
    assert cid[order].tolist() == [4, 2, 0, 1, 3]
    assert cid[pick_both_scores_agree(image, mask, box, cid, scan_order=order)].tolist() == [2]
    assert cid[pick_both_scores_agree(image, mask, box, cid)].tolist() == [0]
    assert cid[pick_best_mask_score(image, mask, box, cid)].tolist() == [3]
    policy = PickPolicy.BOTH_SCORES_AGREE
    assert cid[apply_policy(policy, image, mask, box, cid, query_index=query)].tolist() == [2]
    assert cid[apply_policy(policy, image, mask, box, cid)].tolist() == [0]


def test_both_scores_agree_query_order_is_per_image():
    # Rows shuffled across two images; query indices overlap between images (they are per image).
    rows = [
        (1, 0.9, 0.5, 0, 7),  # image 1, query order: cid 1 (q 2) seeds, cid 0 (q 7) beats it on both
        (0, 0.3, 0.6, 4, 3),
        (1, 0.4, 0.4, 1, 2),
        *[row for row in QUERY_ORDER_IMAGE if row[3] != 4],
    ]
    image, mask, box, cid = arrays([row[:4] for row in rows])
    query = np.array([row[4] for row in rows])
    keep = apply_policy(PickPolicy.BOTH_SCORES_AGREE, image, mask, box, cid, query_index=query)
    assert sorted(zip(image[keep].tolist(), cid[keep].tolist(), strict=True)) == [(0, 2), (1, 0)]


def test_cap_keeps_the_highest_detector_scores():
    image, _mask, box, cid = arrays([(0, 0.1, 0.3, 0), (0, 0.9, 0.1, 1), (0, 0.5, 0.2, 2), (1, 0.5, 0.5, 0)])
    keep = cap_per_image(image, box, cid, limit=2)
    assert list(zip(image[keep], cid[keep], strict=True)) == [(0, 1), (0, 2), (1, 0)]
