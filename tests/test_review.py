"""The review loop's domain code: what goes to review, what comes back, and what it changes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pseudolabel.dataset.collect import with_reviews
from pseudolabel.dataset.gates import dataset_gates
from pseudolabel.exports.label_studio import brush_result, polygon_result, region_id
from pseudolabel.labels.relabel import relabel_shard
from pseudolabel.labels.thresholds import load_thresholds
from pseudolabel.quality.precision import precision_interval
from pseudolabel.review.corrections import (
    gold_instances,
    kept_precision,
    merge_reviews,
    reviewed_instances,
    reviewed_table,
)
from pseudolabel.review.queue import QueueSizes, hash_rank, review_signals, select_for_review
from pseudolabel.review.tasks import REVIEW_KEY, review_tasks
from pseudolabel.rle import decode_rle
from pseudolabel.testing.labels import synthetic_candidates

H, W = 48, 64


def shard_candidates(seed: int, images: int = 40):
    data = synthetic_candidates(images, 6.0, height=H, width=W, seed=seed, id_prefix=f"s{seed}-")
    return relabel_shard(data.detections, data.masks, load_thresholds(), data.images).candidates


def rect(y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros((H, W), bool)
    mask[y0:y1, x0:x1] = True
    return mask


# -- the queue -------------------------------------------------------------------------------------


def test_signals_measure_how_close_a_decision_is_to_flipping():
    rules = load_thresholds()
    frame = pd.DataFrame(
        {
            "phrase": ["cat"] * 4,
            "box_score": [rules.box_score + 0.02, rules.box_score - 0.05, 0.99, rules.box_score + 0.3],
            "text_score": [0.9, 0.9, 0.9, 0.9],
            "mask_score": [0.95, 0.95, rules.mask_score - 0.4, 0.95],
            "decision": ["kept", "box_score", "mask_score", "nms"],
        }
    )
    signals = review_signals(frame, rules)
    assert signals["flip_distance"].tolist()[:3] == pytest.approx([0.02, 0.05, 0.4])
    assert np.isnan(signals["flip_distance"].iloc[3])  # NMS, not a threshold, dropped it
    # Disagreement: the spread of the margins when some scores pass and some fail.
    assert np.isnan(signals["disagreement"].iloc[0])  # every score passes
    assert signals["disagreement"].iloc[1] == pytest.approx((0.9 - rules.text_score) + 0.05)
    high = max(0.99 - rules.box_score, 0.9 - rules.text_score)
    assert signals["disagreement"].iloc[2] == pytest.approx(high + 0.4)


def test_the_uniform_sample_is_a_seeded_draw_independent_of_shard_order():
    shards = [(f"shard-{n:05d}", shard_candidates(n)) for n in range(3)]
    sizes = QueueSizes(uniform=5, near_threshold=0, score_disagreement=0)
    queue = select_for_review(shards, load_thresholds(), sizes, seed=7)
    again = select_for_review(list(reversed(shards)), load_thresholds(), sizes, seed=7)
    pd.testing.assert_frame_equal(queue, again)
    assert set(queue["reason"]) == {"uniform"}
    for phrase, rows in queue.groupby("phrase"):
        assert len(rows) == 5
        # The draw is the 5 smallest seeded ranks among images with a kept instance of the class.
        eligible = {
            image
            for _, frame in shards
            for image in frame.loc[(frame["decision"] == "kept") & (frame["phrase"] == phrase), "image_id"]
        }
        expected = sorted(eligible, key=lambda i: hash_rank(i, 7))[:5]
        assert sorted(rows["image_id"]) == sorted(expected)
    other_seed = select_for_review(shards, load_thresholds(), sizes, seed=8)
    assert set(other_seed["image_id"]) != set(queue["image_id"])


def test_informative_items_are_the_nearest_and_the_most_disagreeing_per_class():
    rules = load_thresholds()
    frames = [shard_candidates(n) for n in range(2)]
    sizes = QueueSizes(uniform=0, near_threshold=4, score_disagreement=3)
    queue = select_for_review(list(zip(["a", "b"], frames, strict=True)), rules, sizes)
    everything = pd.concat(frames, ignore_index=True)
    signals = review_signals(everything, rules)
    for phrase in everything["phrase"].unique():
        mine = signals.loc[(everything["phrase"] == phrase).to_numpy()]
        near = queue.loc[(queue["phrase"] == phrase) & (queue["reason"] == "near_threshold")]
        assert len(near) == 4
        assert sorted(-near["priority"]) == pytest.approx(sorted(mine["flip_distance"].dropna())[:4])
        disagree = queue.loc[(queue["phrase"] == phrase) & (queue["reason"] == "score_disagreement")]
        assert sorted(disagree["priority"], reverse=True) == pytest.approx(
            sorted(mine["disagreement"].dropna(), reverse=True)[:3]
        )


def test_tasks_show_kept_instances_and_the_chosen_dropped_candidates():
    candidates = shard_candidates(0)
    queue = select_for_review([("shard-00000", candidates)], load_thresholds(), QueueSizes(2, 3, 1))
    tasks = review_tasks(
        queue,
        candidates,
        image_url=lambda shard, image: f"/data/local-files/?d={shard}/{image}.jpg",
        model_version="fake + fake",
        thresholds_fingerprint="fp",
    )
    assert len(tasks) == queue["image_id"].nunique()
    assert len({t["data"][REVIEW_KEY] for t in tasks}) == len(tasks)
    for task in tasks:
        image = task["data"]["image_id"]
        rows = candidates.loc[candidates["image_id"] == image]
        chosen = set(queue.loc[queue["image_id"] == image, "candidate_id"]) - {-1}
        expected = set(rows.loc[rows["decision"] == "kept", "candidate_id"]) | chosen
        shown = {r["id"] for r in task["predictions"][0]["result"]}
        assert shown == {region_id(c) for c in expected}
        assert task["data"]["kept_candidates"] == sorted(rows.loc[rows["decision"] == "kept", "candidate_id"])
        # The masks shown are the stored ones.
        for item in task["predictions"][0]["result"]:
            row = rows.loc[rows["candidate_id"] == int(item["id"][1:])].iloc[0]
            from pseudolabel.exports.label_studio import brush_rle_decode

            shown_mask = brush_rle_decode(item["value"]["rle"], H, W)
            assert np.array_equal(shown_mask, decode_rle(row["rle_counts"], H, W).astype(bool))


# -- what comes back -------------------------------------------------------------------------------


def reviewed_task(
    predicted: list[dict], final: list[dict], *, kept=(0, 1, 2), reasons="uniform", cancelled=False
):
    return {
        "id": 11,
        "data": {
            "image_id": "img",
            "shard": "shard-00000",
            "kept_candidates": list(kept),
            "reasons": reasons,
        },
        "predictions": [{"result": predicted}],
        "annotations": [
            {"id": 5, "result": [], "updated_at": "2026-01-01T00:00:00Z", "completed_by": 1},
            {
                "id": 6,
                "result": final,
                "updated_at": "2026-01-02T00:00:00Z",
                "completed_by": {"id": 3, "email": "r@example.com"},
                "was_cancelled": cancelled,
            },
        ],
    }


@pytest.mark.parametrize("fmt", ["brush", "polygon"])
def test_an_annotation_becomes_accepted_corrected_rejected_and_added_instances(fmt):
    def region(mask, candidate, label="cat"):
        if fmt == "brush":
            return brush_result(mask, candidate_id=candidate, label=label, score=0.9)
        ys, xs = np.nonzero(mask)
        outline = np.array(
            [
                [xs.min(), ys.min()],
                [xs.max() + 1, ys.min()],
                [xs.max() + 1, ys.max() + 1],
                [xs.min(), ys.max() + 1],
            ]
        )
        return polygon_result(outline, candidate_id=candidate, label=label, score=0.9, width=W, height=H)

    a, b, c, d = rect(2, 10, 2, 10), rect(20, 30, 20, 40), rect(35, 45, 5, 15), rect(30, 40, 45, 60)
    predicted = [region(a, 0), region(b, 1), region(c, 2), region(a, 7)]
    fixed = region(rect(20, 30, 20, 44), 1)  # the reviewer widened b
    added = {**region(d, 99), "id": "xYz12"}
    task = reviewed_task(predicted, [predicted[0], fixed, predicted[3], added])
    rows = reviewed_instances(task).set_index("candidate_id")
    assert rows["outcome"].to_dict() == {
        0: "accepted",
        1: "corrected",
        2: "rejected",
        7: "accepted",
        -1: "added",
    }
    assert rows.loc[7, "pipeline_kept"] == False  # noqa: E712  (a dropped candidate the reviewer kept)
    assert rows.loc[0, "pipeline_kept"] == True  # noqa: E712
    assert decode_rle(rows.loc[1, "rle_counts"], H, W).astype(bool).sum() == 10 * 24
    assert rows.loc[1, "iou_with_prediction"] == pytest.approx(200 / 240)
    assert rows.loc[2, "iou_with_prediction"] == 0.0
    assert (rows["reviewer"] == "r@example.com").all() and (rows["task_id"] == 11).all()
    assert rows["uniform_sample"].all() and (rows["annotation_id"] == 6).all()
    assert set(gold_instances(reviewed_instances(task))["outcome"]) == {"accepted", "corrected", "added"}


def test_a_skipped_task_reviews_nothing_and_a_new_review_replaces_the_old():
    a = rect(2, 10, 2, 10)
    predicted = [brush_result(a, candidate_id=0, label="cat", score=0.5)]
    assert reviewed_instances(reviewed_task(predicted, [], cancelled=True)).empty
    first = reviewed_table([reviewed_task(predicted, predicted)])
    second = reviewed_table([reviewed_task(predicted, [])])
    merged = merge_reviews(first, second, [11])
    assert merged["outcome"].tolist() == ["rejected"]
    assert merge_reviews(first, second.iloc[:0], []).equals(first)


def test_precision_counts_confirmed_kept_instances_of_the_uniform_sample():
    def row(outcome, phrase="cat", predicted="cat", iou=1.0, kept=True, uniform=True):
        return {
            "outcome": outcome,
            "phrase": phrase,
            "predicted_phrase": predicted,
            "iou_with_prediction": iou,
            "pipeline_kept": kept,
            "uniform_sample": uniform,
        }

    reviewed = pd.DataFrame(
        [row("accepted")] * 6
        + [row("corrected", iou=0.8), row("corrected", iou=0.3), row("corrected", phrase="dog")]
        + [row("rejected", iou=0.0)]
        + [row("accepted", uniform=False)] * 5  # informative items: not in the unbiased estimate
        + [row("accepted", kept=False)] * 3  # dropped candidates the reviewer kept: not kept labels
        + [row("added", predicted=None, iou=np.nan, kept=False)]
    )
    table = kept_precision(reviewed).set_index("class")
    assert table.loc["cat", "kept"] == 10 and table.loc["cat", "correct"] == 7
    assert table.loc["cat", "precision"] == pytest.approx(0.7)
    low, high = precision_interval(7, 10)
    assert (table.loc["cat", "ci_low"], table.loc["cat", "ci_high"]) == pytest.approx((low, high))


# -- what it changes -------------------------------------------------------------------------------


def test_reviewed_images_carry_the_reviewers_masks_flagged_verified():
    instances = pd.DataFrame(
        {
            "image_id": ["a", "a", "b", "c"],
            "candidate_id": [0, 1, 0, 0],
            "phrase": ["cat"] * 4,
            "rle_counts": ["x", "y", "z", "w"],
            "box_score": [0.5] * 4,
        }
    )
    gold = pd.DataFrame(
        {
            "image_id": ["a"],
            "candidate_id": [-1],
            "phrase": ["dog"],
            "rle_counts": ["human"],
            "outcome": ["added"],
        }
    )
    out = with_reviews(instances, gold)
    assert out.loc[out["image_id"] == "a", "rle_counts"].tolist() == ["human"]
    assert out.loc[out["image_id"] == "a", "verified"].tolist() == [True]
    assert out.loc[out["image_id"] == "a", "box_score"].tolist() == [1.0]
    assert sorted(out.loc[~out["verified"], "image_id"]) == ["b", "c"]


def test_gates_name_what_fails():
    samples = pd.DataFrame(
        {
            "image_id": ["a", "b", "c"],
            "shard": ["s0", "s1", "s1"],
            "source_key": ["images/s0/a.jpg", "images/s1/b.jpg", "images/s1/c.jpg"],
            "verified": [False, False, True],
            "detector_model": ["gd", None, None],
            "segmenter_model": ["sam2", None, None],
            "thresholds_fingerprint": ["f1", "f2", "f2"],
        }
    )
    precision = pd.DataFrame({"class": ["cat", "dog"], "kept": [30, 5], "precision": [0.8, 0.1]})
    gates = {
        g.name: g
        for g in dataset_gates(
            samples, stale={"s1": "masks changed"}, precision=precision, target_precision=0.9, min_reviewed=20
        )
    }
    assert not gates["labels_match_candidates"].passed
    assert gates["labels_match_candidates"].details["stale_shards"] == {"s1": "masks changed"}
    assert not gates["provenance_complete"].passed  # b; c is verified and needs no model
    assert gates["provenance_complete"].details["shards"] == ["s1"]
    assert not gates["one_thresholds_version"].passed
    assert not gates["reviewed_precision"].passed  # cat: 30 reviewed at 0.8; dog has too few to judge
    assert [r["class"] for r in gates["reviewed_precision"].details["below_target"]] == ["cat"]
    relaxed = dataset_gates(
        samples.assign(detector_model="gd", segmenter_model="sam2", thresholds_fingerprint="f1"),
        stale={},
        precision=precision,
        target_precision=0.75,
        min_reviewed=20,
    )
    assert all(g.passed for g in relaxed)
