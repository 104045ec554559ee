"""Re-thresholding stored candidates: the filters and class-aware NMS."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from relabel_helpers import LOOSE, H, W, candidate, decisions, tables

from pseudolabel.labels.picking import PolicyNeedsScore, box_coverage, grouped_nms, pairwise_iou
from pseudolabel.labels.relabel import REJECT_REASONS, relabel_shard
from pseudolabel.labels.thresholds import PickPolicy

# --- filters -----------------------------------------------------------------------------------------


def test_box_coverage_clips_to_the_image():
    cov = box_coverage(
        np.array([-10.0, 0, 50]),
        np.array([-10.0, 0, 0]),
        np.array([110.0, 50, 150]),
        np.array([60.0, 25, 50]),
        W,
        H,
    )
    np.testing.assert_allclose(cov, [1.0, 0.25, 0.5])


def test_each_filter_rejects_with_its_own_reason_and_the_first_failure_wins():
    box = (0, 0, 10, 10)
    rows = [
        candidate("a", 0, box),  # kept
        candidate("a", 1, (20, 0, 30, 10), box_score=0.29),
        candidate("a", 2, (40, 0, 50, 10), text_score=0.19),
        candidate("a", 3, (0, 0, 100, 40)),  # covers exactly 0.8 of the image: dropped (>= 80 %)
        candidate("a", 4, (60, 0, 70, 10), mask_score=0.49),
        candidate("a", 5, (80, 0, 90, 10), area=49),  # 49 / 5000 < 0.01
        candidate("a", 6, (0, 20, 10, 30)),  # no mask row
        candidate("a", 7, (0, 0, 100, 50), box_score=0.1, mask_score=0.1),  # several failures: first counts
    ]
    result = relabel_shard(*tables(rows, without_mask={("a", 6)}), LOOSE)
    assert decisions(result) == {
        ("a", 0): "kept",
        ("a", 1): "box_score",
        ("a", 2): "text_score",
        ("a", 3): "box_coverage",
        ("a", 4): "mask_score",
        ("a", 5): "mask_area",
        ("a", 6): "no_mask",
        ("a", 7): "box_score",
    }
    assert result.rejected == {
        **dict.fromkeys(REJECT_REASONS, 0),
        **{r: 1 for r in ("box_score", "text_score", "box_coverage", "mask_score", "mask_area", "no_mask")},
        "box_score": 2,
    }


def test_thresholds_are_inclusive_for_scores_and_area():
    rows = [candidate("a", 0, (0, 0, 10, 10), box_score=0.3, text_score=0.2, mask_score=0.5, area=50)]
    assert relabel_shard(*tables(rows), LOOSE).num_kept == 1


def test_missing_scores_never_pass():
    rows = [candidate("a", 0, (0, 0, 10, 10), mask_score=np.nan)]
    assert decisions(relabel_shard(*tables(rows), LOOSE)) == {("a", 0): "mask_score"}


# --- NMS ---------------------------------------------------------------------------------------------


def reference_nms(boxes, scores, groups, threshold):
    keep = np.ones(len(scores), bool)
    for group in np.unique(groups):
        idx = [i for i in sorted(np.flatnonzero(groups == group), key=lambda i: (-scores[i], i))]
        kept: list[int] = []
        for i in idx:
            if any(pairwise_iou(boxes[[k, i]])[0, 1] > threshold for k in kept):
                keep[i] = False
            else:
                kept.append(i)
    return keep


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7])
def test_grouped_nms_equals_per_group_greedy_nms(threshold):
    rng = np.random.default_rng(7)
    # Group sizes from 1 to 40 exercise every padding bucket, including single-box groups.
    sizes = np.concatenate([np.arange(1, 41), rng.integers(1, 6, size=200)])
    groups = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(groups)  # the function must not rely on rows being grouped
    xy = rng.uniform(0, 80, size=(len(groups), 2))
    wh = rng.uniform(5, 40, size=(len(groups), 2))
    boxes = np.hstack([xy, xy + wh])
    scores = rng.choice([0.5, 0.6, 0.7, 0.8], size=len(groups))  # many ties: the tiebreak matters
    keep = grouped_nms(boxes, scores, groups, threshold)
    np.testing.assert_array_equal(keep, reference_nms(boxes, scores, groups, threshold))
    assert 0 < keep.sum() < len(keep)


def test_nms_is_class_aware_and_per_image():
    overlapping = (0, 0, 20, 20)
    shifted = (1, 0, 21, 20)  # IoU 19/21 with the first
    rows = [
        candidate("a", 0, overlapping, box_score=0.9),
        candidate("a", 1, shifted, box_score=0.8),  # same phrase: suppressed
        candidate("a", 2, shifted, box_score=0.7, phrase="cat"),  # other phrase: kept
        candidate("b", 0, shifted, box_score=0.6),  # other image: kept
    ]
    result = relabel_shard(*tables(rows), LOOSE)
    assert decisions(result) == {("a", 0): "kept", ("a", 1): "nms", ("a", 2): "kept", ("b", 0): "kept"}


# --- scores a detector backend does not produce (NaN) ----------------------------------------------


def test_a_score_the_backend_does_not_make_is_not_thresholded_but_real_low_scores_still_are():
    rows = [
        candidate("a", 0, (0, 0, 10, 10), text_score=np.nan),  # e.g. OWL-ViT v1, DINOv2 saliency
        candidate("a", 1, (20, 0, 30, 10), box_score=np.nan, text_score=np.nan),  # annotations, no score
        candidate("a", 2, (40, 0, 50, 10), text_score=0.19),
        candidate("a", 3, (60, 0, 70, 10), box_score=np.nan, mask_score=np.nan),  # a missing MASK score fails
    ]
    result = relabel_shard(*tables(rows), LOOSE)
    assert decisions(result) == {
        ("a", 0): "kept",
        ("a", 1): "kept",
        ("a", 2): "text_score",
        ("a", 3): "mask_score",
    }


def test_both_scores_agree_refuses_candidates_without_a_box_score():
    rows = [candidate("a", 0, (0, 0, 10, 10)), candidate("a", 1, (20, 0, 30, 10), box_score=np.nan)]
    with pytest.raises(PolicyNeedsScore, match=r"1 of 2 candidates have no box_score.*best_mask_score"):
        relabel_shard(*tables(rows), replace(LOOSE, pick_policy=PickPolicy.BOTH_SCORES_AGREE))
    # the policies that need only mask scores work with the same candidates
    assert relabel_shard(*tables(rows), replace(LOOSE, pick_policy=PickPolicy.BEST_MASK_SCORE)).num_kept == 1
