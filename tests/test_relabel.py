"""Re-thresholding stored candidates: filters, NMS, pick policies and the per-shard function."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pandas as pd
import pytest

from pseudolabel.labels.filters import box_coverage
from pseudolabel.labels.nms import grouped_nms, pairwise_iou
from pseudolabel.labels.policies import (
    apply_policy,
    cap_per_image,
    pick_best_mask_score,
    pick_both_scores_agree,
    scan_order_by_query,
)
from pseudolabel.labels.reference import naive_relabel
from pseudolabel.labels.relabel import (
    DECISIONS,
    PSEUDO_LABELS,
    REJECT_REASONS,
    read_detections,
    relabel_shard,
)
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


# One image whose candidates' query (detector output) order is not their score order. candidate_id is
# the score rank; rows are (image, detector score, SAM2 score, candidate_id, query_index).
QUERY_ORDER_IMAGE = [
    (0, 0.80, 0.70, 0, 42),  # Z: top detector score
    (0, 0.50, 0.85, 1, 100),  # W
    (0, 0.45, 0.90, 2, 17),  # Y
    (0, 0.35, 0.95, 3, 250),  # V: top SAM2 score
    (0, 0.30, 0.60, 4, 3),  # X: first in query order
]


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


def query_order_rows():
    """QUERY_ORDER_IMAGE as stored candidates, apart so that NMS keeps them all."""
    return [
        candidate("a", cid, (20 * cid, 0, 20 * cid + 10, 10), box_score=box, mask_score=mask, query=query)
        for _image, box, mask, cid, query in QUERY_ORDER_IMAGE
    ]


def test_relabel_scans_in_query_index_and_falls_back_without_it():
    thresholds = LOOSE.with_overrides(pick_policy=PickPolicy.BOTH_SCORES_AGREE, box_score=0.0)
    detections, masks = tables(query_order_rows())
    assert "query_index" in detections
    result = relabel_shard(detections, masks, thresholds)
    assert result.kept["candidate_id"].tolist() == [2]  # Y: the scan runs in query order
    assert result.rejected["policy"] == 4
    naive_kept, _ = naive_relabel(detections, masks, thresholds)
    assert naive_kept["candidate_id"].tolist() == [2]
    # Older shards have no query_index: scan in the stored (detector score) order.
    old = detections.drop(columns="query_index")
    assert relabel_shard(old, masks, thresholds).kept["candidate_id"].tolist() == [0]
    assert naive_relabel(old, masks, thresholds)[0]["candidate_id"].tolist() == [0]
    # Other policies do not depend on the scan order.
    for policy in (PickPolicy.ALL, PickPolicy.BEST_MASK_SCORE):
        t = thresholds.with_overrides(pick_policy=policy)
        pd.testing.assert_frame_equal(
            relabel_shard(detections, masks, t).kept, relabel_shard(old, masks, t).kept
        )


def test_relabel_refuses_a_partly_missing_query_index():
    rows = query_order_rows()
    rows[1]["query_index"] = None
    with pytest.raises(ValueError, match="query_index is missing for 1 of 5"):
        relabel_shard(*tables(rows), LOOSE.with_overrides(pick_policy=PickPolicy.BOTH_SCORES_AGREE))


def test_read_detections_reads_query_index_only_when_stored():
    data = synthetic_candidates(20, seed=3)
    assert data.detections["query_index"].dtype == np.int32

    def stored(frame):
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return buffer.getvalue()

    new = read_detections(stored(data.detections.assign(extra=1.0)))
    assert "query_index" in new and "extra" not in new
    old = read_detections(stored(data.detections.drop(columns="query_index")))
    assert "query_index" not in old
    thresholds = LOOSE.with_overrides(pick_policy=PickPolicy.BOTH_SCORES_AGREE)
    assert relabel_shard(old, data.masks, thresholds, data.images).num_kept > 0


def test_synthetic_query_order_changes_both_scores_agree():
    # The synthetic candidates (benchmark, reference test) record a query order unrelated to the score,
    # so the both_scores_agree scan really differs from the score-order fallback on some images.
    data = synthetic_candidates(300, seed=7)
    for _, group in data.detections.groupby("image_id"):
        assert group["query_index"].is_unique
    thresholds = LOOSE.with_overrides(pick_policy=PickPolicy.BOTH_SCORES_AGREE)
    by_query = relabel_shard(data.detections, data.masks, thresholds, data.images).kept
    by_score = relabel_shard(
        data.detections.drop(columns="query_index"), data.masks, thresholds, data.images
    ).kept
    assert len(by_query) == len(by_score)  # one per image that has a survivor, either way
    differ = (by_query["candidate_id"].to_numpy() != by_score["candidate_id"].to_numpy()).sum()
    assert 0 < differ < len(by_query)


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
