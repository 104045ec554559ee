"""Re-thresholding stored candidates: filters, NMS, pick policies and the per-shard function."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from pseudolabel.labels.filters import box_coverage
from pseudolabel.labels.nms import grouped_nms, pairwise_iou
from pseudolabel.labels.policies import cap_per_image, pick_best_mask_score, pick_both_scores_agree
from pseudolabel.labels.reference import naive_relabel
from pseudolabel.labels.relabel import DECISIONS, PSEUDO_LABELS, REJECT_REASONS, relabel_shard
from pseudolabel.labels.synthetic import encode_mask, synthetic_candidates
from pseudolabel.labels.thresholds import PickPolicy, Thresholds, thresholds_fingerprint

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


def candidate(image_id, cid, box, box_score=0.9, text_score=0.9, mask_score=0.9, area=500, phrase="dog"):
    return {
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
    detections = frame[
        ["image_id", "candidate_id", "x0", "y0", "x1", "y1", "box_score", "text_score", "phrase"]
    ]
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


def test_grouped_nms_matches_torchvision_batched_nms():
    torch = pytest.importorskip("torch")
    ops = pytest.importorskip("torchvision.ops")
    rng = np.random.default_rng(3)
    n = 3000
    groups = rng.integers(0, 300, size=n)
    xy = rng.uniform(0, 100, size=(n, 2))
    boxes = np.hstack([xy, xy + rng.uniform(5, 50, size=(n, 2))])
    scores = rng.uniform(size=n)  # distinct scores: torchvision's tie order is unspecified
    ours = np.flatnonzero(grouped_nms(boxes, scores, groups, 0.5))
    theirs = ops.batched_nms(torch.tensor(boxes), torch.tensor(scores), torch.tensor(groups), 0.5).numpy()
    np.testing.assert_array_equal(ours, np.sort(theirs))


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


def test_cap_keeps_the_highest_detector_scores():
    image, _mask, box, cid = arrays([(0, 0.1, 0.3, 0), (0, 0.9, 0.1, 1), (0, 0.5, 0.2, 2), (1, 0.5, 0.5, 0)])
    keep = cap_per_image(image, box, cid, limit=2)
    assert list(zip(image[keep], cid[keep], strict=True)) == [(0, 1), (0, 2), (1, 0)]


# --- the per-shard function --------------------------------------------------------------------------


def test_policies_and_cap_in_relabel_shard():
    rows = [
        candidate("a", 0, (0, 0, 10, 10), box_score=0.9, mask_score=0.6),
        candidate("a", 1, (20, 0, 30, 10), box_score=0.8, mask_score=0.95),
        candidate("a", 2, (40, 0, 50, 10), box_score=0.7, mask_score=0.7),
    ]
    det, masks = tables(rows)
    by = {p: relabel_shard(det, masks, LOOSE.with_overrides(pick_policy=p)) for p in PickPolicy}
    assert by[PickPolicy.ALL].kept["candidate_id"].tolist() == [0, 1, 2]
    assert by[PickPolicy.BEST_MASK_SCORE].kept["candidate_id"].tolist() == [1]
    assert by[PickPolicy.BOTH_SCORES_AGREE].kept["candidate_id"].tolist() == [0]
    assert by[PickPolicy.BEST_MASK_SCORE].rejected["policy"] == 2
    capped = relabel_shard(det, masks, LOOSE.with_overrides(max_instances_per_image=2))
    assert capped.kept["candidate_id"].tolist() == [0, 1]
    assert capped.kept["rank"].tolist() == [0, 1]
    assert capped.rejected["max_instances"] == 1


@pytest.mark.parametrize("policy, nms_iou", list(itertools.product(PickPolicy, [0.1, 0.5])))
def test_vectorised_relabel_equals_the_naive_per_image_reference(policy, nms_iou):
    data = synthetic_candidates(400, seed=11)
    masks = data.masks.sample(frac=0.97, random_state=0)  # a few candidates lost their mask
    thresholds = LOOSE.with_overrides(
        pick_policy=policy, nms_iou=nms_iou, max_instances_per_image=3, min_mask_area_fraction=0.02
    )
    result = relabel_shard(data.detections, masks, thresholds, data.images)
    naive_kept, naive_rejected = naive_relabel(data.detections, masks, thresholds)
    assert set(zip(result.kept["image_id"], result.kept["candidate_id"], strict=True)) == set(
        zip(naive_kept["image_id"], naive_kept["candidate_id"], strict=True)
    )
    assert result.rejected == naive_rejected
    assert all(result.rejected[r] > 0 for r in ("no_mask", "box_score", "box_coverage", "mask_score", "nms"))


def test_result_accounting_and_output_table():
    data = synthetic_candidates(300, candidates_per_image=3.0, seed=5)
    result = relabel_shard(data.detections, data.masks, LOOSE, data.images)
    assert result.num_kept + sum(result.rejected.values()) == len(data.detections) == len(result.candidates)
    assert set(result.candidates["decision"].cat.categories) == set(DECISIONS)
    assert result.num_images == 300  # includes images without candidates
    assert (data.images["num_candidates"] == 0).any()
    assert result.empty_image_rate == pytest.approx(1 - result.kept["image_id"].nunique() / 300)
    kept = result.kept
    assert list(kept.columns) == PSEUDO_LABELS.names
    assert (kept["thresholds_fingerprint"] == thresholds_fingerprint(LOOSE)).all()
    # Sorted by image, then detector score; rank restarts per image.
    assert kept["image_id"].is_monotonic_increasing
    for _, group in kept.groupby("image_id"):
        assert group["box_score"].is_monotonic_decreasing
        assert group["rank"].tolist() == list(range(len(group)))
    np.testing.assert_allclose(
        kept["area_fraction"], kept["mask_area"] / (kept["height"] * kept["width"]), rtol=1e-6
    )


def test_empty_shard_gives_a_typed_empty_table():
    data = synthetic_candidates(3, candidates_per_image=0.0)
    result = relabel_shard(data.detections, data.masks, LOOSE, data.images)
    assert result.num_kept == 0 and result.num_images == 3 and result.empty_image_rate == 1.0
    assert list(result.kept.columns) == PSEUDO_LABELS.names
    assert str(result.kept["mask_area"].dtype) == "int64"
