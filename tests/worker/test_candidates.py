"""Candidates: one image's boxes and masks, merged, ranked and round-tripped through the stage tables."""

from __future__ import annotations

import numpy as np
import pytest
from images import random_jpeg

from pseudolabel import schemas
from pseudolabel.models.interfaces import (
    Candidates,
    detection_images_table,
    detections_table,
    masks_table,
)
from pseudolabel.testing.models import FakeDetector, FakeSegmenter, box_prompts


def _found(image_id: str, scores: list[float], queries: list[int]) -> Candidates:
    n = len(scores)
    boxes = np.arange(4 * n, dtype=np.float32).reshape(n, 4)
    return Candidates(
        image_id,
        40,
        30,
        boxes,
        np.asarray(scores, np.float32),
        np.asarray(scores, np.float32) / 2,
        [f"p{q}" for q in queries],
        np.asarray(queries, np.int32),
    )


def test_concat_then_top_ranks_by_box_score_and_keeps_query_order_on_ties():
    merged = Candidates.concat([_found("a", [0.2, 0.9], [3, 7]), _found("a", [0.9, 0.5], [900, 901])])
    best = merged.top(3)
    assert best.query_indices.tolist() == [7, 900, 901] and best.phrases == ["p7", "p900", "p901"]
    assert best.boxes.dtype == np.float32 and best.boxes.shape == (3, 4)
    np.testing.assert_array_equal(best.boxes[0], merged.boxes[1])
    with pytest.raises(ValueError, match="one image"):
        Candidates.concat([_found("a", [0.1], [0]), _found("b", [0.1], [0])])


def test_masks_follow_their_boxes_and_tables_round_trip():
    data = {"a": random_jpeg(40, 30, seed=1), "b": random_jpeg(40, 30, seed=2)}
    items = {image_id: FakeSegmenter().prepare(image_id, raw) for image_id, raw in data.items()}
    found = [_found("a", [0.9, 0.4, 0.6], [1, 2, 3]), Candidates.empty("b", 40, 30)]
    segmented = FakeSegmenter().segment([items["a"], items["b"]], found, multimask=True)
    assert [len(s.masks) for s in segmented] == [3, 0] and segmented[0].multimask_scores.shape == (3, 3)

    ranked = segmented[0].top(2)  # masks travel with their boxes
    assert ranked.masks.counts == [segmented[0].masks.counts[i] for i in (0, 2)]
    assert ranked.mask_scores.tolist() == segmented[0].mask_scores[[0, 2]].tolist()

    detections, images, masks = (
        detections_table(segmented),
        detection_images_table(segmented),
        masks_table(segmented),
    )
    assert detections.schema == schemas.DETECTIONS and masks.schema == schemas.MASKS
    assert images.column("num_candidates").to_pylist() == [3, 0]
    assert (
        masks.column("candidate_id").to_pylist() == detections.column("candidate_id").to_pylist() == [0, 1, 2]
    )
    again = Candidates.from_tables(detections, images)
    assert detections_table(again).equals(detections) and detection_images_table(again).equals(images)
    with pytest.raises(ValueError, match="no masks"):
        masks_table(again)


def test_with_masks_refuses_a_different_count_or_frame():
    found = box_prompts("a", 40, 30, np.array([[0, 0, 10, 10]], np.float32))
    item = FakeSegmenter().prepare("a", random_jpeg(40, 30))
    (segmented,) = FakeSegmenter().segment([item], [found])
    with pytest.raises(ValueError, match="candidates but"):
        Candidates.empty("a", 40, 30).with_masks(segmented.masks, *([np.zeros(1)] * 3))
    with pytest.raises(ValueError, match="40x30"):
        Candidates.empty("a", 80, 60).with_no_masks(1).with_masks(segmented.masks, *([np.zeros(1)] * 3))
    assert Candidates.empty("a", 40, 30).with_no_masks(3).multimask_scores.shape == (0, 3)


def test_fake_detector_results_are_ranked_candidates():
    item = FakeDetector().prepare("x", random_jpeg(64, 48, seed=5))
    (found,) = FakeDetector(max_boxes_per_caption=5).detect(
        [item], ["plant .", "leaf ."], box_floor=0.0, text_floor=0.0, max_candidates=4
    )
    assert len(found) <= 4 and np.all(np.diff(found.box_scores) <= 0) and found.masks is None
    assert found.query_indices.dtype == np.int32 and len(set(found.query_indices.tolist())) == len(found)


@pytest.mark.parametrize("clicks_per_row", [(1, 1), (2, 2), (1, 3), (0, 2)])
def test_clicks_and_box_prompt_flags_round_trip_through_the_tables(clicks_per_row):
    """Rows with equal click counts too (a naive object array turns them 2-D)."""
    n = len(clicks_per_row)
    width = max(clicks_per_row)
    points = np.arange(n * width * 2, dtype=np.float32).reshape(n, width, 2)
    labels = np.array([[1 if j == 0 else 0 for j in range(width)] for _ in range(n)], np.int8)
    for i, count in enumerate(clicks_per_row):
        labels[i, count:] = -1
    box_prompt = np.array([count == 0 or i % 2 == 0 for i, count in enumerate(clicks_per_row)])
    found = Candidates(
        "img", 50, 40, np.tile(np.float32([1, 2, 9, 9]), (n, 1)), np.full(n, 0.5, np.float32),
        np.full(n, np.nan, np.float32), ["x"] * n, np.arange(n, dtype=np.int32),
    ).with_prompts(points, labels, box_prompt)  # fmt: skip
    (back,) = Candidates.from_tables(detections_table([found]), detection_images_table([found]))
    np.testing.assert_array_equal(back.box_prompts(), box_prompt)
    for i, count in enumerate(clicks_per_row):
        np.testing.assert_array_equal(back.point_labels[i][:count], labels[i][:count])
        np.testing.assert_array_equal(back.points[i][:count], points[i][:count])
        assert (back.point_labels[i][count:] == -1).all()
    assert np.isnan(back.text_scores).all()
