"""Re-thresholding stored candidates: the per-shard function."""

from __future__ import annotations

import io
import itertools

import numpy as np
import pandas as pd
import pytest
from relabel_helpers import LOOSE, QUERY_ORDER_IMAGE, candidate, decisions, tables

from pseudolabel.labels.relabel import (
    DECISIONS,
    read_detections,
    relabel_shard,
)
from pseudolabel.labels.thresholds import PickPolicy, thresholds_fingerprint
from pseudolabel.schemas import PSEUDO_LABELS
from pseudolabel.testing.labels import synthetic_candidates
from pseudolabel.testing.reference_labels import naive_relabel

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


# --- per-class thresholds ----------------------------------------------------------------------------


def test_class_overrides_apply_only_to_their_class():
    rows = [
        candidate("a", 0, (0, 0, 10, 10), box_score=0.4, mask_score=0.6, phrase="cat"),
        candidate("a", 1, (20, 0, 30, 10), box_score=0.4, mask_score=0.6, phrase="dog"),
        candidate("b", 0, (0, 0, 10, 10), box_score=0.9, mask_score=0.75, phrase="cat"),
        candidate("b", 1, (20, 0, 30, 10), box_score=0.9, mask_score=0.75, phrase="dog"),
        candidate("b", 2, (40, 0, 50, 10), box_score=0.25, mask_score=0.9, phrase="bird"),
    ]
    det, masks = tables(rows)
    plain = decisions(relabel_shard(det, masks, LOOSE))
    assert plain == {
        ("a", 0): "kept",
        ("a", 1): "kept",
        ("b", 0): "kept",
        ("b", 1): "kept",
        ("b", 2): "box_score",
    }
    strict_cat = LOOSE.with_class_overrides("cat", box_score=0.5, mask_score=0.8).with_class_overrides(
        "bird", box_score=0.2
    )
    result = relabel_shard(det, masks, strict_cat)
    assert decisions(result) == {
        ("a", 0): "box_score",  # cat needs box >= 0.5 now
        ("a", 1): "kept",  # dog keeps the global 0.3
        ("b", 0): "mask_score",  # cat needs mask >= 0.8 now
        ("b", 1): "kept",
        ("b", 2): "kept",  # bird is looser than the global box threshold
    }
    assert result.fingerprint == thresholds_fingerprint(strict_cat) != thresholds_fingerprint(LOOSE)


@pytest.mark.parametrize("policy", list(PickPolicy))
def test_overrides_equal_to_the_globals_decide_exactly_as_no_classes(policy):
    data = synthetic_candidates(300, seed=13)
    thresholds = LOOSE.with_overrides(pick_policy=policy, max_instances_per_image=3)
    same = thresholds
    for phrase in data.detections["phrase"].unique():
        same = same.with_class_overrides(
            phrase, box_score=thresholds.box_score, mask_score=thresholds.mask_score, text_score=0.2
        )
    assert same.classes
    plain = relabel_shard(data.detections, data.masks, thresholds, data.images)
    overridden = relabel_shard(data.detections, data.masks, same, data.images)
    pd.testing.assert_frame_equal(
        plain.kept.drop(columns="thresholds_fingerprint"),
        overridden.kept.drop(columns="thresholds_fingerprint"),
    )
    assert plain.rejected == overridden.rejected


def test_per_class_filters_equal_relabelling_each_class_with_its_own_thresholds():
    # With policy `all` and no cap pressure classes do not interact, so the shard decided with per-class
    # overrides is the union of each class decided alone with its for_class() thresholds.
    data = synthetic_candidates(400, seed=17)
    phrases = sorted(data.detections["phrase"].unique())
    assert len(phrases) >= 3
    thresholds = (
        LOOSE.with_overrides(max_instances_per_image=1000, min_mask_area_fraction=0.02)
        .with_class_overrides(phrases[0], box_score=0.55, mask_score=0.85, max_box_coverage=0.5)
        .with_class_overrides(phrases[1], text_score=0.45, min_mask_area_fraction=0.001)
    )
    result = relabel_shard(data.detections, data.masks, thresholds, data.images)
    expected = {}
    for phrase in phrases:
        alone = data.detections[data.detections["phrase"] == phrase]
        expected.update(decisions(relabel_shard(alone, data.masks, thresholds.for_class(phrase))))
    assert decisions(result) == expected
    plain = decisions(
        relabel_shard(
            data.detections,
            data.masks,
            LOOSE.with_overrides(max_instances_per_image=1000, min_mask_area_fraction=0.02),
            data.images,
        )
    )
    changed = {key for key in plain if plain[key] != expected[key]}
    keys = zip(data.detections["image_id"], data.detections["candidate_id"], strict=True)
    phrase_of = dict(zip(keys, data.detections["phrase"], strict=True))
    assert changed and {phrase_of[key] for key in changed} <= {phrases[0], phrases[1]}
